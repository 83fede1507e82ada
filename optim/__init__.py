"""Optimizers, built by name for a model: `optim.build("muonclip", model, lr=3e-3, qk_clip_tau=100)`.

A registry name maps to a `build(model, **hyper_parameters)` function in its own file; any other name
with a dot is a `torch.optim` class (or one importable elsewhere) given `model.parameters()`.
To add an optimizer: write `optim/<name>.py` with such a `build`, and add one line to OPTIMIZERS.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from optim import adamw, muon, qk_clip
from optim.muon import Muon, adamw_update, muon_update, split_params, zeropower_via_newtonschulz5
from optim.qk_clip import MuonClip, QKClip, clip_factors, mla_row_scales, qk_clip_, reduce_max_logits, scale_rows_

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": adamw.build,
    "muon": muon.build,
    "muonclip": qk_clip.build,
}


def build(name: str, model: nn.Module, **cfg) -> torch.optim.Optimizer:
    """The optimizer `name` for `model`'s parameters; `cfg` holds its hyper-parameters (lr, ...).

    Unknown keys raise ValueError naming the key and the valid ones, so a typo in a config never
    silently falls back to a default.
    """
    if name in OPTIMIZERS:
        factory, args = OPTIMIZERS[name], None
    elif "." in name:
        factory = _import_optimizer(name)
        args = (model.parameters(),)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}, "
                         "or a dotted path to a torch.optim.Optimizer class such as torch.optim.SGD")
    valid = [p for p in inspect.signature(factory).parameters if p not in ("model", "params", "self")]
    for key in cfg:
        if key not in valid:
            raise ValueError(f"unknown key {key!r} for optimizer {name!r}; valid keys: {', '.join(valid)}")
    return factory(model, **cfg) if args is None else factory(*args, **cfg)


def _import_optimizer(path: str) -> type[torch.optim.Optimizer]:
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"optimizer {path!r} could not be imported: {e}") from None
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{path!r} is not a torch.optim.Optimizer subclass")
    return cls


__all__ = [
    "OPTIMIZERS", "build", "Muon", "MuonClip", "split_params", "zeropower_via_newtonschulz5", "muon_update",
    "adamw_update", "clip_factors", "mla_row_scales", "scale_rows_", "reduce_max_logits", "qk_clip_", "QKClip",
]
