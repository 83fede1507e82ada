"""RMSNorm forward and backward as two Triton kernels, each one pass over the rows.

Shape legend: N rows (every leading dim flattened), D the normalised width, DP the next power of two
of D. Same numbers as `kimi_kernels.norm.rms_norm_reference` (its definition: fp32 normalisation rounded to
x's dtype, times the weight in the promoted dtype), up to the order of the fp32 sum of squares.

Why: the reference is six elementwise passes in the forward (cast, square, mean, rsqrt, multiply,
cast back, multiply by the weight), each reading and writing [N, D] in fp32, and about as many again
in autograd's backward; here the forward reads x once and writes y once, and saves only rstd [N].

Forward, one program per row: rstd = 1 / sqrt(mean(x^2) + eps), n = round_x(x * rstd), y = w * n.
Backward, with dn = dy * w (the rounding passes the gradient through, as the reference's cast does):
  dx = rstd * dn - x * rstd^3 * mean(dn * x), rounded to x's dtype;
  dw = sum over rows of dy * n, accumulated in fp32 per program over its rows and summed over the
  programs by torch, so no atomics and a deterministic result.
"""

import torch
import triton
import triton.language as tl

from kimi_kernels.tiles import interpreting


@triton.jit
def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, D, stride_x, stride_y, eps, DP: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, DP)
    ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    n = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * n).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, N, D, stride_x, stride_dy, stride_dx,
             rows_per_program, DP: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, DP)
    ok = cols < D
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([DP], dtype=tl.float32)
    for i in range(rows_per_program):
        row = pid * rows_per_program + i
        if row < N:
            x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
            xf = x.to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            n = (xf * rstd).to(x.dtype).to(tl.float32)
            dw += dy * n
            dn = dy * w
            dot = tl.sum(dn * xf, axis=0) / D
            dx = rstd * dn - xf * (rstd * rstd * rstd * dot)
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=ok)


def _warps(DP: int) -> int:
    return 1 if interpreting() else min(16, max(1, DP // 512))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, D = x.shape, x.shape[-1]
        x_ND = x.reshape(-1, D)
        if x_ND.stride(-1) != 1:
            x_ND = x_ND.contiguous()
        N = x_ND.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y_ND = torch.empty(N, D, dtype=out_dtype, device=x.device)
        rstd_N = torch.empty(N, dtype=torch.float32, device=x.device)
        DP = triton.next_power_of_2(D)
        if N:
            _rms_fwd[(N,)](x_ND, weight, y_ND, rstd_N, D, x_ND.stride(0), y_ND.stride(0), eps, DP=DP,
                           num_warps=_warps(DP))
        ctx.save_for_backward(x_ND, weight, rstd_N)
        ctx.shape = shape
        return y_ND.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x_ND, weight, rstd_N = ctx.saved_tensors
        N, D = x_ND.shape
        dy_ND = dy.reshape(N, D)
        if dy_ND.stride(-1) != 1:
            dy_ND = dy_ND.contiguous()
        DP = triton.next_power_of_2(D)
        # Enough programs to fill a GPU, few enough that the [programs, D] partial sums stay small.
        programs = max(1, min(N, 4 if interpreting() else 1024))
        rows_per_program = triton.cdiv(N, programs) if N else 1
        programs = triton.cdiv(N, rows_per_program) if N else 1
        dx_ND = torch.empty_like(x_ND)
        dw_part = torch.zeros(programs, D, dtype=torch.float32, device=x_ND.device)
        if N:
            _rms_bwd[(programs,)](x_ND, weight, dy_ND, rstd_N, dx_ND, dw_part, N, D, x_ND.stride(0), dy_ND.stride(0),
                                  dx_ND.stride(0), rows_per_program, DP=DP, num_warps=_warps(DP))
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx_ND.view(ctx.shape), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as `kimi_kernels.norm.rms_norm_reference.rms_norm_reference`, on Triton kernels."""
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [D] with D = x's last dim {x.shape[-1]}")
    return _RMSNorm.apply(x, weight, eps)
