"""Weight and config exchange with Hugging Face transformers' DeepseekV3ForCausalLM.

Our module names are HF's without the "model." prefix (see moe/model.py), and our routed experts
use the layout transformers 5 holds in memory: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows,
then up rows) and `mlp.experts.down_proj` [E, D, F]. So an export is a prefix rename.

transformers 5 *saves* experts in the older per-expert layout (`mlp.experts.{e}.gate_proj.weight`,
...) and its loader (conversion_mapping.py, the "qwen2_moe" entry that deepseek_v3 points to) stacks
those back on load; keys already in the stacked layout match no conversion pattern and load as they
are. We write the stacked layout, and read through transformers' loader, so both layouts import.
A tool that reads only the per-expert layout gets it from transformers: load, then save_pretrained.

Import from a directory is strict, because transformers is not: it fills a tensor missing from the
checkpoint randomly and a field missing from config.json with DeepseekV3Config's defaults (61
layers). So config.json is read as JSON first, and every tensor name and shape in the safetensors
headers is compared with what the config describes, in either expert layout, before anything loads.

A process that holds only part of the model (a pipeline stage, a slice of the experts) reads that
part alone with `load_hf_part`, straight from the safetensors files (either expert layout), after the
same checks (`read_hf_config`); tests/test_hf_part.py holds it to import_hf's result.

Kimi K2's routing is DeepSeek-V3's with a single expert group, so n_group = topk_group = 1.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from moe.config import ConfigError, ModelConfig
from moe.model import Transformer
from moe.params import model_tensors

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


def to_hf_config(cfg: ModelConfig, token_ids: dict | None = None) -> DeepseekV3Config:
    """The DeepseekV3Config that builds the same network as `cfg`; `token_ids` (bos/eos/pad_token_id
    of the run's tokenizer) replace transformers' defaults, which name ids our tokenizer gives other meanings.

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
        **(token_ids or {}),
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


def check_export_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """`out_dir` as a Path if export_hf may write there; FileExistsError saying why not otherwise.
    Callers with slow work before the export (consolidating a checkpoint) check first."""
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
    return out


def export_hf(model: Transformer, out_dir: str | os.PathLike, overwrite: bool = False, token_ids: dict | None = None) -> Path:
    """Write config.json + model.safetensors that DeepseekV3ForCausalLM.from_pretrained(out_dir) loads.

    Refuses a non-empty existing directory unless overwrite=True: a user's saved files are never
    replaced silently.
    """
    out = check_export_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = to_hf_config(model.cfg, token_ids)
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


def _non_finite(value, name=""):
    """The dotted names of the NaN / +-Infinity floats in a parsed JSON value (json reads NaN, Infinity, 1e999)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{name}.{key}" if name else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{name}[{i}]")


def _check_config_file(file: Path) -> None:
    """Refuse a config.json that is not a DeepseekV3ForCausalLM's or that lacks a field ModelConfig takes from it."""
    raw = json.loads(file.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object of DeepseekV3Config fields")
    for name, value in _non_finite(raw):
        raise ConfigError(f"{file}: {name} = {value} is not a finite number")
    if raw.get("model_type") != "deepseek_v3":
        raise ConfigError(f"{file}: model_type = {raw.get('model_type')!r}; valid: 'deepseek_v3'")
    if raw.get("architectures") not in (None, ["DeepseekV3ForCausalLM"]):
        raise ConfigError(f"{file}: architectures = {raw['architectures']!r}; valid: ['DeepseekV3ForCausalLM']")
    missing = [name for name in _FIELDS.values() if name not in raw]
    # transformers 5 writes rope_parameters.rope_theta; older configs a top-level rope_theta (and
    # rope_scaling for rope_parameters), which transformers still reads.
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if "rope_theta" not in raw and "rope_theta" not in rope:
        missing.append("rope_parameters.rope_theta")
    if missing:
        raise ConfigError(
            f"{file} lacks {', '.join(missing)}; transformers would fill them with DeepseekV3Config's "
            "defaults (a 61-layer DeepSeek-V3), so write them into config.json"
        )


def _checkpoint_tensors(root: Path) -> tuple[Path, dict[str, tuple[tuple[int, ...], str]]]:
    """The checkpoint's weights file (or shard index) and name -> (shape, file) of every tensor it holds,
    read from the safetensors headers."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").exists():
        index, files = root / "model.safetensors", ["model.safetensors"]
    else:
        raise FileNotFoundError(f"import_hf: {str(root)!r} holds neither model.safetensors nor model.safetensors.index.json")
    found = {}
    for file in files:
        with safe_open(root / file, "pt") as f:
            for name in f.keys():
                found[name] = (tuple(f.get_slice(name).get_shape()), file)
    return index, found


def _per_expert(name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The tensors transformers' save_pretrained writes for stacked `name`: one [out, in] weight per expert."""
    prefix, kind = name.rsplit(".", 1)
    E, rows, cols = shape
    if kind == "gate_up_proj":  # [E, 2F, D]: gate rows, then up rows
        return {f"{prefix}.{e}.{w}.weight": (rows // 2, cols) for e in range(E) for w in ("gate_proj", "up_proj")}
    return {f"{prefix}.{e}.down_proj.weight": (rows, cols) for e in range(E)}  # down_proj [E, D, F]


def _listed(names: list[str], most: int = 5) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _check_tensors(root: Path, hf_cfg: DeepseekV3Config, cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose tensors are not exactly those of `cfg`, naming the differences and files."""
    source, found = _checkpoint_tensors(root)
    with torch.device("meta"):
        stacked = {name: tuple(t.shape) for name, t in _hf_state_dict(Transformer(cfg)).items()}
    expected = {}
    for name, shape in stacked.items():
        split = _per_expert(name, shape) if name.endswith((".experts.gate_up_proj", ".experts.down_proj")) else {}
        expected.update(split if name not in found and any(k in found for k in split) else {name: shape})
    # Multi-token-prediction layers follow the last layer (model.layers.61.* in DeepSeek-V3 and Kimi
    # K2); they are not part of the main network and are dropped, as from_hf_config says.
    last = cfg.num_layers + (hf_cfg.num_mtp_layers or 0)
    mtp = tuple(f"{_PREFIX}layers.{i}." for i in range(cfg.num_layers, last))
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(f"{k} (in {found[k][1]})" for k in set(found) - set(expected) if not k.startswith(mtp))
    mismatched = sorted(
        f"{k} {list(found[k][0])} in {found[k][1]}, expected {list(expected[k])}"
        for k in set(found) & set(expected) if found[k][0] != expected[k]
    )
    problems = [
        f"{len(names)} {what}: {_listed(names)}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched))
        if names
    ]
    if problems:
        raise ValueError(
            f"import_hf: the tensors of {str(source)!r} do not match {str(root / 'config.json')!r}: " + "; ".join(problems)
        )


def _load_checkpoint(path: Path) -> DeepseekV3ForCausalLM:
    """The DeepseekV3ForCausalLM of a checkpoint directory that passes both checks, in fp32."""
    if not path.is_dir():
        raise FileNotFoundError(f"import_hf: {str(path)!r} is not a checkpoint directory (config.json + safetensors)")
    _check_config_file(path / "config.json")
    hf_cfg = DeepseekV3Config.from_pretrained(path)
    _check_tensors(path, hf_cfg, from_hf_config(hf_cfg))
    hf_model, info = DeepseekV3ForCausalLM.from_pretrained(path, config=hf_cfg, dtype=torch.float32, output_loading_info=True)
    # Our header check and transformers' key conversion must agree; should a transformers release
    # map names differently, fail here rather than run on randomly initialised weights.
    left_random = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if left_random:
        raise ValueError(f"import_hf: transformers left {_listed(left_random)} of {str(path)!r} unloaded")
    return hf_model


def import_hf(path_or_hf_model: str | os.PathLike | DeepseekV3ForCausalLM) -> Transformer:
    """A Transformer (fp32, on the CPU) holding the weights of an HF DeepseekV3ForCausalLM or checkpoint directory.

    A directory is checked (module docstring), then read through transformers' own loader, so
    checkpoints with per-expert keys (what transformers' save_pretrained writes) and with stacked
    keys (what export_hf writes) both work.
    """
    hf_model = path_or_hf_model
    if not isinstance(hf_model, DeepseekV3ForCausalLM):
        hf_model = _load_checkpoint(Path(path_or_hf_model))
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


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the HF checkpoint directory `path`, its config.json and tensor headers
    checked as import_hf checks them; no weight is read."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"import_hf: {str(path)!r} is not a checkpoint directory (config.json + safetensors)")
    _check_config_file(path / "config.json")
    hf_cfg = DeepseekV3Config.from_pretrained(path)
    cfg = from_hf_config(hf_cfg)
    _check_tensors(path, hf_cfg, cfg)
    return cfg


def load_hf_part(module: torch.nn.Module, path: str | os.PathLike, cfg: ModelConfig) -> None:
    """Fill `module`, a Transformer of `cfg` or a part of one under the Transformer's own names (a
    pipeline stage; a slice of the experts says its first global expert by `first_expert`), from the
    HF directory `path`, reading from its safetensors only the tensors, and the expert rows, the
    module holds. `cfg` is read_hf_config(path): the directory has passed its checks, which are not
    repeated here. Either expert layout (stacked or per-expert) reads; import_hf is the reference
    (tests/test_hf_part.py)."""
    path = Path(path)
    _, found = _checkpoint_tensors(path)
    files: dict[str, object] = {}

    def read(hf_name: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        file = found[hf_name][1]
        if file not in files:
            files[file] = safe_open(path / file, "pt")
        piece = files[file].get_slice(hf_name)
        return piece[lo:hi] if lo is not None else piece[:]

    first = {prefix: m.first_expert for prefix, m in module.named_modules()
             if hasattr(m, "gate_up_proj") and hasattr(m, "first_expert")}
    with torch.no_grad():
        for name, tensor in model_tensors(module):
            hf_name = _HEAD if name == _HEAD else _PREFIX + name
            if name == _HEAD and cfg.tie_embeddings:  # HF saves a tied head only as the embedding
                hf_name = _PREFIX + "embed_tokens.weight"
            owner, _, kind = name.rpartition(".")
            if owner not in first:
                tensor.copy_(read(hf_name))
                continue
            lo = first[owner]
            if hf_name in found:  # stacked [E, ...]: this module's rows
                tensor.copy_(read(hf_name, lo, lo + tensor.shape[0]))
                continue
            for i in range(tensor.shape[0]):  # per-expert: experts lo, lo + 1, ...
                expert = f"{_PREFIX}{owner}.{lo + i}."
                if kind == "gate_up_proj":  # gate's rows, then up's
                    tensor[i].copy_(torch.cat([read(expert + "gate_proj.weight"), read(expert + "up_proj.weight")]))
                else:
                    tensor[i].copy_(read(expert + "down_proj.weight"))
