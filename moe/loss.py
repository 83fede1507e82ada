"""The language-model loss, head included: mean cross-entropy of softmax(x W^T) against the targets.

Shape legend: N tokens, D hidden, V vocabulary, C tokens per chunk.

The plain way (`chunk_tokens = 0`) materialises the logits [N, V], an fp32 copy of them for the
loss, and autograd keeps both; at K2's V = 163,840 and 8192 tokens that is 5.4 GB in fp32 alone,
more than the rest of a small model's activations. `chunk_tokens = C` never holds more than C rows:
the forward walks the tokens C at a time, computes each chunk's logits (in the head's compute dtype,
bf16 under autocast), their fp32 log-sum-exp, the chunk's share of the loss and, when a gradient
will be wanted, the chunk's gradients with respect to x and W, which it accumulates (W's in fp32).
The backward only scales those by the incoming gradient. The logits are computed once, as in the
plain path, so the price is the gradient buffers [N, D] and [V, D] (fp32) held from the forward to
the backward, not a second matmul. This is the fused linear cross-entropy that Liger-Kernel
popularised; it is written in torch here so it runs on CPU and GPU alike and stays one readable file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target of this value adds nothing to the loss (prompt tokens, padding); torch's default


def linear_cross_entropy(x_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         chunk_tokens: int = 0) -> torch.Tensor:
    """Mean over the targets that are not IGNORE_INDEX of -log softmax(x W^T)[target], fp32 scalar.

    chunk_tokens 0: the plain path (logits materialised); C > 0: at most C rows of logits at a time.
    Under autocast both run the head in the autocast dtype, and the log-sum-exp in fp32.
    """
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens = {chunk_tokens} must be >= 0 (0: no chunking)")
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_ND, weight_VD = x_ND.to(dtype), weight_VD.to(dtype)  # differentiable casts, as autocast's own
    if chunk_tokens == 0:
        with torch.autocast(device_type, enabled=False):
            return logits_cross_entropy(F.linear(x_ND, weight_VD), targets_N)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(x_ND, weight_VD, targets_N, chunk_tokens)


def logits_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """The plain path's loss from logits already made: [..., V] against [...], in fp32."""
    V = logits_NV.shape[-1]
    return F.cross_entropy(logits_NV.float().reshape(-1, V), targets_N.reshape(-1), ignore_index=IGNORE_INDEX)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_VD, targets_N, chunk_tokens):
        N = x_ND.shape[0]
        valid_N = targets_N != IGNORE_INDEX
        # The mean's denominator, as F.cross_entropy's: no target at all gives 0 / 0 = nan, like it.
        count = valid_N.sum().to(torch.float32)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x_ND = torch.empty_like(x_ND) if want_x else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=x_ND.device)
        for start in range(0, N, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, N))
            x_CD, valid_C = x_ND[rows], valid_N[rows]
            target_C = targets_N[rows].clamp(min=0)  # ignored rows read column 0, then count for nothing
            logits_CV = F.linear(x_CD, weight_VD).float()
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            picked_C = logits_CV.gather(1, target_C[:, None]).squeeze(1)
            total += torch.where(valid_C, lse_C - picked_C, 0.0).sum()
            if want_x or want_w:
                # d(sum of the chunk's losses)/d logits = softmax - one_hot(target), zero on ignored rows.
                g_CV = logits_CV.sub_(lse_C[:, None]).exp_()
                g_CV[torch.arange(g_CV.shape[0], device=g_CV.device), target_C] -= 1.0
                g_CV.mul_(valid_C[:, None])
                if want_x:
                    grad_x_ND[rows] = g_CV.to(x_ND.dtype) @ weight_VD
                if want_w:
                    grad_w_VD.addmm_(g_CV.t(), x_CD.float())
        ctx.save_for_backward(grad_x_ND, grad_w_VD, count)
        ctx.weight_dtype = weight_VD.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x_ND, grad_w_VD, count = ctx.saved_tensors
        scale = grad_loss / count
        dx = None if grad_x_ND is None else grad_x_ND * scale.to(grad_x_ND.dtype)
        dw = None if grad_w_VD is None else (grad_w_VD * scale).to(ctx.weight_dtype)
        return dx, dw, None, None
