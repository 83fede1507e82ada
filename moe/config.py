"""Model configuration: one typed dataclass, validated on construction, plus named presets.

Field names follow the DeepSeek-V3 / Kimi K2 Hugging Face config where one exists
(`moe/hf.py` maps the rest), so a reader can hold the two side by side.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """Bad configuration: the message names the field, the value and what would be valid."""


def check_field_types(obj) -> None:
    """Reject values whose type does not match the dataclass annotation; store float fields as floats.

    Runs before any other validation so a string where an int belongs fails with a message
    about that field, not with a TypeError deep inside a comparison. Float fields must also be
    finite, so a NaN cannot slip past a range check (it compares false with everything).
    """
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, check_value(getattr(obj, f.name), hints[f.name], f"{type(obj).__name__}.{f.name}"))


def check_value(value, hint, where: str):
    """`value` as the type `hint` annotates, or ConfigError naming `where`, the value and the type.

    A float field takes an int (lr: 1 means 1.0) and a string that `float()` reads (a quoted
    "1e-3", or TOML's strings), and must come out finite; an int field must fit in 64 bits.
    """
    if _accepts(hint, float) and not _accepts(hint, int) and not isinstance(value, bool):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass  # reported below as a wrong type
        elif isinstance(value, int):
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"{where} = {value} must be a finite number") from None
    if not _matches(value, hint):
        raise ConfigError(
            f"{where} = {value!r} has type {type(value).__name__}; expected {_type_name(hint)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r} must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where} = {value} does not fit in a 64-bit integer; valid: [-2**63, 2**63)")
    return value


def _accepts(hint, kind) -> bool:
    return hint is kind or (_is_union(hint) and kind in typing.get_args(hint))


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if _is_union(hint):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, arg) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:  # an int is a fine float (lr: 1 means 1.0), a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) not in (list, tuple, dict):
        return " or ".join(_type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "None")


def from_dict(cls, values: dict, where: str = ""):
    """Build dataclass `cls` from a plain dict (a YAML/TOML table), rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__} must be a table of fields, got {values!r}")
    check_keys(values, {f.name for f in fields(cls)}, where or cls.__name__)
    return cls(**values)


def check_keys(values: dict, known, where: str) -> None:
    """ConfigError naming the first key of `values` not in `known`, and the valid ones."""
    unknown = sorted(set(values) - set(known), key=str)  # key=str: a YAML key may be 1 or null
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(sorted(known))}")


def doc_field(default, doc: str):
    """A dataclass field with a one-line `doc`: its flag's --help text, printed with the default, so
    the two cannot drift apart (launch/config/cli_help.py). A dict or list default is copied per instance."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """A DeepSeek-V3-architecture MoE transformer. Dimension letters used across `moe/`:
    D hidden, H heads, E routed experts, K experts per token, F expert FFN width, V vocab."""

    vocab_size: int = doc_field(512, "token ids 0..V-1 (launch.train sets it to its tokenizer's vocabulary unless given)")
    hidden_size: int = doc_field(64, "model width D")
    num_layers: int = doc_field(2, "transformer blocks")
    num_heads: int = doc_field(4, "attention heads H")
    # Multi-head latent attention (DeepSeek-V2 §2.1). Head dims left as None are derived as
    # hidden_size // num_heads (then num_heads must divide it).
    q_lora_rank: int | None = doc_field(32, "rank of MLA's query compression; None: queries projected directly")
    kv_lora_rank: int = doc_field(32, "rank of MLA's compressed key-value latent")
    qk_nope_head_dim: int | None = doc_field(16, "query/key dims per head without RoPE; None: hidden_size // num_heads")
    qk_rope_head_dim: int = doc_field(8, "query/key dims per head that carry RoPE (even)")
    v_head_dim: int | None = doc_field(16, "value dims per head; None: hidden_size // num_heads")
    # Feed-forward: the first `first_k_dense` layers are dense SwiGLU, the rest MoE.
    intermediate_size: int = doc_field(128, "FFN width of the dense layers")
    moe_intermediate_size: int = doc_field(32, "FFN width F of each routed and shared expert")
    num_experts: int = doc_field(8, "routed experts E per MoE layer")
    num_experts_per_tok: int = doc_field(2, "routed experts K per token (top-k)")
    num_shared_experts: int = doc_field(1, "experts every token goes through beside its K routed ones")
    first_k_dense: int = doc_field(1, "leading layers that are dense SwiGLU; the rest are MoE")
    routed_scaling_factor: float = doc_field(1.0, "scale of the routed experts' gate weights")
    # Router (DeepSeek-V3 §2.1.2).
    score_func: str = doc_field("sigmoid", "router scores: sigmoid (K2's) or softmax (for router ablations)")
    bias_update_speed: float = doc_field(1e-3, "aux-loss-free balancing: bias += speed * sign(mean_load - load) "
                                               "after each step")
    seq_aux_loss_coef: float = doc_field(1e-4, "sequence-wise balance loss coefficient alpha (DeepSeek-V3 eq. 17-20)")
    rope_theta: float = doc_field(10000.0, "RoPE base")
    max_seq_len: int = doc_field(4096, "longest sequence the model takes (training seq_len, prompt + generation)")
    rms_norm_eps: float = doc_field(1e-6, "RMSNorm epsilon")
    init_std: float = doc_field(0.02, "std of the normal initialisation of every matrix")
    tie_embeddings: bool = doc_field(False, "the output head shares the input embedding's weights")

    def __post_init__(self):
        check_field_types(self)
        if self.qk_nope_head_dim is None or self.v_head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"num_heads = {self.num_heads} does not divide hidden_size = {self.hidden_size}; "
                    "head dims left unset are derived as hidden_size // num_heads"
                )
            derived = self.hidden_size // self.num_heads
            if self.qk_nope_head_dim is None:
                self.qk_nope_head_dim = derived
            if self.v_head_dim is None:
                self.v_head_dim = derived
        positive = [
            "vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
            "num_experts", "num_experts_per_tok", "max_seq_len",
        ]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"ModelConfig.{name} = {getattr(self, name)} must be > 0")
        if self.q_lora_rank is not None and not self.q_lora_rank > 0:
            raise ConfigError(f"ModelConfig.q_lora_rank = {self.q_lora_rank} must be > 0 or None")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"ModelConfig.qk_rope_head_dim = {self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if not self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"ModelConfig.num_experts_per_tok = {self.num_experts_per_tok} exceeds "
                f"num_experts = {self.num_experts}; top-k needs k <= E"
            )
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ConfigError(f"ModelConfig.first_k_dense = {self.first_k_dense} must be in [0, num_layers={self.num_layers}]")
        if not self.num_shared_experts >= 0:
            raise ConfigError(f"ModelConfig.num_shared_experts = {self.num_shared_experts} must be >= 0")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"ModelConfig.score_func = {self.score_func!r}; valid: 'sigmoid', 'softmax'")
        for name in ("bias_update_speed", "seq_aux_loss_coef", "rms_norm_eps", "init_std"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"ModelConfig.{name} = {getattr(self, name)} must be >= 0")
        for name in ("routed_scaling_factor", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ModelConfig.{name} = {getattr(self, name)} must be > 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense


def _tiny() -> ModelConfig:
    """Unit-test size: every code path (dense layer, MoE layer, MLA with q-LoRA) in well under a second."""
    return ModelConfig()


def _small() -> ModelConfig:
    """The CPU demo: ~19.7M total, ~6.0M active; trains visibly in minutes on 2 cores."""
    return ModelConfig(
        vocab_size=4096, hidden_size=256, num_layers=6, num_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=768,
        moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4, num_shared_experts=1,
        first_k_dense=1, routed_scaling_factor=2.0, max_seq_len=1024,
    )


def _k2_2b() -> ModelConfig:
    """One 80 GB GPU: ~2.6B total, ~0.63B active, 8 of 64 experts active (K2: 8 of 384)."""
    return ModelConfig(
        vocab_size=65536, hidden_size=1536, num_layers=16, num_heads=12, q_lora_rank=512, kv_lora_rank=256,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=4096,
        moe_intermediate_size=512, num_experts=64, num_experts_per_tok=8, num_shared_experts=1,
        first_k_dense=1, routed_scaling_factor=2.5, rope_theta=50000.0, max_seq_len=4096,
    )


def _kimi_k2() -> ModelConfig:
    """The published Kimi K2 shape (Kimi K2 tech report, Table 2; HF config of moonshotai/Kimi-K2-Base)."""
    return ModelConfig(
        vocab_size=163840, hidden_size=7168, num_layers=61, num_heads=64, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=18432,
        moe_intermediate_size=2048, num_experts=384, num_experts_per_tok=8, num_shared_experts=1,
        first_k_dense=1, routed_scaling_factor=2.827, rope_theta=50000.0, max_seq_len=131072,
    )


# Each preset's docstring is its line in --help.
PRESETS = {"tiny": _tiny, "small": _small, "k2-2b": _k2_2b, "kimi-k2": _kimi_k2}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset with optional field overrides, e.g. `preset("small", num_layers=4)`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
    base = dataclasses.asdict(PRESETS[name]())
    check_keys(overrides, base, "model overrides")
    base.update(overrides)
    return ModelConfig(**base)
