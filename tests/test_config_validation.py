"""TrainConfig from files and flags: every bad input is a ConfigError naming the field, the value and
what is valid, before any work; never a traceback. Only configs are built here, nothing trains."""

import dataclasses
import math
import re
import typing

import pytest
import yaml

import moe.config
from launch.config.training import TrainConfig, parse_args, parse_overrides
from launch.data.build import DataConfig
from launch.train import main
from moe.config import ConfigError, ModelConfig, from_dict


def refused(argv: list[str], fragment: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    message = str(err.value)
    assert fragment in message, message
    return message


def write(tmp_path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# --- non-finite numbers ---------------------------------------------------------------------------

# Every float field of every section, taken from the annotations so a new float field is covered too.
FLOAT_FLAGS = (
    [f"--{name.replace('_', '-')}" for name, hint in typing.get_type_hints(TrainConfig).items() if hint is float]
    + [f"--model.{name}" for name, hint in typing.get_type_hints(ModelConfig).items() if hint is float]
    + [f"--data.{name}" for name, hint in typing.get_type_hints(DataConfig).items() if hint is float]
)


def test_the_float_flags_are_the_ones_we_mean():
    assert set(FLOAT_FLAGS) >= {"--lr", "--weight-decay", "--min-lr-ratio", "--grad-clip", "--dist-timeout-s",
                                "--model.rms_norm_eps", "--model.routed_scaling_factor", "--model.rope_theta",
                                "--model.bias_update_speed", "--model.seq_aux_loss_coef", "--model.init_std",
                                "--data.val_fraction"}


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e999"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_non_finite_float_flags_are_refused(flag, value):
    # FLAG=VALUE: argparse would take a separate `-.inf` for a flag of its own.
    refused([f"{flag}={value}"], f"{flag} = ")
    refused([f"{flag}={value}"], "must be a finite number")


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("nan.yaml", "lr: .nan\n", "TrainConfig.lr = nan must be a finite number"),
        ("inf.yaml", "grad_clip: .inf\n", "TrainConfig.grad_clip = inf must be a finite number"),
        ("model.yaml", "model: {preset: tiny, rms_norm_eps: .NaN}\n", "model.rms_norm_eps = nan must be a finite number"),
        ("data.yaml", "data: {val_fraction: .nan}\n", "DataConfig.val_fraction = nan must be a finite number"),
        ("nan.toml", "min_lr_ratio = nan\n", "TrainConfig.min_lr_ratio = nan must be a finite number"),
        ("model.toml", "[model]\nrope_theta = -inf\n", "model.rope_theta = -inf must be a finite number"),
        ("quoted.yaml", "weight_decay: 'nan'\n", "TrainConfig.weight_decay = nan must be a finite number"),
        ("bigint.yaml", "dist_timeout_s: " + "9" * 400 + "\n", "must be a finite number"),
    ],
)
def test_non_finite_floats_in_files_are_refused(tmp_path, name, text, fragment):
    refused(["--config", write(tmp_path, name, text)], fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        ("{qk_clip_tau: .nan}", "optimizer_args.qk_clip_tau = nan must be a finite number"),
        ("{betas: [0.9, .nan]}", "optimizer_args.betas = [0.9, nan] must be made of finite numbers"),
        ("{momentum: {inner: .inf}}", "optimizer_args.momentum = {'inner': inf} must be made of finite numbers"),
    ],
)
def test_non_finite_optimizer_args_are_refused(args, fragment):
    refused(["--optimizer-args", args], fragment)


def test_a_nan_built_in_python_is_refused_too():
    with pytest.raises(ConfigError, match=r"TrainConfig.lr = nan must be a finite number"):
        TrainConfig(lr=math.nan)
    with pytest.raises(ConfigError, match=r"DataConfig.val_fraction = nan must be a finite number"):
        DataConfig(val_fraction=math.nan)


# --- YAML 1.2 floats --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, lr",
    [("1e-3", 1e-3), ("1E-3", 1e-3), (".5e-2", 0.005), ("5e-4", 5e-4), ("+2e-1", 0.2), ("3.0e-3", 3e-3), ("1", 1.0)],
)
def test_exponent_floats_are_numbers_in_flags_and_files(tmp_path, text, lr):
    # YAML 1.1 (PyYAML) reads `1e-3`, with no dot, as a string; the docs and users mean a number.
    assert parse_args(["--lr", text]).lr == lr
    assert parse_args(["--config", write(tmp_path, "lr.yaml", f"lr: {text}\n")]).lr == lr
    assert type(parse_args(["--lr", text]).lr) is float


def test_exponent_floats_in_sections_and_optimizer_args(tmp_path):
    path = write(tmp_path, "run.yaml", "model: {preset: tiny, routed_scaling_factor: 25e-1}\noptimizer_args: {eps: 1e-8}\n")
    cfg = parse_args(["--config", path, "--data.val_fraction", "5e-2"])
    assert (cfg.model["routed_scaling_factor"], cfg.optimizer_args, cfg.data.val_fraction) == (2.5, {"eps": 1e-8}, 0.05)
    assert parse_args(["--optimizer-args", "{eps: 1E-8}"]).optimizer_args == {"eps": 1e-8}
    # A quoted number, or a TOML string, in a float field is that float; ints stay strict.
    assert parse_args(["--config", write(tmp_path, "q.toml", 'lr = "1e-3"\n')]).lr == 1e-3
    refused(["--steps", "1e3"], "--steps = 1000.0 has type float; expected int")
    # Strings that are not numbers stay strings: version-like, and any value of a str field.
    assert parse_args(["--out-dir", "1e3"]).out_dir == "1e3"
    assert parse_args(["--config", write(tmp_path, "v.yaml", "out_dir: 1.2.3\n")]).out_dir == "1.2.3"


# --- duplicate keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, fragment",
    [
        ("lr: 1.0e-3\nsteps: 5\nlr: 2.0e-3\n", "at line 3, column 1: duplicate key 'lr' (first at line 1)"),
        ("model:\n  preset: tiny\n  num_layers: 2\n  num_layers: 3\n", "at line 4, column 3: duplicate key 'num_layers'"),
        ("optimizer_args: {eps: 1.0e-8, eps: 1.0e-6}\n", "duplicate key 'eps'"),
    ],
)
def test_duplicate_keys_are_refused_with_file_and_line(tmp_path, text, fragment):
    path = write(tmp_path, "dup.yaml", text)
    message = refused(["--config", path], fragment)
    assert f"config file {path!r} is not valid YAML" in message


def test_a_merge_key_may_be_overridden(tmp_path):
    path = write(tmp_path, "merge.yaml", "model: {<<: {preset: tiny, num_layers: 2}, num_layers: 3}\n")
    assert parse_args(["--config", path]).model == {"preset": "tiny", "num_layers": 3}


# --- malformed files and flags ----------------------------------------------------------------------

BAD_FILES = [
    ("list.yaml", "- steps\n- 5\n", "must hold a table of fields, got list"),
    ("scalar.yaml", "3\n", "must hold a table of fields, got int"),
    ("syntax.yaml", "steps: [1\n", "is not valid YAML at line 2, column 1"),
    ("indent.yaml", "steps: 1\n  lr: 2\n", "is not valid YAML at line 2"),
    ("two.yaml", "steps: 1\n---\nsteps: 2\n", "is not valid YAML"),
    ("code.yaml", "lr: !!python/object/apply:os.system [ls]\n", "could not determine a constructor"),
    ("syntax.toml", "steps = \n", "is not valid TOML: Invalid value (at line 1, column 9)"),
    ("latin1.yaml", b"optimizer: adamw # caf\xe9\n", "is not UTF-8 text (byte 22)"),
    ("run.json", '{"steps": 5}', "unsupported extension '.json'; use .yaml, .yml or .toml"),
    ("model3.yaml", "model: 3\n", "section model of config file"),
    ("modellist.yaml", "model: [a]\n", "must be a table of fields, got ['a']"),
    ("data5.yaml", "data: 5\n", "section data of config file"),
    ("preset.yaml", "model: {preset: nonexistent}\n", "unknown model preset 'nonexistent'; valid: tiny, small, k2-2b, kimi-k2"),
    ("preset3.yaml", "model: {preset: 3}\n", "model.preset = 3 must be a preset name; valid: tiny"),
    ("layers.yaml", "model: {num_layers: x}\n", "model.num_layers = 'x' has type str; expected int"),
    ("experts.yaml", "model: {num_experts_per_tok: .nan}\n", "model.num_experts_per_tok = nan has type float; expected int"),
    ("oalist.yaml", "optimizer_args: [1, 2]\n", "TrainConfig.optimizer_args = [1, 2] has type list; expected dict"),
    ("oaint.yaml", "optimizer_args: 5\n", "TrainConfig.optimizer_args = 5 has type int; expected dict"),
    ("oakey.yaml", "optimizer_args: {1: 2}\n", "optimizer_args key 1 is not a keyword-argument name"),
    ("oalr.yaml", "optimizer_args: {lr: 0.1}\n", "optimizer_args.lr = 0.1: set lr as a top-level field (--lr)"),
    ("intkey.yaml", "1: 2\nstpes: 3\n", "unknown key 1 in config file"),
    ("typo.yaml", "stpes: 3\n", "unknown key 'stpes' in config file"),
    ("modelkey.yaml", "model: {preset: tiny, num_expert: 4}\n", "unknown key 'num_expert' in section model of config file"),
    ("datakey.yaml", "data: {vocab: 4}\n", "unknown key 'vocab' in section data of config file"),
    ("resolvedkey.yaml", "resolved_model: {layers: 4}\n", "unknown key 'layers' in section resolved_model"),
    ("resolvedlist.yaml", "resolved_model: [4]\n", "section resolved_model of config file"),
    ("huge.yaml", "steps: 99999999999999999999999999\n", "TrainConfig.steps = 99999999999999999999999999 does not fit in a 64-bit integer"),
    ("hugetext.yaml", "seed: " + "9" * 5000 + "\n", "could not be read: Exceeds the limit (4300 digits)"),
    ("date.yaml", "seed: 2024-01-01\n", "TrainConfig.seed = datetime.date(2024, 1, 1) has type date; expected int"),
    ("resume.yaml", "resume: maybe\n", "TrainConfig.resume = 'maybe' has type str; expected bool"),
    ("range.yaml", "min_lr_ratio: 2\n", "TrainConfig.min_lr_ratio = 2.0 must be in [0, 1]"),
]


@pytest.mark.parametrize("name, text, fragment", BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_bad_config_files_are_named(tmp_path, name, text, fragment):
    refused(["--config", write(tmp_path, name, text)], fragment)


BAD_FLAGS = [
    (["--steps", "abc"], "--steps = 'abc' has type str; expected int"),
    (["--steps", "1.5"], "--steps = 1.5 has type float; expected int"),
    (["--steps", ""], "--steps: could not read ''; expected int"),
    (["--steps"], "argument --steps: expected one argument; see --help"),
    (["--steps", "0"], "TrainConfig.steps = 0 must be > 0"),
    (["--lr", "-1"], "TrainConfig.lr = -1.0 must be >= 0"),
    (["--seed", "1" + "0" * 30], "--seed = 1000000000000000000000000000000 does not fit in a 64-bit integer"),
    (["--model.num_layers"], "--model.num_layers needs a value: --model.num_layers VALUE or --model.num_layers=VALUE"),
    (["--model.num_layers", "[1"], "--model.num_layers '[1' is not valid YAML"),
    (["--model.bogus", "1"], "unknown flag --model.bogus: model has no field 'bogus'; valid: "),
    (["--data.bogus=1"], "unknown flag --data.bogus: data has no field 'bogus'; valid: cache_dir"),
    (["--data.path"], "--data.path needs a value"),
    (["--bogus", "1"], "unrecognized argument '--bogus'; see --help"),
    (["stray"], "unrecognized argument 'stray'; see --help"),
    (["--model"], "argument --model: expected one argument"),
    (["--model", ""], "unknown model preset ''; valid: tiny"),
    (["--resume", "maybe"], "--resume = 'maybe' has type str; expected bool"),
    (["--resume"], "resume = true needs out_dir"),
    (["--local_rank", "x"], "argument --local_rank/--local-rank: invalid int value: 'x'"),
    (["--optimizer-args", "[1, 2]"], "--optimizer-args = [1, 2] has type list; expected dict"),
    (["--optimizer-args", "{a: 1, a: 2}"], "duplicate key 'a'"),
    (["--optimizer-args", "{weight_decay: 0}"], "optimizer_args.weight_decay = 0: set weight_decay as a top-level field"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
]


@pytest.mark.parametrize("argv, fragment", BAD_FLAGS, ids=[" ".join(row[0]) or "empty" for row in BAD_FLAGS])
def test_bad_flags_are_named(argv, fragment):
    refused(argv, fragment)


def test_a_directory_as_config_is_named(tmp_path):
    refused(["--config", str(tmp_path) + "/"], "is a directory; give a .yaml, .yml or .toml file")


@pytest.mark.parametrize("argv", [["--steps", "abc"], ["--model.num_layers"], ["--bogus"], ["--lr", ".nan"]])
def test_the_cli_prints_config_error_and_exits_non_zero(argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("config error: ")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "model:\ndata:\n"])
def test_empty_files_and_sections_are_the_defaults(tmp_path, text):
    cfg = parse_args(["--config", write(tmp_path, "empty.yaml", text)])
    assert cfg.model == {"preset": "small"} and cfg.data == DataConfig() and cfg.steps == 200


# --- a run's own config.yaml ------------------------------------------------------------------------

def saved_run(tmp_path, *flags: str) -> tuple[str, ModelConfig]:
    """config.yaml exactly as launch.train writes it, for a tiny byte-level run (vocab 257)."""
    cfg = parse_args(["--model", "tiny", "--data.tokenizer", "bytes", "--seq-len", "64", "--lr", "1e-3",
                      "--out-dir", str(tmp_path / "run"), *flags])
    model_cfg = cfg.model_config(vocab_size=257)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "resolved_model": vars(model_cfg)}))
    return str(path), model_cfg


def test_a_runs_config_yaml_is_a_valid_config(tmp_path):
    path, model_cfg = saved_run(tmp_path, "--model.num_layers", "3")
    cfg = parse_args(["--config", path])
    assert cfg.model_config(vocab_size=257) == model_cfg and cfg.resolved_model == vars(model_cfg)
    assert (cfg.out_dir, cfg.resume, cfg.lr, cfg.model) == (str(tmp_path / "run"), False, 1e-3, {"preset": "tiny", "num_layers": 3})
    # Written again by the trainer, the file is the same: loading it changes nothing.
    again = yaml.safe_dump({**cfg.to_dict(), "resolved_model": vars(cfg.model_config(vocab_size=257))})
    assert again == (tmp_path / "config.yaml").read_text()
    assert parse_args(["--config", path, "--out-dir", str(tmp_path / "b"), "--resume", "--steps", "9"]).steps == 9


def test_resolved_model_is_the_model_whatever_the_preset_now_says(tmp_path, monkeypatch):
    path, model_cfg = saved_run(tmp_path)
    monkeypatch.setitem(moe.config.PRESETS, "tiny", lambda: ModelConfig(num_layers=4, hidden_size=128))
    assert parse_args(["--model", "tiny"]).model_config(vocab_size=257).num_layers == 4
    assert parse_args(["--config", path]).model_config(vocab_size=257) == model_cfg  # num_layers 2, as trained


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--model.num_layers", "3"], "model.num_layers = 3 contradicts resolved_model.num_layers = 2; "),
        (["--model.vocab_size", "300"], "model.vocab_size = 300 contradicts resolved_model.vocab_size = 257"),
        (["--model", "small"], "--model small: "),
        (["--seq-len", "5000"], "seq_len = 5000 exceeds model.max_seq_len = 4096"),
    ],
)
def test_flags_may_not_contradict_resolved_model(tmp_path, flags, fragment):
    path, _ = saved_run(tmp_path)
    message = refused(["--config", path, *flags], fragment)
    assert "resolved_model" in message or "seq_len" in message
    assert parse_args(["--config", path, "--model", "tiny", "--model.num_layers", "2"]).model["num_layers"] == 2


def test_the_tokenizer_must_fit_resolved_model(tmp_path):
    cfg = parse_args(["--config", saved_run(tmp_path)[0]])
    assert cfg.model_config(vocab_size=200).vocab_size == 257  # a smaller tokenizer fits the saved embedding
    with pytest.raises(ConfigError, match=r"resolved_model.vocab_size = 257 is smaller than the tokenizer's vocabulary \(4096\)"):
        cfg.model_config(vocab_size=4096)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m.pop("num_layers"), "resolved_model lacks num_layers: it is the complete ModelConfig"),
        (lambda m: m.update(rope_theta=math.nan), "resolved_model.rope_theta = nan must be a finite number"),
        (lambda m: m.update(num_layers="2"), "resolved_model.num_layers = '2' has type str; expected int"),
        (lambda m: m.update(num_experts_per_tok=99), "num_experts_per_tok = 99 exceeds num_experts = 8"),
    ],
)
def test_a_damaged_resolved_model_is_named(tmp_path, edit, fragment):
    path, _ = saved_run(tmp_path)
    saved = yaml.safe_load(open(path))
    edit(saved["resolved_model"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    refused(["--config", path], fragment)


# --- parse_overrides and from_dict ------------------------------------------------------------------

def test_parse_overrides_holds_only_what_the_command_gives(tmp_path):
    assert parse_overrides([]) == {}
    path = write(tmp_path, "run.yaml", "lr: 1e-5\nmodel: {preset: tiny}\n")
    argv = ["--config", path, "--model.num_layers", "4", "--data.vocab_size", "512", "--steps", "9", "--data", "corpus.txt"]
    assert parse_overrides(argv) == {
        "lr": 1e-5, "steps": 9, "model": {"preset": "tiny", "num_layers": 4}, "data": {"vocab_size": 512, "path": "corpus.txt"},
    }
    assert parse_overrides(["--lr", "1", "--resume"]) == {"lr": 1.0, "resume": True}
    # parse_args is the defaults plus exactly these.
    assert parse_args(argv) == from_dict(TrainConfig, parse_overrides(argv))
    assert parse_args(["--model.num_layers", "4"]).model == {"preset": "small", "num_layers": 4}
    with pytest.raises(ConfigError, match=r"unknown key 'stpes' in config file"):
        parse_overrides(["--config", write(tmp_path, "typo.yaml", "stpes: 3\n")])


def test_from_dict_builds_a_saved_config_and_refuses_unknown_keys(tmp_path):
    path, model_cfg = saved_run(tmp_path)
    saved = yaml.safe_load(open(path))
    cfg = from_dict(TrainConfig, saved)
    assert cfg.model_config(vocab_size=257) == model_cfg and cfg.data == DataConfig(tokenizer="bytes")
    assert dataclasses.asdict(cfg) == {**saved, "resolved_model": vars(model_cfg)}
    with pytest.raises(ConfigError, match=re.escape("unknown key 'resolved_modle' in TrainConfig; valid keys:")):
        from_dict(TrainConfig, {**saved, "resolved_modle": {}})
