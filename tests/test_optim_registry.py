"""optim.build / optim.check: registry names, dotted paths, keys, and which modules a name may import."""

import importlib
import sys

import pytest
import torch

import optim
from moe.config import preset
from moe.model import Transformer

ALLOW_LOCAL = "KIMI_ALLOW_LOCAL_OPTIMIZER"  # the opt-in, spelled out: users type this name
# Planted beside the run: importing it writes a marker, so a refused name must leave no marker behind.
EVIL = """
import pathlib
import torch

pathlib.Path(__file__).with_name("imported.marker").write_text("ran")


class Opt(torch.optim.SGD):
    pass
"""


def test_build_registry_and_dotted_paths():
    model = Transformer(preset("tiny"))
    assert isinstance(optim.build("adamw", model, lr=1e-3), torch.optim.AdamW)
    assert type(optim.build("muon", model, lr=1e-3, ns_steps=4)) is optim.Muon
    clip = optim.build("muonclip", model, lr=1e-3, qk_clip_tau=30.0)
    assert isinstance(clip, optim.MuonClip) and clip.qk_clip.tau == 30.0
    assert all(a.record_max_logits for a in model.attentions())
    sgd = optim.build("torch.optim.SGD", model, lr=0.1, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="unknown key 'qk_clip_tau' for optimizer = 'muon'; valid keys: lr, "):
        optim.build("muon", model, qk_clip_tau=100.0)
    with pytest.raises(ValueError, match="optimizer = 'lion' is not a registry name; valid: adamw, muon, muonclip"):
        optim.build("lion", model)
    with pytest.raises(ValueError, match=r"optimizer = 'torch.nn.Linear' is <class .*Linear'>, not a torch.optim.Optimizer"):
        optim.build("torch.nn.Linear", model)


@pytest.mark.parametrize(
    "name, cfg, message",
    [
        ("nope", {}, r"optimizer = 'nope' is not a registry name; valid: adamw, muon, muonclip, or a dotted path"),
        ("adamw", {"bogus": 1}, r"unknown key 'bogus' for optimizer = 'adamw'; valid keys: lr, weight_decay, betas, eps"),
        ("muonclip", {"qk_clip_taus": 1.0}, r"unknown key 'qk_clip_taus' for optimizer = 'muonclip'; valid keys: .*qk_clip_tau"),
        ("torch.optim.SGD", {"betas": (0.9, 0.9)}, r"unknown key 'betas' for optimizer = 'torch.optim.SGD'; valid keys: lr, momentum"),
        ("torch.optim.Nope", {}, r"optimizer = 'torch.optim.Nope' could not be imported: .*Nope"),
        ("no_such_package_xyz.Opt", {}, r"optimizer = 'no_such_package_xyz.Opt' could not be imported: No module named"),
        ("torch..SGD", {}, r"optimizer = 'torch..SGD' is not a dotted path of Python names"),
        ("torch.optim.", {}, r"optimizer = 'torch.optim.' is not a dotted path"),
    ],
)
def test_check_without_a_model_names_the_problem(name, cfg, message):
    with pytest.raises(ValueError, match=message):
        optim.check(name, **cfg)


def test_check_accepts_what_build_builds():
    optim.check("adamw", lr=1e-3, weight_decay=0.1)
    optim.check("muonclip", lr=1e-3, qk_clip_tau=30.0)
    optim.check("torch.optim.SGD", lr=0.1, momentum=0.9)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A directory holding evil.py, made the current directory and (as '' is for `python -c`) on sys.path."""
    (tmp_path / "evil.py").write_text(EVIL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_LOCAL, raising=False)
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("evil", None)


@pytest.mark.parametrize("entry", ["cwd", "empty"])
def test_a_module_in_the_current_directory_is_refused_without_being_imported(planted, monkeypatch, entry):
    if entry == "empty":  # '' on sys.path, as `python -c` and the REPL have it, instead of the full path
        monkeypatch.setattr(sys, "path", ["" if p == str(planted) else p for p in sys.path])
    model = Transformer(preset("tiny"))
    for call in (lambda: optim.build("evil.Opt", model, lr=0.1), lambda: optim.check("evil.Opt", lr=0.1)):
        with pytest.raises(ValueError, match=rf"optimizer = 'evil.Opt': module 'evil' would be imported from .*evil.py, "
                                             rf"inside the current or the script's directory.*{ALLOW_LOCAL}=1"):
            call()
    assert not (planted / "imported.marker").exists()
    assert "evil" not in sys.modules
    # torch's own classes stay allowed from the same directory.
    assert isinstance(optim.build("torch.optim.SGD", model, lr=0.1), torch.optim.SGD)


def test_a_local_package_folder_is_refused_too(planted):
    (planted / "evilpkg").mkdir()  # a namespace package: no __init__.py, no origin, only a search location
    (planted / "evilpkg" / "opt.py").write_text(EVIL)
    importlib.invalidate_caches()
    with pytest.raises(ValueError, match=r"optimizer = 'evilpkg.opt.Opt': module 'evilpkg' would be imported from"):
        optim.check("evilpkg.opt.Opt")
    assert not (planted / "evilpkg" / "imported.marker").exists()


def test_the_opt_in_imports_a_local_module(planted, monkeypatch):
    monkeypatch.setenv(ALLOW_LOCAL, "1")
    opt = optim.build("evil.Opt", Transformer(preset("tiny")), lr=0.1)
    assert type(opt).__name__ == "Opt" and isinstance(opt, torch.optim.SGD)
    assert (planted / "imported.marker").read_text() == "ran"


def test_an_installed_package_outside_the_current_directory_is_allowed(planted):
    # `pytest` itself is installed in site-packages; its Optimizer check, not the location rule, refuses it.
    with pytest.raises(ValueError, match=r"optimizer = 'pytest.raises' is <function raises"):
        optim.check("pytest.raises")
