"""Muon for hidden matrices and AdamW for everything else, in one optimizer.

Shape legend: E experts (a batch of matrices), M rows (fan_out), N columns (fan_in).

Two pure update functions carry the maths (`muon_update`, `adamw_update`); `Muon` is a thin
`torch.optim.Optimizer` that owns the state and applies them, group by group (`use_muon` True or
False). `split_params` decides from the model which parameters get which rule, and `row_blocks`
which Muon parameters are fused stacks of several matrices (a gate and an up projection).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): keep a Nesterov momentum of the
gradient, replace it by the nearest semi-orthogonal matrix (approximately U V^T of its SVD, found by
a Newton-Schulz iteration), and step along that. The Moonlight update-RMS matching (Liu et al. 2025,
"Muon is Scalable for LLM Training", §2.2, eq. 4) scales the orthogonalised update by
0.2 * sqrt(max(M, N)) so that its RMS is ~0.2, like AdamW's: Muon groups then reuse AdamW's learning
rate and weight decay, and one LR schedule drives every group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Quintic Newton-Schulz coefficients from Jordan's Muon post: chosen to maximise the slope at 0, so
# small singular values grow fast; they converge to ~[0.7, 1.2] rather than exactly 1 (harmless).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # as torch.optim.Muon: guards the Frobenius normalisation of an all-zero update

MUON_DEFAULTS = {"lr": 1e-3, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1, "ns_steps": 5, "ns_dtype": None,
                 "row_blocks": 1}
ADAMW_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
OPTIONAL_GROUP_KEYS = ("name",)  # a label for logs; never read by the update
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise G [M, N] or each matrix of a stack G [E, M, N]: G = U S V^T -> ~U V^T.

    With X_0 = G / ||G||_F (so every singular value is <= 1), iterate
        A = X X^T,   X <- a X + (b A + c A^2) X        (a, b, c) = NS_COEFFICIENTS
    which applies p(s) = a s + b s^3 + c s^5 to every singular value s and leaves U, V alone. Run on
    the wide orientation (M <= N, transposing if needed) so X X^T is the smaller M x M Gram matrix.
    A stack is one batched matmul per product; each expert is normalised and iterated on its own.

    dtype: the arithmetic precision; None means bf16 on CUDA (tensor cores; the iteration is robust
    to it) and fp32 elsewhere (CPUs have no fast bf16 matmul). The result has that dtype. In bf16 the
    fused baddbmm calls round exactly as torch.optim.Muon's addmm calls do.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz takes a matrix [M, N] or a stack [E, M, N], got shape {tuple(G.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    a, b, c = NS_COEFFICIENTS
    X_EMN = G.to(dtype) if G.ndim == 3 else G.to(dtype)[None]
    tall = G.size(-2) > G.size(-1)
    if tall:
        X_EMN = X_EMN.mT
    X_EMN = X_EMN / X_EMN.norm(dim=(-2, -1), keepdim=True).clamp_min(NS_EPS)
    for _ in range(steps):
        A_EMM = X_EMN @ X_EMN.mT
        B_EMM = torch.baddbmm(A_EMM, A_EMM, A_EMM, beta=b, alpha=c)
        X_EMN = torch.baddbmm(X_EMN, B_EMM, X_EMN, beta=a)
    if tall:
        X_EMN = X_EMN.mT
    return X_EMN if G.ndim == 3 else X_EMN[0]


def matrices(shape: torch.Size, row_blocks: int = 1) -> tuple[int, int, int]:
    """(count, rows, cols): a weight of `shape` [..., M, N] whose rows stack `row_blocks` matrices is
    `count` matrices of rows x cols = M/row_blocks x N, laid end to end in memory."""
    *_, M, N = shape
    rows = M // row_blocks
    return shape.numel() // (rows * N), rows, N


# Matrices Newton-Schulz orthogonalises at once, in elements (at least one matrix). Its working set is
# 3 + 2 min(M, N) / max(M, N) copies of them (the Nesterov blend, X and the next X, and two Gram
# products; measured, tests/test_plan.py), so a whole expert stack at once would cost that many copies
# of the stack. Kimi K2's gate_up_proj on one EP-16 rank is 24 experts, 48 matrices of 2048 x 7168
# (704M elements): 10 GB of fp32 temporaries whole, 0.84 GB in chunks of 2^26 (4 matrices, each still
# a large GEMM). A smaller stack is one chunk, as before.
NS_CHUNK_ELEMENTS = 2**26


def muon_chunks(grad: torch.Tensor, momentum_buf: torch.Tensor, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5, ns_dtype: torch.dtype | None = None, row_blocks: int = 1,
                chunk_elements: int | None = None):
    """Muon's step direction for one weight [..., M, N], a chunk of its matrices at a time; updates
    momentum_buf (whole, first). Yields (lo, hi, O) with O [hi - lo, m, n] the direction of matrices
    [lo, hi) of `matrices(grad.shape, row_blocks)`, in grad's dtype; concatenated over the chunks it
    is `muon_update`'s result. The caller applies each chunk before asking for the next, so no
    weight-sized direction is ever held (optim.Muon, launch.parallel.zero_muon). chunk_elements:
    None reads NS_CHUNK_ELEMENTS when called."""
    momentum_buf.lerp_(grad, 1 - momentum)
    count, rows, cols = matrices(grad.shape, row_blocks)
    grad_BMN, buf_BMN = grad.reshape(count, rows, cols), momentum_buf.reshape(count, rows, cols)
    per_chunk = max(1, (chunk_elements or NS_CHUNK_ELEMENTS) // (rows * cols))
    scale = 0.2 * math.sqrt(max(rows, cols))
    for lo in range(0, count, per_chunk):
        hi = min(lo + per_chunk, count)
        # One expression, so the blend is freed inside Newton-Schulz's call, not held past the yield.
        yield lo, hi, zeropower_via_newtonschulz5(grad_BMN[lo:hi].lerp(buf_BMN[lo:hi], momentum) if nesterov
                                                  else buf_BMN[lo:hi], ns_steps, ns_dtype).to(grad.dtype).mul_(scale)


def muon_update(grad: torch.Tensor, momentum_buf: torch.Tensor, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5, ns_dtype: torch.dtype | None = None, row_blocks: int = 1) -> torch.Tensor:
    """The Muon step direction for one weight [..., M, N], RMS-matched to AdamW; updates momentum_buf.

        B <- mu B + (1 - mu) g                 (momentum_buf, an EMA: same direction as B <- mu B + g)
        U <- (1 - mu) g + mu B  if nesterov else B
        O <- NS5(U) * 0.2 * sqrt(max(M, N))    (Moonlight eq. 4: RMS(O) ~ 0.2, as AdamW's update)

    row_blocks = k says the weight stacks k separate matrices of M/k rows each (a fused gate and up
    projection: k = 2); each is orthogonalised and RMS-matched on its own, as if stored apart.
    The caller applies W <- W * (1 - lr * wd) - lr * O. With ns_dtype=torch.bfloat16 and k = 1 this
    is what torch.optim.Muon(adjust_lr_fn="match_rms_adamw") does to a 2-D weight. The optimizers
    apply `muon_chunks` instead, which computes the same O a chunk of matrices at a time.
    """
    O = torch.empty_like(grad)
    O_BMN = O.view(matrices(grad.shape, row_blocks))
    for lo, hi, O_CMN in muon_chunks(grad, momentum_buf, momentum, nesterov, ns_steps, ns_dtype, row_blocks):
        O_BMN[lo:hi] = O_CMN
    return O


def adamw_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                 betas: tuple[float, float], eps: float) -> torch.Tensor:
    """The Adam step direction (Kingma & Ba 2015, Alg. 1, with bias correction); updates both moments.

        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   O <- (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    The caller applies decoupled weight decay as for Muon (Loshchilov & Hutter 2019): W <- W (1 - lr wd) - lr O.
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    return exp_avg / (1 - beta1 ** step) / denom


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(muon_params, adamw_params), decided by what each parameter is in the model.

    Muon: hidden weight matrices, i.e. 2-D weights and stacks of them ([E, M, N] expert tensors,
    orthogonalised per expert) -- attention and MLP projections, routed experts, the router's gate.
    AdamW: nn.Embedding tables and the output head (`model.lm_head`, also when tied to the
    embedding): they map tokens, not hidden features, and Muon's orthogonality argument does not
    hold for them (Jordan 2024; Moonlight §2.2); and every parameter with fewer than 2 dims (norm
    gains, biases). Buffers -- the router's balance bias among them -- are not parameters at all.
    """
    to_adamw = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    if head is not None:
        to_adamw |= {id(p) for p in head.parameters()}
    muon, adamw = [], []
    for p in model.parameters():  # deduplicated, so a tied weight is seen once
        if not p.requires_grad:
            continue
        (adamw if id(p) in to_adamw or p.ndim < 2 else muon).append(p)
    for p in muon:
        if p.ndim > 3:
            raise ValueError(f"parameter of shape {tuple(p.shape)}: Muon takes matrices [M, N] or expert stacks "
                             "[E, M, N]; reshape it in the model or build the groups by hand")
    return muon, adamw


def row_blocks(model: nn.Module) -> dict[int, int]:
    """{id(param): k} for the parameters that stack k separate matrices along their rows, as their
    modules declare in a `row_blocks` dict of parameter name -> k (RoutedExperts: gate_up_proj, 2).

    Muon orthogonalises each of those matrices on its own, as Megatron's Muon splits a fused QKV: a
    fused gate_up_proj is two linear maps, and the dense MLP and shared expert, which store gate_proj
    and up_proj apart, get exactly that. It is also cheaper: for Kimi K2's [4096, 7168] gate_up_proj,
    two [2048, 7168] iterations take 2.25x fewer FLOPs than one.
    """
    blocks = {}
    for module in model.modules():
        for name, k in getattr(module, "row_blocks", {}).items():
            blocks[id(getattr(module, name))] = k
    return blocks


class Muon(torch.optim.Optimizer):
    """Muon on the groups with `use_muon=True`, AdamW on the others, one object for the trainer.

    Each group is a dict with `params`, `use_muon` and any of the keys of MUON_DEFAULTS or
    ADAMW_DEFAULTS (by kind), plus an optional `name`; any other key is an error. Typical use:

        muon_params, adamw_params = split_params(model)
        opt = Muon([dict(params=muon_params, use_muon=True, lr=3e-3),
                    dict(params=adamw_params, use_muon=False, lr=3e-3)])

    Both kinds take the AdamW-scale `lr` (see `muon_update`), so an LR scheduler may set
    group["lr"] on every group alike. Parameters stored in bf16/fp16 get an fp32 master copy in
    their state: updates (and QK-clip, `optim.qk_clip`) act on the master and the parameter is
    its rounding. All optimizer state is fp32 for them.
    """

    def __init__(self, param_groups: list[dict]):
        super().__init__(param_groups, defaults={})

    def add_param_group(self, group: dict) -> None:
        super().add_param_group(_validated(group))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    _init_state(state, p, group["use_muon"])
                master = state.get("master", p)
                grad = p.grad.to(master.dtype)
                # Decay first: the direction reads only the gradient and the state, so W(1 - lr wd) - lr O
                # is the same whichever is computed first.
                master.mul_(1 - group["lr"] * group["weight_decay"])
                if group["use_muon"]:
                    # Applied a chunk of matrices at a time: no weight-sized direction is held.
                    master_BMN = master.view(matrices(master.shape, group["row_blocks"]))
                    for lo, hi, O_CMN in muon_chunks(grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                                                     group["ns_steps"], group["ns_dtype"], group["row_blocks"]):
                        master_BMN[lo:hi].add_(O_CMN, alpha=-group["lr"])
                        del O_CMN  # or it is held while the next chunk is made
                else:
                    state["step"] += 1
                    master.add_(adamw_update(grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                             group["betas"], group["eps"]), alpha=-group["lr"])
                if master is not p:
                    p.copy_(master)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype on load; fp32 masters and
        # moments of bf16 parameters must come back as saved, or resuming would not be exact.
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.dtype != self.state[p][key].dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)


def _init_state(state: dict, p: torch.Tensor, use_muon: bool) -> None:
    dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
    if dtype != p.dtype:
        state["master"] = p.detach().to(dtype)
    if use_muon:
        state["momentum_buffer"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
    else:
        state["step"] = 0
        state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)


def _validated(group: dict) -> dict:
    """The group with defaults filled in; unknown keys and out-of-range values raise ValueError."""
    if not isinstance(group.get("use_muon"), bool):
        raise ValueError(f"each param group needs use_muon=True or False; got {group.get('use_muon')!r} "
                         f"in the group with keys {sorted(group)}")
    kind, defaults = ("Muon", MUON_DEFAULTS) if group["use_muon"] else ("AdamW", ADAMW_DEFAULTS)
    valid = {"params", "use_muon", *defaults, *OPTIONAL_GROUP_KEYS}
    for key in group:
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in a {kind} param group; valid keys: {', '.join(sorted(valid))}")
    group = {**defaults, **group}
    for key in ("lr", "weight_decay"):
        if not group[key] >= 0:
            raise ValueError(f"{kind} group {key} = {group[key]!r}; must be >= 0")
    if group["use_muon"]:
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"Muon group momentum = {group['momentum']!r}; must be in [0, 1)")
        for key in ("ns_steps", "row_blocks"):
            if not (isinstance(group[key], int) and group[key] >= 1):
                raise ValueError(f"Muon group {key} = {group[key]!r}; must be an int >= 1")
        params = list(group["params"]) if not torch.is_tensor(group["params"]) else [group["params"]]
        for p in params:
            if p.ndim not in (2, 3):
                raise ValueError(f"Muon group holds a parameter of shape {tuple(p.shape)}; Muon takes matrices "
                                 "[M, N] or expert stacks [E, M, N], put it in a use_muon=False group")
            if p.shape[-2] % group["row_blocks"]:
                raise ValueError(f"Muon group row_blocks = {group['row_blocks']} does not divide the {p.shape[-2]} "
                                 f"rows of a parameter of shape {tuple(p.shape)}")
        group["params"] = params
    else:
        if not (len(group["betas"]) == 2 and all(0 <= b < 1 for b in group["betas"])):
            raise ValueError(f"AdamW group betas = {group['betas']!r}; must be two values in [0, 1)")
        if not group["eps"] >= 0:
            raise ValueError(f"AdamW group eps = {group['eps']!r}; must be >= 0")
    return group


def model_param_groups(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                       nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                       eps: float = 1e-8) -> list[dict]:
    """Muon groups for the model's hidden matrices (one per `row_blocks` value: "muon" for plain
    matrices, "muon_2_row_blocks" for fused gate/up stacks) and an AdamW group for the rest
    (`split_params`), all with the same lr and weight decay (the Moonlight matching makes that right)."""
    muon_params, adamw_params = split_params(model)
    blocks = row_blocks(model)
    by_blocks: dict[int, list] = {}
    for p in muon_params:
        by_blocks.setdefault(blocks.get(id(p), 1), []).append(p)
    groups = [dict(params=params, use_muon=True, name="muon" if k == 1 else f"muon_{k}_row_blocks", lr=lr,
                   weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, row_blocks=k)
              for k, params in sorted(by_blocks.items())]
    groups.append(dict(params=adamw_params, use_muon=False, name="adamw", lr=lr, weight_decay=weight_decay,
                       betas=tuple(betas), eps=eps))
    return [g for g in groups if g["params"]]


def build(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
          nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8) -> Muon:
    """The registry's "muon": `Muon` over `model_param_groups(model, ...)`."""
    return Muon(model_param_groups(model, lr, weight_decay, momentum, nesterov, ns_steps, betas, eps))
