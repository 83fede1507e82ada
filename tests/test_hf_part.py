"""moe/hf.py's load_hf_part: a pipeline stage or an expert-parallel slice reads only its own tensors
(and expert rows) from a Hugging Face directory. Reference: import_hf, which reads the whole model
through transformers' own loader; every tensor the part holds must equal the same rows of it."""

import pytest
import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import moe.model
from moe.config import preset
from moe.hf import export_hf, import_hf, load_hf_part, read_hf_config
from moe.model import Transformer, materialize
from moe.moe import RoutedExperts


def _hf_dir(tmp_path, layout):
    """A random model saved by transformers (per-expert, one file or several) or by export_hf (stacked)."""
    torch.manual_seed(11)
    if layout == "stacked":
        model = Transformer(preset("tiny", num_layers=3, tie_embeddings=True))
        with torch.no_grad():
            for router in model.routers():
                router.e_score_correction_bias.normal_(0.0, 0.1)  # not zeros: a bias read from the wrong place shows
        return export_hf(model, tmp_path / "hf")
    cfg = DeepseekV3Config(
        vocab_size=300, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=6, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        kv_lora_rank=20, q_lora_rank=28, qk_rope_head_dim=8, v_head_dim=10, qk_nope_head_dim=6, n_group=1,
        topk_group=1, first_k_dense_replace=1, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, num_mtp_layers=0)
    hf = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for module in hf.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB" if layout == "sharded" else "50GB")
    return tmp_path / "hf"


def _part(cfg, blocks, ep_size, ep_rank, head, load=None):
    """What a rank holds: blocks `blocks` (full-model names), each MoE block's experts cut to
    1/ep_size, the head if `head`; built on meta, then materialized (and filled by `load`)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    part = nn.Module()
    part.layers = nn.ModuleDict({str(i): model.layers[i] for i in blocks})
    if head:
        part.norm, part.lm_head = model.norm, model.lm_head
    for block in part.layers.values():
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, RoutedExperts):
            E, twoF, D = experts.gate_up_proj.shape
            with torch.device("meta"):
                local = RoutedExperts(E // ep_size, D, twoF // 2)
            local.first_expert = ep_rank * (E // ep_size)
            block.mlp.experts = local
    return materialize(part, torch.device("cpu"), model.init_seed, cfg.init_std, load=load)


def _assert_rows_of(part, whole, cfg, ep_size, ep_rank):
    """Every weight and saved buffer of `part` equals the same rows of `whole` (import_hf's model)."""
    reference = {**dict(whole.named_parameters(remove_duplicate=False)), **dict(whole.named_buffers())}
    L = cfg.num_experts // ep_size
    checked = 0
    for name, tensor in (*part.named_parameters(), *part.named_buffers()):
        if name.endswith(("tokens_per_expert_E", "max_logits_H")):  # running statistics, not weights
            continue
        want = reference[name]
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            want = want[ep_rank * L:(ep_rank + 1) * L]
        assert torch.equal(tensor, want), name
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("layout", ["stacked", "per_expert", "sharded"])
@pytest.mark.parametrize("blocks, ep_size, ep_rank, head", [((1, 2), 2, 1, True), ((0, 1), 4, 2, False)])
def test_a_part_reads_the_rows_import_hf_reads(tmp_path, layout, blocks, ep_size, ep_rank, head):
    path = _hf_dir(tmp_path, layout)
    whole = import_hf(path)
    cfg = read_hf_config(path)
    assert cfg == whole.cfg
    part = _part(cfg, blocks, ep_size, ep_rank, head)
    load_hf_part(part, path, cfg)
    _assert_rows_of(part, whole, cfg, ep_size, ep_rank)


@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
def test_a_part_materialized_from_its_source_is_read_not_drawn(tmp_path, monkeypatch, layout):
    # What launch.train does under --pp-size / --ep-size with --init-from: drawing every weight
    # only to overwrite it cost a few seconds per 0.4B parameters on a CPU host.
    path = _hf_dir(tmp_path, layout)
    whole = import_hf(path)
    cfg = read_hf_config(path)
    drawn = []
    monkeypatch.setattr(moe.model, "_normal_", lambda tensor, seed, name, std: drawn.append(name))
    part = _part(cfg, (1, 2), 2, 1, True, load=lambda module: load_hf_part(module, path, cfg))
    assert drawn == []
    _assert_rows_of(part, whole, cfg, 2, 1)
    # What no file holds is still set: the routers' load counts and MLA's running max logits.
    for name, buffer in part.named_buffers():
        if name.endswith("tokens_per_expert_E"):
            assert torch.equal(buffer, torch.zeros_like(buffer)), name
        if name.endswith("max_logits_H"):
            assert torch.isneginf(buffer).all(), name


def test_the_whole_model_loads_as_import_hf_loads_it(tmp_path):
    path = _hf_dir(tmp_path, "per_expert")
    cfg = read_hf_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    materialize(model, torch.device("cpu"), model.init_seed, cfg.init_std)
    load_hf_part(model, path, cfg)
    whole = import_hf(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, whole.eval()(ids).logits)


def test_a_directory_that_does_not_match_its_config_is_refused_before_reading(tmp_path):
    path = _hf_dir(tmp_path, "stacked")
    (path / "model.safetensors").rename(path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors"):
        read_hf_config(path)


def test_part_source_checks_a_hugging_face_directory_without_reading_its_weights(tmp_path):
    from launch.checkpoint.pretrained import part_source
    from moe.config import ConfigError

    path = _hf_dir(tmp_path, "per_expert")
    source = part_source(str(path))
    assert source.kind == "hf" and source.where == path and source.cfg == import_hf(path).cfg
    config = path / "config.json"
    config.write_text(config.read_text().replace('"deepseek_v3"', '"llama"'))
    with pytest.raises(ConfigError, match="model_type = 'llama'"):
        part_source(str(path))
