"""Interop with transformers' DeepseekV3ForCausalLM: config mapping, export, import, parameter counts.

The reference is transformers' own implementation (not written by us): an exported model must load
into it with no missing or unexpected keys and give the same logits, and a random HF model must give
the same logits once imported.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3RMSNorm

from moe.config import PRESETS, ConfigError, ModelConfig, preset
from moe.hf import export_hf, from_hf_config, import_hf, to_hf_config
from moe.model import Transformer
from moe.params import count_parameters

# fp32 on the CPU: the two implementations differ only in summation order.
ATOL = 1e-5

# Each variant changes one thing HF builds differently, on top of the tiny preset (1 dense + 1 MoE layer,
# q-LoRA, 8 experts, top-2, one shared expert).
EXPORT_VARIANTS = {
    "tiny": {},
    "no_q_lora": dict(q_lora_rank=None),  # q_proj instead of q_a_proj / q_a_layernorm / q_b_proj
    "all_moe_3_layers": dict(first_k_dense=0, num_layers=3),  # MoE from layer 0, several MoE layers
    "no_shared_expert": dict(num_shared_experts=0),  # HF still builds a zero-width shared expert
    "two_shared_experts": dict(num_shared_experts=2),  # shared width = 2 * moe_intermediate_size
    "tied_head": dict(tie_embeddings=True),  # lm_head.weight not stored
    # The latent norms keep eps 1e-6 in HF (and DeepSeek's code) whatever rms_norm_eps says.
    "eps_1e-5": dict(rms_norm_eps=1e-5),
    "odd_experts_scaled": dict(num_experts=6, num_experts_per_tok=3, routed_scaling_factor=2.5, rope_theta=50000.0),
}


def _random_model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    for router in model.routers():
        # Sigmoid scores of a fresh router sit near 0.5 +- 0.05; biases of this size change the
        # choice for most tokens, so a bias applied to the wrong scores would show in the logits.
        router.e_score_correction_bias.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(EXPORT_VARIANTS))
def test_export_loads_in_transformers_with_same_logits(tmp_path, variant, attn):
    cfg = preset("tiny", **EXPORT_VARIANTS[variant])
    model = _random_model(cfg, seed=0)
    export_hf(model, tmp_path / "ckpt")

    hf, info = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "ckpt", attn_implementation=attn, dtype=torch.float32, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}, info
    hf.eval()
    for i, layer in enumerate(hf.model.layers):  # the biases arrived, in fp32
        if i >= cfg.first_k_dense:
            assert layer.mlp.gate.e_score_correction_bias.dtype == torch.float32
            assert torch.equal(layer.mlp.gate.e_score_correction_bias, model.layers[i].mlp.gate.e_score_correction_bias)

    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 0.3  # logits of a size where a wrong path would show above ATOL
    assert (ours - theirs).abs().max().item() < ATOL


def test_export_writes_stacked_expert_keys_and_config(tmp_path):
    model = _random_model(preset("tiny"), seed=0)
    export_hf(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.experts.gate_up_proj").shape == (8, 64, 64)  # [E, 2F, D]
    assert "model.layers.1.mlp.experts.down_proj" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert not any(".experts.0." in k for k in keys)
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (written["n_group"], written["topk_group"], written["first_k_dense_replace"]) == (1, 1, 1)
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert written["architectures"] == ["DeepseekV3ForCausalLM"]


def test_export_refuses_a_non_empty_directory(tmp_path):
    model = _random_model(preset("tiny"), seed=0)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="ckpt.*not empty.*overwrite=True"):
        export_hf(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_hf(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def _tiny_hf_config(**overrides) -> DeepseekV3Config:
    values = dict(
        vocab_size=300, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=6, n_shared_experts=1, n_routed_experts=12,
        num_experts_per_tok=3, routed_scaling_factor=2.827, kv_lora_rank=20, q_lora_rank=28, qk_rope_head_dim=8,
        v_head_dim=10, qk_nope_head_dim=6, n_group=1, topk_group=1, first_k_dense_replace=1,
        max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        num_mtp_layers=0,
    )
    values.update(overrides)
    return DeepseekV3Config(**values)


IMPORT_VARIANTS = {
    "kimi_like": {},
    "no_q_lora": dict(q_lora_rank=None),
    "two_shared_all_moe_tied": dict(n_shared_experts=2, first_k_dense_replace=0, tie_word_embeddings=True),
    # Four groups, all kept: HF runs its group-limited code path, which must reduce to plain top-k.
    "void_group_limit": dict(n_group=4, topk_group=4),
    # HF's own default of 3 dense layers on a 3-layer model: no MoE layer at all.
    "dense_past_last_layer": dict(first_k_dense_replace=3),
}


def _random_hf_model(hf_cfg: DeepseekV3Config, seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for module in hf.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.1)
            if isinstance(module, DeepseekV3RMSNorm):
                module.weight.uniform_(0.5, 1.5)  # so a norm weight mapped to the wrong norm shows
    return hf


@pytest.mark.parametrize("variant", list(IMPORT_VARIANTS))
def test_import_random_transformers_model_gives_same_logits(variant):
    hf = _random_hf_model(_tiny_hf_config(**IMPORT_VARIANTS[variant]), seed=3)
    ours = import_hf(hf).eval()
    ids = torch.randint(0, 300, (3, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert a.abs().max() > 0.3
    assert (a - b).abs().max().item() < ATOL


def test_import_reads_transformers_save_pretrained_per_expert_layout(tmp_path):
    hf = _random_hf_model(_tiny_hf_config(), seed=5)
    hf.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        # transformers 5 writes one tensor per expert; import relies on its loader to stack them.
        assert "model.layers.1.mlp.experts.11.gate_proj.weight" in set(f.keys())
    ours = import_hf(tmp_path / "saved").eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() < ATOL


def test_export_then_import_is_exact(tmp_path):
    model = _random_model(preset("tiny", num_shared_experts=0), seed=7)
    export_hf(model, tmp_path / "ckpt")
    back = import_hf(tmp_path / "ckpt")
    assert back.cfg == model.cfg
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)



def _edit_tensors(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(ckpt, edit):
    raw = json.loads((ckpt / "config.json").read_text())
    edit(raw)
    (ckpt / "config.json").write_text(json.dumps(raw))  # NaN and Infinity written as JSON's non-standard literals


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _pop(key):
    return lambda d: d.pop(key)


EXPERTS = "model.layers.1.mlp.experts"
# (layout, edit, message): each leaves a checkpoint transformers loads without an error, filling the
# gap randomly or ignoring the extra tensor, except where it raises without naming the tensor.
BAD_TENSORS = {
    "stacked_gate_up_deleted": ("export_hf", _pop(f"{EXPERTS}.gate_up_proj"), rf"1 missing: {EXPERTS}\.gate_up_proj$"),
    "one_expert_deleted": ("save_pretrained", _pop(f"{EXPERTS}.3.gate_proj.weight"),
                           rf"1 missing: {EXPERTS}\.3\.gate_proj\.weight$"),
    "router_bias_deleted": ("export_hf", _pop("model.layers.1.mlp.gate.e_score_correction_bias"),
                            r"1 missing: model\.layers\.1\.mlp\.gate\.e_score_correction_bias$"),
    "extra_tensor": ("export_hf", _set(f"{EXPERTS}.bias", torch.zeros(8)),
                     rf"1 unexpected: {EXPERTS}\.bias \(in model\.safetensors\)$"),
    # transformers ignores model.layers.61.* (DeepSeek-V3's MTP layer) whatever the model's depth.
    "layer_61_of_2": ("export_hf", _set("model.layers.61.eh_proj.weight", torch.zeros(4, 4)),
                      r"1 unexpected: model\.layers\.61\.eh_proj\.weight"),
    "wrong_shape": ("export_hf", _set(f"{EXPERTS}.gate_up_proj", torch.zeros(8, 64, 32)),
                    rf"1 of the wrong shape: {EXPERTS}\.gate_up_proj \[8, 64, 32\] in model\.safetensors, "
                    r"expected \[8, 64, 64\]$"),
}


def _checkpoint(tmp_path, layout):
    if layout == "export_hf":
        export_hf(_random_model(preset("tiny"), seed=0), tmp_path / "ckpt")
    else:
        hf = _random_hf_model(_tiny_hf_config(), seed=5)
        hf.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_import_refuses_missing_unexpected_and_misshapen_tensors(tmp_path, case):
    layout, edit, message = BAD_TENSORS[case]
    ckpt = _checkpoint(tmp_path, layout)
    _edit_tensors(ckpt / "model.safetensors", edit)
    with pytest.raises(ValueError, match=rf"ckpt/model\.safetensors' do not match '.*ckpt/config\.json': {message}"):
        import_hf(ckpt)


def test_import_checks_every_shard_of_a_sharded_checkpoint(tmp_path):
    hf = _random_hf_model(_tiny_hf_config(), seed=5)
    hf.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (import_hf(tmp_path / "ckpt").eval()(ids).logits - hf(ids).logits).abs().max().item() < ATOL
    name = "model.layers.2.mlp.experts.7.down_proj.weight"
    _edit_tensors(tmp_path / "ckpt" / index[name], _pop(name))
    with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json' do not match .*: 1 missing: {name}$"):
        import_hf(tmp_path / "ckpt")


def test_import_drops_multi_token_prediction_layers_after_the_last(tmp_path):
    model = _random_model(preset("tiny"), seed=0)  # 2 layers: an MTP layer is model.layers.2
    export_hf(model, tmp_path / "ckpt")
    _edit_tensors(tmp_path / "ckpt" / "model.safetensors", _set("model.layers.2.eh_proj.weight", torch.zeros(64, 128)))
    with pytest.raises(ValueError, match=r"1 unexpected: model\.layers\.2\.eh_proj\.weight"):
        import_hf(tmp_path / "ckpt")  # config.json says num_nextn_predict_layers = 0
    _edit_config(tmp_path / "ckpt", _set("num_nextn_predict_layers", 1))
    back = import_hf(tmp_path / "ckpt")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def _set_rope_theta(value):
    return lambda raw: raw["rope_parameters"].__setitem__("rope_theta", value)


BAD_CONFIGS = {
    # transformers would build DeepseekV3Config's 61 layers, 59 of them random.
    "no_num_hidden_layers": (_pop("num_hidden_layers"), r"config\.json lacks num_hidden_layers; .*defaults"),
    "no_rope_theta": (_pop("rope_parameters"), r"config\.json lacks rope_parameters\.rope_theta;"),
    "nan_eps": (_set("rms_norm_eps", float("nan")), r"config\.json: rms_norm_eps = nan is not a finite number"),
    "inf_rope_theta": (_set_rope_theta(float("inf")), r"config\.json: rope_parameters\.rope_theta = inf is not"),
    "llama": (_set("model_type", "llama"), r"config\.json: model_type = 'llama'; valid: 'deepseek_v3'"),
    "classifier": (_set("architectures", ["DeepseekV3ForSequenceClassification"]),
                   r"config\.json: architectures = \['DeepseekV3ForSequenceClassification'\]; valid"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_import_refuses_an_incomplete_or_foreign_config(tmp_path, case):
    edit, message = BAD_CONFIGS[case]
    export_hf(_random_model(preset("tiny"), seed=0), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", edit)
    with pytest.raises(ConfigError, match=rf"ckpt/{message}"):
        import_hf(tmp_path / "ckpt")


def test_import_reads_a_top_level_rope_theta(tmp_path):
    # Configs written before transformers 5 carry rope_theta beside the other fields.
    model = _random_model(preset("tiny", rope_theta=50000.0), seed=0)
    export_hf(model, tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", lambda raw: raw.update(rope_theta=raw.pop("rope_parameters")["rope_theta"]))
    assert import_hf(tmp_path / "ckpt").cfg == model.cfg

@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trips_through_hf(name):
    cfg = preset(name)
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_to_hf_config_rejects_softmax_router():
    with pytest.raises(ConfigError, match=r"score_func = 'softmax'.*valid: 'sigmoid'"):
        to_hf_config(preset("tiny", score_func="softmax"))


UNREPRESENTABLE = [
    (dict(n_group=8, topk_group=4), r"topk_group = 4 with n_group = 8"),
    (dict(n_group=None, topk_group=None), r"n_group = None"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                           "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                           "mscale": 1.0, "mscale_all_dim": 1.0}), r"rope_type'\] = 'yarn'"),
    (dict(attention_bias=True), r"attention_bias = True"),
    (dict(hidden_act="gelu"), r"hidden_act = 'gelu'"),
    (dict(norm_topk_prob=False), r"norm_topk_prob = False"),
    (dict(rope_interleave=False), r"rope_interleave = False"),
    (dict(num_key_value_heads=2), r"num_key_value_heads = 2.*valid: 6"),
    (dict(attention_dropout=0.1), r"attention_dropout = 0.1"),
]


@pytest.mark.parametrize("overrides,message", UNREPRESENTABLE)
def test_from_hf_config_rejects_what_we_cannot_represent(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_config(_tiny_hf_config(**overrides))


def test_kimi_k2_parameter_counts_match_transformers():
    cfg = preset("kimi-k2")
    with torch.device("meta"):
        ours = count_parameters(Transformer(cfg))
        hf = DeepseekV3ForCausalLM(to_hf_config(cfg))
    hf_total = sum(p.numel() for p in hf.parameters())
    # Active per token: all but E - K routed experts in each MoE layer, read off HF's expert modules.
    inactive = 0
    for module in hf.modules():
        if isinstance(module, DeepseekV3Experts):
            E = module.gate_up_proj.shape[0]
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // E
            inactive += (E - hf.config.num_experts_per_tok) * per_expert
    assert ours == {"total": hf_total, "active": hf_total - inactive}
    # The published Kimi K2 figures: 1.04T total (1026.4B), 32B activated (32.86B).
    assert ours == {"total": 1026408209408, "active": 32861477888}
    assert (round(ours["total"] / 1e9, 1), round(ours["active"] / 1e9, 2)) == (1026.4, 32.86)
