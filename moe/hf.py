"""Weight and config exchange with Hugging Face transformers' DeepseekV3ForCausalLM.

Our module names are HF's without the "model." prefix (see moe/model.py), and our routed experts
use the layout transformers 5 holds in memory: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows,
then up rows) and `mlp.experts.down_proj` [E, D, F]. So an export is a prefix rename.

transformers 5 *saves* experts in the older per-expert layout (`mlp.experts.{e}.gate_proj.weight`,
...) and its loader (conversion_mapping.py, the "qwen2_moe" entry that deepseek_v3 points to) stacks
those back on load; keys already in the stacked layout match no conversion pattern and load as they
are. We write the stacked layout, and read through transformers' loader, so both layouts import.
A tool that reads only the per-expert layout gets it from transformers: load, then save_pretrained.

Kimi K2's routing is DeepSeek-V3's with a single expert group, so n_group = topk_group = 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from moe.config import ConfigError, ModelConfig
from moe.model import Transformer

_PREFIX = "model."
_HEAD = "lm_head.weight"


# ModelConfig field -> DeepseekV3Config field, for every field both configs carry.
_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size",
    "num_experts": "n_routed_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "num_shared_experts": "n_shared_experts",
    "first_k_dense": "first_k_dense_replace",
    "routed_scaling_factor": "routed_scaling_factor",
    "max_seq_len": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
    "tie_embeddings": "tie_word_embeddings",
}
_FLOATS = {"routed_scaling_factor", "rms_norm_eps", "init_std"}  # HF's strict config wants 1.0, not 1

# DeepseekV3Config settings our model always has: written on export, required on import.
_FIXED = {
    "norm_topk_prob": True,  # gate weights of the chosen experts renormalised to sum to 1
    "hidden_act": "silu",
    "rope_interleave": True,  # DeepSeek checkpoints pair adjacent RoPE dims; so does moe.layers.apply_rope
    "attention_bias": False,
    "attention_dropout": 0.0,
}


def to_hf_config(cfg: ModelConfig) -> DeepseekV3Config:
    """The DeepseekV3Config that builds the same network as `cfg`.

    Training-only fields (bias_update_speed, seq_aux_loss_coef) have no HF counterpart and are not
    carried; from_hf_config gives them ModelConfig's defaults.
    """
    if cfg.score_func != "sigmoid":
        # HF's DeepseekV3TopkRouter hard-codes sigmoid scores.
        raise ConfigError(f"ModelConfig.score_func = {cfg.score_func!r} has no DeepseekV3 equivalent; valid: 'sigmoid'")
    values = {theirs: getattr(cfg, ours) for ours, theirs in _FIELDS.items()}
    values.update({_FIELDS[name]: float(getattr(cfg, name)) for name in _FLOATS})
    return DeepseekV3Config(
        **values,
        **_FIXED,
        num_key_value_heads=cfg.num_heads,  # MLA: every head has its own key and value
        n_group=1,
        topk_group=1,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        num_mtp_layers=0,  # we train no multi-token-prediction module
        architectures=["DeepseekV3ForCausalLM"],
    )


def from_hf_config(hf_cfg: DeepseekV3Config) -> ModelConfig:
    """The ModelConfig of an HF DeepseekV3 config, or ConfigError naming the field we cannot represent.

    Multi-token-prediction layers (num_nextn_predict_layers) are not part of the main network and
    are dropped; training-only fields take ModelConfig's defaults.
    """
    def field(name):
        return getattr(hf_cfg, name, None)

    def reject(name, valid):
        raise ConfigError(f"DeepseekV3Config.{name} = {field(name)!r} cannot be represented by ModelConfig; valid: {valid}")

    # Group-limited routing keeps the top-k experts of the best topk_group of n_group groups; with
    # every group kept (topk_group == n_group, 1 in Kimi K2) that is plain top-k, which we have.
    if not isinstance(field("n_group"), int) or field("n_group") < 1:
        reject("n_group", "an int >= 1")
    if field("topk_group") != field("n_group"):
        raise ConfigError(
            f"DeepseekV3Config.topk_group = {field('topk_group')!r} with n_group = {field('n_group')!r} is "
            "group-limited routing, which ModelConfig cannot represent; valid: topk_group == n_group (e.g. both 1)"
        )
    rope = field("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"DeepseekV3Config.rope_parameters['rope_type'] = {rope.get('rope_type')!r} cannot be represented by "
            "ModelConfig; valid: 'default' (no RoPE scaling)"
        )
    required = {**_FIXED, "num_key_value_heads": field("num_attention_heads")}
    for name, valid in required.items():
        if field(name) != valid:
            reject(name, repr(valid))
    if field("first_k_dense_replace") is None:
        reject("first_k_dense_replace", "an int >= 0")
    values = {ours: field(theirs) for ours, theirs in _FIELDS.items()}
    # HF builds MoE layers from index first_k_dense_replace on; past the last layer that means none.
    values["first_k_dense"] = min(values["first_k_dense"], values["num_layers"])
    return ModelConfig(**values, rope_theta=float(rope.get("rope_theta", 10000.0)))


def _hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF DeepseekV3ForCausalLM names (tied head left out, as HF saves it)."""
    cfg = model.cfg
    out = {}
    for name, tensor in model.state_dict().items():
        if name == _HEAD:
            if not cfg.tie_embeddings:
                out[_HEAD] = tensor
            continue
        out[_PREFIX + name] = tensor
    if cfg.num_shared_experts == 0:
        # HF always builds a shared expert, of width moe_intermediate_size * 0 when there is none;
        # its empty weights are written so the loader finds every key.
        D, dtype = cfg.hidden_size, model.embed_tokens.weight.dtype
        for layer in range(cfg.first_k_dense, cfg.num_layers):
            p = f"{_PREFIX}layers.{layer}.mlp.shared_experts."
            out[p + "gate_proj.weight"] = torch.empty(0, D, dtype=dtype)
            out[p + "up_proj.weight"] = torch.empty(0, D, dtype=dtype)
            out[p + "down_proj.weight"] = torch.empty(D, 0, dtype=dtype)
    return out


def export_hf(model: Transformer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors that DeepseekV3ForCausalLM.from_pretrained(out_dir) loads.

    Refuses a non-empty existing directory unless overwrite=True: a user's saved files are never
    replaced silently.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export_hf: out_dir = {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export_hf: out_dir = {str(out)!r} is not empty; pass overwrite=True to replace its "
            "config.json and model.safetensors"
        )
    if (out / "model.safetensors.index.json").exists():
        # The loader would follow the index to the old shards and ignore the file we write.
        raise FileExistsError(f"export_hf: {str(out / 'model.safetensors.index.json')!r} exists; remove the old shards first")
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = to_hf_config(model.cfg)
    hf_cfg.dtype = model.embed_tokens.weight.dtype
    tensors = {k: v.detach().contiguous().cpu() for k, v in _hf_state_dict(model).items()}
    # Write beside the target and rename, so an interrupted export never leaves a torn file behind.
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(hf_cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")
    return out


def import_hf(path_or_hf_model: str | os.PathLike | DeepseekV3ForCausalLM) -> Transformer:
    """A Transformer (fp32, on the CPU) holding the weights of an HF DeepseekV3ForCausalLM or checkpoint.

    A path is read through transformers' own loader, so checkpoints with per-expert keys (what
    transformers' save_pretrained writes) and with stacked keys (what export_hf writes) both work.
    """
    hf_model = path_or_hf_model
    if not isinstance(hf_model, DeepseekV3ForCausalLM):
        hf_model = DeepseekV3ForCausalLM.from_pretrained(path_or_hf_model, dtype=torch.float32)
    cfg = from_hf_config(hf_model.config)
    ours = {}
    for name, tensor in hf_model.state_dict().items():
        if name == _HEAD:
            ours[_HEAD] = tensor
        elif name.startswith(_PREFIX):
            if cfg.num_shared_experts == 0 and ".mlp.shared_experts." in name:
                continue  # the zero-width shared expert HF builds when there is none
            ours[name[len(_PREFIX):]] = tensor
        else:
            raise ValueError(f"import_hf: unexpected HF weight {name!r}; expected 'lm_head.weight' or 'model.*'")
    model = Transformer(cfg)
    model.load_state_dict(ours, strict=True)
    return model
