"""QK-clip and MuonClip (Kimi K2 tech report, §2.1 "MuonClip: Stable Training with Weight Clipping").

Shape legend: L attention layers, H heads per layer, N no-RoPE head dim, R RoPE head dim,
Vh value head dim, P rows of one projection weight.

Muon at a high learning rate lets a few heads' pre-softmax logits grow without bound, until the
softmax saturates and the loss spikes. QK-clip caps them after each optimizer step by rescaling the
weights that make them. Let S_h be head h's largest logit scale * q_h.k_h over the step's batches.
Where S_h > tau, gamma_h = tau / S_h and for MLA

    q_nope_h, k_nope_h <- sqrt(gamma_h) * (both),   q_rope_h <- gamma_h * q_rope_h,   k_rope untouched

so q_h.k_h = q_nope.k_nope + q_rope.k_rope shrinks by exactly gamma_h for every token pair, and the
largest one becomes tau. The RoPE key is shared by all heads: scaling it would touch heads under tau,
hence the whole factor goes on the head's own RoPE query. All of these are rows of a projection
weight (see moe/attention.py's layout note), so the clip is a per-row scaling of two weights.

K2's rule (Algorithm 1) takes S_h from the step's forwards, i.e. from the weights *before* the
update, and clips the updated weights: the update itself may have grown the logits further, so a
head can still sit above tau after its clip (by ~2-7% per step at 150x K2's learning rate, measured
by optim.experiments.qk_clip). With `remeasure` (the default) the clip is exact instead: after the
update, one no-grad forward of the step's last micro-batch measures every layer's logits with the
updated weights just before that layer runs, and clips with max(S_h from the step, S_h re-measured).
Layer l is clipped before layer l+1 is measured, so the measured inputs are those of the final
weights: re-running that micro-batch afterwards gives at most tau in every head (up to rounding).
It costs one forward of one micro-batch per optimizer step (1 / (3 * grad_accum) of the step's
forward+backward); `remeasure=False` is K2's rule as published. Under pipeline parallelism only
`remeasure=False` is possible (a re-forward would have to run every stage again): each stage clips its
own layers from its forwards' records, maxed over its data-parallel group (launch/parallel/pipeline.py).

The pieces, for callers that own the weights in another form (launch/ under ZeRO):

    max_LH = reduce_max_logits(attentions, group)     # stacks max_logits_H, all-reduce MAX over group if dist is up
    gamma_LH = clip_factors(max_LH, tau)              # 1 where S_h <= tau
    q_P, kv_P = mla_row_scales(gamma_H, N, R, Vh)     # per-row factors for query_proj / kv_b_proj
    QKClip(model, tau, remeasure, row_scaler)()       # all of the above after an update, records reset

A `row_scaler(param, scale_P)` must scale row p of the weight that the next forward will use, in
the precision it is kept in. The default scales `param.data`; `MuonClip` scales its fp32 master copy
(and re-rounds the parameter). Under ZeRO the master lives in DeepSpeed's partitions, e.g.

    def zero_row_scaler(param, scale_P):
        w = deepspeed.utils.safe_get_full_fp32_param(param)
        deepspeed.utils.safe_set_full_fp32_param(param, scale_rows_(w, scale_P))

Cost: the records are one extra no-grad Q K^T per attention in the forward (moe/attention.py); the
clip is one all-reduce of L*H floats (plus L small ones when re-measuring) and, for clipped layers
only, two row scalings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from optim.muon import Muon, model_param_groups

RowScaler = Callable[[nn.Parameter, torch.Tensor], None]


def clip_factors(max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """gamma = tau / S where S > tau, else 1 (a head never seen, S = -inf, is left alone)."""
    S = max_logits.float()
    return torch.where(S > tau, tau / S, torch.ones_like(S))


def mla_row_scales(gamma_H: torch.Tensor, nope_dim: int, rope_dim: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row factors (q_P [H*(N+R)], kv_P [H*(N+Vh)]) for an MLA's query projection and kv_b_proj.

    Head h's rows: q_nope -> sqrt(gamma_h), q_rope -> gamma_h; k_nope -> sqrt(gamma_h), v -> 1.
    """
    H = gamma_H.numel()
    sqrt_H1 = gamma_H.sqrt()[:, None]
    q_P = torch.cat([sqrt_H1.expand(H, nope_dim), gamma_H[:, None].expand(H, rope_dim)], dim=1).reshape(-1)
    kv_P = torch.cat([sqrt_H1.expand(H, nope_dim), torch.ones_like(sqrt_H1).expand(H, v_dim)], dim=1).reshape(-1)
    return q_P, kv_P


def scale_rows_(weight_PX: torch.Tensor, scale_P: torch.Tensor) -> torch.Tensor:
    """weight[p] *= scale[p] in place, computed in at least fp32 (a bf16 factor is off by up to 0.4%);
    a factor of exactly 1 leaves its row bit-identical. Returns the weight."""
    dtype = torch.promote_types(weight_PX.dtype, torch.float32)
    weight_PX.copy_(weight_PX.to(dtype) * scale_P.to(device=weight_PX.device, dtype=dtype)[:, None])
    return weight_PX


def scale_param_rows_(param: nn.Parameter, scale_P: torch.Tensor) -> None:
    """The default RowScaler: the weights used next step are `param.data` itself."""
    scale_rows_(param.data, scale_P)


def all_reduce_max_(max_logits: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Max over data-parallel ranks, in place, when a process group is initialised (each rank saw
    different batches; all must apply the same clip). `group` None is the default group (all ranks);
    a pipeline stage passes its data-parallel group, the ranks holding the same layers. Returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(max_logits, op=dist.ReduceOp.MAX, group=group)
    return max_logits


def reduce_max_logits(attentions: Sequence[nn.Module], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """max_LH: every layer's recorded per-head max logit, maxed over the data-parallel ranks of `group`."""
    return all_reduce_max_(torch.stack([attn.max_logits_H.float() for attn in attentions]), group)


def clip_layer_(attn: nn.Module, gamma_H: torch.Tensor, row_scaler: RowScaler) -> None:
    """Scale one MLA's query and k_nope rows by the head factors gamma_H (see the module docstring)."""
    q_P, kv_P = mla_row_scales(gamma_H, attn.nope_dim, attn.rope_dim, attn.v_dim)
    row_scaler(attn.query_proj().weight, q_P)
    row_scaler(attn.kv_b_proj.weight, kv_P)


@torch.no_grad()
def qk_clip_(attentions: Sequence[nn.Module], tau: float, row_scaler: RowScaler = scale_param_rows_,
             group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """K2's rule: clip every head whose recorded max logit (maxed over `group`) is over tau, then
    reset the records.

    Returns the max logits [L, H] the clip acted on (before clipping), for logging.
    """
    max_LH = reduce_max_logits(attentions, group)
    gamma_LH = clip_factors(max_LH, tau)
    clipped_L = (gamma_LH < 1).any(dim=1).tolist()  # one host sync for all layers
    for attn, gamma_H, clipped in zip(attentions, gamma_LH, clipped_L):
        if clipped:
            clip_layer_(attn, gamma_H, row_scaler)
        attn.reset_max_logits()
    return max_LH


class QKClip:
    """QK-clip for one model: call it after each optimizer update.

    Construction switches on the model's max-logit records and, with `remeasure`, a forward pre-hook
    that remembers the input ids, document ids (and autocast settings) of the last forward that builds a graph in
    training mode: the step's last micro-batch. A call clips as the module docstring says, resets
    the records and returns the [L, H] max logits the clip acted on (also `last_max_logits_LH`).
    `row_scaler` and `group` (the ranks the max logits are maxed over; None: all) are attributes:
    replace them when another component owns the master weights, or when only some ranks hold these
    layers (a pipeline stage, launch/parallel/pipeline.py: there `remeasure` must be off, as re-running
    a micro-batch would mean running the whole pipeline again).
    """

    def __init__(self, model: nn.Module, tau: float = 100.0, remeasure: bool = True,
                 row_scaler: RowScaler = scale_param_rows_):
        if not tau > 0:
            raise ValueError(f"qk_clip_tau = {tau!r}; must be > 0")
        if not hasattr(model, "attentions"):
            raise ValueError(f"QK-clip needs a model with .attentions() listing its MLA modules; "
                             f"{type(model).__name__} has none")
        self.model, self.attentions = model, list(model.attentions())
        self.tau, self.remeasure, self.row_scaler = tau, remeasure, row_scaler
        self.group: dist.ProcessGroup | None = None
        self.last_max_logits_LH: torch.Tensor | None = None
        self._batch: tuple | None = None  # (input ids, autocast on, autocast dtype) of the last training forward
        for attn in self.attentions:
            attn.record_max_logits = True
            attn.reset_max_logits()
        if remeasure:
            model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)

    def _remember_batch(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if model.training and torch.is_grad_enabled():
            ids = args[0] if args else kwargs["input_ids_BT"]
            # Packed rows: the re-measure must see the same per-document attention the step did.
            documents = kwargs.get("document_ids_BT", args[3] if len(args) > 3 else None)
            device = ids.device.type
            self._batch = (ids, documents, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        if self.remeasure and self._batch is not None:
            max_LH = self._clip_while_reforwarding(reduce_max_logits(self.attentions, self.group))
            for attn in self.attentions:
                attn.reset_max_logits()
        else:
            max_LH = qk_clip_(self.attentions, self.tau, self.row_scaler, self.group)
        self._batch = None
        self.last_max_logits_LH = max_LH
        return max_LH

    def _clip_while_reforwarding(self, max_LH: torch.Tensor) -> torch.Tensor:
        """Re-run the remembered micro-batch; before each MLA runs, fold its logits under the current
        (updated, earlier layers already clipped) weights into max_LH[layer] and clip that layer."""
        ids, documents, autocast_on, autocast_dtype = self._batch

        def clip_before(layer: int):
            def hook(attn: nn.Module, args: tuple) -> None:
                S_H = all_reduce_max_(attn.max_logits(*args), self.group)
                torch.maximum(max_LH[layer], S_H, out=max_LH[layer])
                gamma_H = clip_factors(max_LH[layer], self.tau)
                if (gamma_H < 1).any():  # one host sync per layer, once per optimizer step
                    clip_layer_(attn, gamma_H, self.row_scaler)
            return hook

        handles = [attn.register_forward_pre_hook(clip_before(i)) for i, attn in enumerate(self.attentions)]
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()  # eval: the routers' load counts and the attention records stay as they are
        try:
            with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_on):
                self.model.hidden_states(ids, documents)
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes:
                module.training = training
        return max_LH


class MuonClip(Muon):
    """Muon (+ AdamW groups) followed, inside each `step()`, by QK-clip on `model`'s attentions.

    The clip acts on the weights just updated (`QKClip`, exact by default; `remeasure=False` for
    K2's rule as published). `last_max_logits_LH` holds the max logits the last clip acted on.
    """

    def __init__(self, param_groups: list[dict], model: nn.Module, qk_clip_tau: float = 100.0, remeasure: bool = True):
        super().__init__(param_groups)
        self.qk_clip = QKClip(model, qk_clip_tau, remeasure, row_scaler=self.scale_master_rows)

    @property
    def last_max_logits_LH(self) -> torch.Tensor | None:
        return self.qk_clip.last_max_logits_LH

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.qk_clip()
        return loss

    def scale_master_rows(self, param: nn.Parameter, scale_P: torch.Tensor) -> None:
        """Scale the fp32 master of a low-precision parameter and re-round the parameter from it;
        scale the parameter itself when it is its own master."""
        master = self.state[param].get("master") if param in self.state else None
        if master is None:
            scale_param_rows_(param, scale_P)
        else:
            scale_rows_(master, scale_P)
            param.data.copy_(master)


def build(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
          nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8, qk_clip_tau: float = 100.0, qk_clip_remeasure: bool = True) -> MuonClip:
    """The registry's "muonclip": `optim.muon.build`'s groups, QK-clip at tau on `model.attentions()`."""
    groups = model_param_groups(model, lr, weight_decay, momentum, nesterov, ns_steps, betas, eps)
    return MuonClip(groups, model, qk_clip_tau, qk_clip_remeasure)
