"""Optimizers, built by name for a model: `optim.build("muonclip", model, lr=3e-3, qk_clip_tau=100)`.

A registry name maps to a `build(model, **hyper_parameters)` function in its own file; any other name
with a dot is a `torch.optim.Optimizer` subclass given `model.parameters()`, such as `torch.optim.SGD`.
To add an optimizer: write `optim/<name>.py` with such a `build`, and add one line to OPTIMIZERS.

`optim.check(name, **cfg)` validates the name and the keys of `cfg` without a model, so the trainer can
refuse a typo before it builds data or writes files; `build` runs the same check first.

Which dotted paths are imported. A config names an optimizer, and importing a module runs its code, so a
module file dropped into the directory a run starts from must not run because a config named it.
`torch.<...>` paths are imported as given. Any other path is imported only if its top-level module,
located with `importlib.util.find_spec` (which imports nothing), is not found in the current directory
or the script's directory (sys.path[0]; '' on sys.path means the current directory). Such a local
module, say `myopt.py` beside the config, is imported only with KIMI_ALLOW_LOCAL_OPTIMIZER=1 in the
environment; without it the name is refused with a ValueError before anything is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from optim import adamw, muon, qk_clip
from optim.muon import Muon, adamw_update, muon_chunks, muon_update, split_params, zeropower_via_newtonschulz5
from optim.qk_clip import MuonClip, QKClip, clip_factors, mla_row_scales, qk_clip_, reduce_max_logits, scale_rows_

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": adamw.build,
    "muon": muon.build,
    "muonclip": qk_clip.build,
}
# Set to 1 to let a dotted optimizer path import a module from the current or the script's directory.
ALLOW_LOCAL_ENV = "KIMI_ALLOW_LOCAL_OPTIMIZER"


def check(name: str, **cfg) -> None:
    """Raise ValueError if `name` is neither a registry name nor an allowed dotted path to an Optimizer
    subclass, or if `cfg` holds a key its constructor does not take or lacks one it needs."""
    _resolve(name, cfg)


def build(name: str, model: nn.Module, **cfg) -> torch.optim.Optimizer:
    """The optimizer `name` for `model`'s parameters; `cfg` holds its hyper-parameters (lr, ...).

    Unknown keys raise ValueError naming the key and the valid ones, so a typo in a config never
    silently falls back to a default.
    """
    factory = _resolve(name, cfg)
    return factory(model, **cfg) if name in OPTIMIZERS else factory(model.parameters(), **cfg)


def _resolve(name: str, cfg: dict) -> Callable[..., torch.optim.Optimizer]:
    """The factory or class `name` stands for, after checking `cfg` against its signature."""
    if name in OPTIMIZERS:
        factory = OPTIMIZERS[name]
    elif "." in name:
        factory = _import_optimizer(name)
    else:
        raise ValueError(f"optimizer = {name!r} is not a registry name; valid: {', '.join(OPTIMIZERS)}, "
                         "or a dotted path to a torch.optim.Optimizer class such as torch.optim.SGD")
    params = list(inspect.signature(factory).parameters.values())[1:]  # after `model` / `params`
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for key in cfg:
            if key not in named:
                raise ValueError(f"unknown key {key!r} for optimizer = {name!r}; valid keys: {', '.join(named)}")
    for p in params:
        if p.name in named and p.default is p.empty and p.name not in cfg:
            raise ValueError(f"optimizer = {name!r} needs key {p.name!r}; given: {', '.join(cfg) or 'none'}")
    return factory


def _import_optimizer(path: str) -> type[torch.optim.Optimizer]:
    module_name, _, attr = path.rpartition(".")
    if not all(part.isidentifier() for part in path.split(".")):
        raise ValueError(f"optimizer = {path!r} is not a dotted path of Python names such as torch.optim.SGD")
    top = module_name.partition(".")[0]
    if top != "torch" and os.environ.get(ALLOW_LOCAL_ENV) != "1":
        local = _local_location(top)
        if local:
            raise ValueError(
                f"optimizer = {path!r}: module {top!r} would be imported from {local}, inside the current or "
                f"the script's directory, and importing it runs its code; set {ALLOW_LOCAL_ENV}=1 if you trust "
                f"it, or use a registry name ({', '.join(OPTIMIZERS)}) or an installed class such as torch.optim.SGD"
            )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"optimizer = {path!r} could not be imported: {e}") from None
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer = {path!r} is {cls!r}, not a torch.optim.Optimizer subclass")
    return cls


def _local_location(top: str) -> str | None:
    """Where `top` would be imported from if that is the current or the script's directory, else None.

    It is the folder holding the module or package, i.e. the sys.path entry it is found through, so a
    virtual environment's site-packages below the current directory is not local. find_spec on a
    top-level name searches sys.path (or returns the loaded module's spec) and imports nothing.
    """
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as e:
        raise ValueError(f"optimizer module {top!r} could not be located: {e}") from None
    if spec is None:
        return None  # import_module will say it does not exist
    local = {os.path.realpath(os.getcwd())}
    if sys.path and not sys.flags.safe_path:
        local.add(os.path.realpath(sys.path[0] or os.getcwd()))
    # A package (a namespace one has no origin) lives in its search locations, a module in its file.
    places = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.has_location else [])
    for place in places:
        if os.path.realpath(os.path.dirname(os.path.abspath(place))) in local:
            return place
    return None


__all__ = [
    "OPTIMIZERS", "check", "build", "Muon", "MuonClip", "split_params", "zeropower_via_newtonschulz5",
    "muon_update", "muon_chunks", "adamw_update", "clip_factors", "mla_row_scales", "scale_rows_", "reduce_max_logits",
    "qk_clip_", "QKClip",
]
