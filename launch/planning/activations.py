"""Saved-for-backward bytes of one micro-batch, op by op as this stack's code saves them (launch.plan's
activation terms; tests/test_plan.py measures each mode against autograd).

Counts are per token unless named otherwise, each storage once (a view saved twice is one tensor),
weights never. Shape letters as moe/: D hidden, H heads, Q = N + R query/key head dim (N no-RoPE, R
RoPE), Vh value head dim, Lq / Lkv the LoRA ranks, I dense FFN width, F expert FFN width, E experts,
K experts per token, V vocab, T sequence length, b sequences; `a` is the activations' bytes per element.

Recompute modes are launch/parallel/recompute.py's:
  selective  every RMSNorm is checkpointed and its output released after its consumer's forward (so
             the norm keeps only its input), SwiGLU's silu(gate) * up likewise in the dense MLPs and
             shared experts (gate and up stay), and kv_b_proj's output is released (on the fused
             attention path that is v; the CPU math path copies v and keeps the copy). The routed
             experts' SwiGLU and MLA's q and k are not reached.
  full       each block keeps its input [D] and its routers' expert ids (int64 [K]) for the replay.

Kernel sets (`kernels`): gpu = kimi_kernels/experts/triton_ffn.py and fused SDPA (it saves q, k, v, its output and
an fp32 log-sum-exp [H]); cpu = kimi_kernels/experts/cpu_ffn.py or kimi_kernels/experts/reference.py (the same saves) and SDPA's
math path (scaled copies of q and k, the [H, T] softmax over every key, a contiguous copy of v).
"""

from __future__ import annotations

from moe.config import ModelConfig


def _norm(width: int, a: int, storage: int | None = None) -> int:
    """RMSNorm (moe/layers.py) computes in fp32: it saves its input as fp32 (in fp32 that is the input
    itself, whose storage may be wider than the normed slice), the rsqrt, and the normed value in `a`."""
    kept = storage if (a == 4 and storage) else width
    return 4 * kept + 4 + a * width


def attention_bytes(cfg: ModelConfig, a: int, lay) -> int:
    """MLA (moe/attention.py) with its input norm; the residual add saves nothing.

    none: the norm's saves and its output (q_a/kv_a's shared input), q_a's norm and output, kv_a's
    norm (its input is a view of kv_a's [Lkv + R] output) and output, q and k [H*Q] each (built by
    cat; RoPE saves only its tables), v (a view of kv_b's [H(N+Vh)] output; cpu: a copy [H*Vh]),
    the attention's own saves, o_proj's input (the [H*Vh] transposed copy).
    selective: the norms keep their inputs only (the block input [D], q_a's output [Lq], kv_a's
    output [Lkv + R]), their outputs are released, and so is kv_b's (gpu: v).
    """
    D, H, Q, Vh = cfg.hidden_size, cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
    Lq, Lkv, R, T = cfg.q_lora_rank or 0, cfg.kv_lora_rank, cfg.qk_rope_head_dim, lay.seq_len
    gpu = lay.kernels == "gpu"
    core = 2 * a * H * Q + (4 * H + a * H * Vh if gpu else a * H * T) + a * H * Vh  # q, k, scores / out, o_proj in
    # The math path reshapes v [B, H, T, Vh] to [B*H, T, Vh]: a copy, except at T = 1, where the view
    # of kv_b's output reshapes as it is (and is released under selective like the fused path's).
    copies_v = not gpu and T > 1
    if lay.recompute == "selective":
        return a * D + a * Lq + a * (Lkv + R) + core + (a * H * Vh if copies_v else 0)
    v = a * H * Vh if copies_v else a * H * (cfg.qk_nope_head_dim + Vh)
    q_latent = _norm(Lq, a) + a * Lq if Lq else 0
    return _norm(D, a) + a * D + q_latent + _norm(Lkv, a, Lkv + R) + a * Lkv + core + v


def ffn_bytes(cfg: ModelConfig, layer: int, a: int, lay) -> int:
    """The post-attention norm and the dense MLP or MoE of one token.

    SwiGLU (dense, shared): gate and up outputs, silu(gate), their product (down_proj's input);
    selective keeps gate and up. Router (moe/router.py, fp32): its input as fp32 (a copy unless
    a == 4), the scores [E], the chosen ids (int64 [K]), the gathered scores [K], the normaliser, the
    balance loss's normaliser. Routed experts, per assignment (K per token), in every mode:
      gpu (kimi_kernels/experts/triton_ffn.py): h = [gate | up] [2F], int32 routing order and token (on ctx); the
      gate weights [K] once per token; its input x is the norm's output;
      cpu: the int64 gather indices twice, the gathered row [D], [gate | up], silu and product [F]
      each, the output row [D], the gathered weight, the weighted row [D] (the scatter's source).
    ep > 1 (launch/parallel/expert_parallel.py) adds, per assignment: the dispatch's int64 indices
    twice, the gathered weight, the returned row and its weighted copy [D]; on gpu the kernel also
    keeps the received row [D] and a weight of one, and the gate weights are gathered per row.
    """
    D, E, K, F = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    selective = lay.recompute == "selective"
    swiglu = 2 if selective else 4
    total = a * D if selective else _norm(D, a) + a * D  # selective: the input only, the output released
    if not cfg.is_moe_layer(layer):
        return total + swiglu * a * cfg.intermediate_size
    total += swiglu * a * F * cfg.num_shared_experts
    total += (0 if a == 4 else 4 * D) + 4 * E + 8 * K + 4 * K + 4 + (4 if cfg.seq_aux_loss_coef > 0 else 0)
    if lay.kernels == "gpu":
        per_row, gate = 2 * a * F + 8, a * K
    else:
        per_row, gate = 16 + 3 * a * D + 4 * a * F + a, 0
    if lay.ep > 1:
        per_row, gate = per_row + 16 + a + 2 * a * D + (a * D + a if lay.kernels == "gpu" else 0), 0
    return total + gate + K * per_row


def layer_bytes(cfg: ModelConfig, layer: int, a: int, lay) -> int:
    """Saved bytes per token of block `layer` under lay.recompute."""
    if lay.recompute == "full":
        return a * cfg.hidden_size + 8 * cfg.num_experts_per_tok * cfg.is_moe_layer(layer)
    return attention_bytes(cfg, a, lay) + ffn_bytes(cfg, layer, a, lay)


def micro_batch_activations(cfg: ModelConfig, layers: list[int], first: bool, last: bool, a: int, lay,
                            bf16_weights: bool) -> int:
    """Saved bytes of one micro-batch (b sequences of T tokens) on a stage holding `layers`.

    Beside the blocks: RoPE's cos/sin tables [T, R/2] (one pair, shared by all layers); unless full,
    each MoE layer's balance-loss statistics [b, E] fp32, on cpu kimi_kernels/experts/cpu_ffn.py's group offsets
    (int32 [E]) and, for bf16 weights, the router weight's fp32 copy [E, D] (moe/router.py computes
    in fp32); the first stage the embedding's int64 ids; the
    last the final norm (selective: its input only) and the head's input, log-softmax's fp32 [V] and
    the int64 targets, and the loss's fp32 scalar."""
    N, b, D = lay.seq_len * lay.micro_batch, lay.micro_batch, cfg.hidden_size
    total = N * sum(layer_bytes(cfg, layer, a, lay) for layer in layers)
    total += a * lay.seq_len * cfg.qk_rope_head_dim
    moe_layers = sum(cfg.is_moe_layer(layer) for layer in layers)
    if lay.recompute != "full":
        total += 4 * b * cfg.num_experts * moe_layers * (cfg.seq_aux_loss_coef > 0)
        total += 4 * cfg.num_experts * moe_layers * (lay.kernels == "cpu")  # cpu_ffn's int32 group offsets
        total += 4 * cfg.num_experts * D * moe_layers * bf16_weights
    if first:
        total += 8 * N
    if last:
        head_input = a * D if lay.recompute == "selective" else _norm(D, a) + a * D
        total += N * (head_input + 4 * cfg.vocab_size + 8) + 4
    return total


def in_flight(pp: int, vpp: int, microbatches: int, stage: int) -> float:
    """Micro-batches' worth of a stage's activations alive at its peak: 1F1B keeps p - s in flight;
    the interleaved schedule warms up with 2(p-s-1) + (v-1)p chunks of 1/v of the stage (Megatron-LM
    schedules.py), plus the one in its steady state."""
    p, v, m = pp, vpp, microbatches
    if p == 1:
        return 1.0
    if v == 1:
        return float(min(p - stage, m))
    return min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v) / v
