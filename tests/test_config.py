"""ModelConfig: bad input stops with a message naming the field and the value; presets construct."""

import typing

import pytest
import torch

from moe.config import PRESETS, ConfigError, ModelConfig, from_dict, preset
from moe.model import Transformer
from moe.params import count_parameters


def test_unknown_key_from_a_file_table_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'hidden_sise' in ModelConfig; valid keys: .*hidden_size"):
        from_dict(ModelConfig, {"hidden_size": 64, "hidden_sise": 64})


def test_unknown_key_in_preset_overrides_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'num_expert' in model overrides; valid keys: .*num_experts"):
        preset("small", num_expert=16)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"hidden_size": "64"}, r"ModelConfig.hidden_size = '64' has type str; expected int"),
        ({"num_experts": 8.0}, r"ModelConfig.num_experts = 8.0 has type float; expected int"),
        ({"tie_embeddings": "yes"}, r"ModelConfig.tie_embeddings = 'yes' has type str; expected bool"),
        ({"q_lora_rank": "32"}, r"ModelConfig.q_lora_rank = '32' has type str; expected int or None"),
        ({"first_k_dense": True}, r"ModelConfig.first_k_dense = True has type bool; expected int"),
    ],
)
def test_wrong_type_is_named(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, values)


def test_an_int_is_a_fine_float():
    assert from_dict(ModelConfig, {"routed_scaling_factor": 2}).routed_scaling_factor == 2


FLOAT_FIELDS = [name for name, hint in typing.get_type_hints(ModelConfig).items() if hint is float]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", 10**400])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_field_must_be_finite(name, value):
    # NaN compares false with everything, so a `x < 0` range check alone would let it through.
    with pytest.raises(ConfigError, match=rf"ModelConfig.{name} = .* must be a finite number"):
        ModelConfig(**{name: value})


def test_a_string_that_reads_as_a_float_is_that_float():
    cfg = ModelConfig(rope_theta="5e4", rms_norm_eps=" 1e-5 ")
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (50000.0, 1e-5)
    assert type(ModelConfig(routed_scaling_factor=2).routed_scaling_factor) is float
    with pytest.raises(ConfigError, match=r"ModelConfig.rope_theta = 'big' has type str; expected float"):
        ModelConfig(rope_theta="big")
    with pytest.raises(ConfigError, match=r"ModelConfig.num_layers = '2' has type str; expected int"):
        ModelConfig(num_layers="2")  # only float fields read strings


def test_an_int_beyond_64_bits_is_named():
    with pytest.raises(ConfigError, match=r"ModelConfig.vocab_size = 9223372036854775808 does not fit in a 64-bit integer"):
        ModelConfig(vocab_size=2**63)


def test_unknown_keys_that_are_not_strings_are_named():
    # A YAML table may have int or null keys; sorting them with str keys used to raise TypeError.
    with pytest.raises(ConfigError, match=r"unknown key 1 in ModelConfig"):
        from_dict(ModelConfig, {1: 2, "hidden_sise": 3})
    with pytest.raises(ConfigError, match=r"unknown key None in ModelConfig"):
        from_dict(ModelConfig, {None: 2, "hidden_sise": 3})


def test_top_k_larger_than_the_expert_count():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok = 9 exceeds num_experts = 8"):
        ModelConfig(num_experts=8, num_experts_per_tok=9)
    assert ModelConfig(num_experts=8, num_experts_per_tok=8).num_experts_per_tok == 8  # k = E is allowed


def test_heads_that_do_not_divide_hidden_when_head_dims_are_derived():
    with pytest.raises(ConfigError, match=r"num_heads = 7 does not divide hidden_size = 64"):
        ModelConfig(hidden_size=64, num_heads=7, qk_nope_head_dim=None)
    with pytest.raises(ConfigError, match=r"num_heads = 7 does not divide hidden_size = 64"):
        ModelConfig(hidden_size=64, num_heads=7, v_head_dim=None)
    # With both head dims given, nothing is derived and 7 heads are fine.
    assert ModelConfig(hidden_size=64, num_heads=7).qk_head_dim == 16 + 8
    derived = ModelConfig(hidden_size=64, num_heads=4, qk_nope_head_dim=None, v_head_dim=None)
    assert (derived.qk_nope_head_dim, derived.v_head_dim) == (16, 16)


def test_odd_rope_dim():
    with pytest.raises(ConfigError, match=r"qk_rope_head_dim = 7 must be even"):
        ModelConfig(qk_rope_head_dim=7)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_layers", 0, r"num_layers = 0 must be > 0"),
        ("first_k_dense", 3, r"first_k_dense = 3 must be in \[0, num_layers=2\]"),
        ("num_shared_experts", -1, r"num_shared_experts = -1 must be >= 0"),
        ("score_func", "relu", r"score_func = 'relu'; valid: 'sigmoid', 'softmax'"),
        ("q_lora_rank", 0, r"q_lora_rank = 0 must be > 0 or None"),
        ("rope_theta", 0.0, r"ModelConfig.rope_theta = 0.0 must be > 0"),
        ("routed_scaling_factor", -1, r"ModelConfig.routed_scaling_factor = -1.0 must be > 0"),
        ("init_std", -0.1, r"ModelConfig.init_std = -0.1 must be >= 0"),
    ],
)
def test_out_of_range_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny", **{field: value})


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown model preset 'kimi-k3'; valid: tiny, small, k2-2b, kimi-k2"):
        preset("kimi-k3")


# (total, active) parameters in millions, rounded as the preset comments in moe/config.py state them.
PRESET_SIZES_M = {"tiny": (0.18, 0.14), "small": (19.7, 6.0), "k2-2b": (2611.7, 629.9), "kimi-k2": (1026408.2, 32861.5)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_construct_with_their_stated_sizes(name):
    cfg = preset(name)
    assert isinstance(cfg, ModelConfig) and cfg == PRESETS[name]()
    assert preset(name, num_layers=cfg.num_layers + 1).num_layers == cfg.num_layers + 1
    with torch.device("meta"):
        counts = count_parameters(Transformer(cfg))
    total, active = PRESET_SIZES_M[name]
    digits = 2 if name == "tiny" else 1
    assert (round(counts["total"] / 1e6, digits), round(counts["active"] / 1e6, digits)) == (total, active)
