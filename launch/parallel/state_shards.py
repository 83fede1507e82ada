"""A stepper's weights and optimizer state as pieces of the single-device model's tensors, and back.

What a checkpoint holds is layout-free (`launch/checkpoint/shards.py`): `model/<name>` for each
parameter and persistent buffer of the single-device model, and `optimizer/<name>/<state>` for each
per-parameter optimizer tensor (exp_avg, exp_avg_sq, momentum_buffer), all in the single-device
shapes; per-parameter counters (Adam's step) are scalars. This file maps each layout onto those:

- one process: whole tensors, from the module and `optimizer.state[param]`;
- expert parallelism: rank p's [L, ...] expert stacks are elements [p*L*m, (p+1)*L*m) of the
  global [E, ...] stacks (m elements per expert);
- ZeRO-1/2: rank r holds [r*S, (r+1)*S) of each flat param group (S its partition length); a
  parameter laid at [offset, offset + numel) of the group overlaps it in one contiguous range, whose
  fp32 masters and Adam moments are the same range of the partition's tensors. ZeroMuon's momenta
  are per matrix: matrices [b_lo, b_hi) of a parameter are its elements [b_lo*m, b_hi*m);
- ZeRO-3: saved by gathering each parameter's fp32 master and moments whole with DeepSpeed's
  `safe_get_full_*`, one parameter at a time; loaded into rank r's partition of each parameter,
  elements [r*P, (r+1)*P) (P = its partition length, the last one padded), at the offset DeepSpeed
  records for it in its flat fp32 sub-group (`grad_position`).

Loading reads, for each rank, the ranges its own layout holds, from whichever layout wrote them.
Shape legend: S partition length, m elements per matrix (or per expert), L local experts.
"""

from __future__ import annotations

import torch
from torch import nn

from launch.checkpoint.shards import Held, ShardSet
from launch.parallel.zero_muon import ZeroMuon, overlapping_matrices
from moe.params import model_tensors
from optim.muon import Muon, matrices

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def placements(model: nn.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """{name: (shape in the single-device model, where this rank's tensor starts in its flat form)}:
    the tensor itself and 0, except an expert-parallel rank's expert stacks."""
    place = {name: (tuple(t.shape), 0) for name, t in model_tensors(model)}
    for prefix, module in model.named_modules():
        if hasattr(module, "ep_rank") and hasattr(module, "num_experts"):  # ExpertParallelExperts
            for name, p in module.named_parameters(prefix=prefix):
                place[name] = ((module.num_experts, *p.shape[1:]), module.ep_rank * p.numel())
    return place


def _scalar(value, where: str) -> dict:
    if torch.is_tensor(value) and value.numel() == 1:
        return {"value": value.item(), "tensor": True}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value": value, "tensor": False}
    raise ValueError(f"{where}: optimizer state of type {type(value).__name__} cannot be saved in a sharded checkpoint "
                     "(per-parameter tensors of the parameter's size and numbers only)")


def _unscalar(value, was_tensor: bool):
    # torch.optim.AdamW keeps step as a 0-d float32 tensor on the host; Muon and ZeroMuon as an int.
    return torch.tensor(float(value), dtype=torch.float32) if was_tensor else value


def _whole(key: str, tensor: torch.Tensor, shape: tuple, base: int) -> Held:
    flat = tensor.detach().reshape(-1)
    return Held(key, shape, base, base + flat.numel(), flat)


# --- one process ---------------------------------------------------------------------------------

def local_shards(model: nn.Module, optimizer: torch.optim.Optimizer) -> ShardSet:
    names = {id(p): n for n, p in model.named_parameters()}
    held, scalars = [], {}
    for name, t in model_tensors(model):
        master = optimizer.state.get(t, {}).get("master")
        held.append(_whole(f"model/{name}", t if master is None else master, tuple(t.shape), 0))
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for k, v in state.items():
            key = f"optimizer/{name}/{k}"
            if k == "master":
                continue  # saved as the weight itself: the fp32 value the parameter is the rounding of
            if torch.is_tensor(v) and v.numel() == p.numel() and v.ndim > 0:
                held.append(_whole(key, v, tuple(p.shape), 0))
            else:
                scalars[key] = _scalar(v, key)
    return ShardSet(held, scalars)


def load_local(model: nn.Module, optimizer: torch.optim.Optimizer, reader) -> None:
    with torch.no_grad():
        for name, t in model_tensors(model):
            t.copy_(_read_as(reader, f"model/{name}", tuple(t.shape), 0, t))
    for name, p in model.named_parameters():
        state = {}
        for key in reader.keys(f"optimizer/{name}/"):
            state[key.rsplit("/", 1)[1]] = _read_as(reader, key, tuple(p.shape), 0).to(p.device)
        for key in reader.scalar_keys(f"optimizer/{name}/"):
            state[key.rsplit("/", 1)[1]] = _unscalar(*reader.scalar(key))
        if state and p.dtype in _LOW_PRECISION and isinstance(optimizer, Muon):
            state["master"] = reader.full(f"model/{name}").to(p.device, torch.float32)
        if state:
            optimizer.state[p] = state


def load_weights(model: nn.Module, reader) -> None:
    """The weights and persistent buffers this rank holds (the whole model, a pipeline stage, an
    expert-parallel slice), from a sharded checkpoint of any layout; no optimizer state. Each tensor
    is read for the range this rank's copy covers, not whole."""
    place = placements(model)
    with torch.no_grad():
        for name, t in model_tensors(model):
            shape, base = place[name]
            key = f"model/{name}"
            if not reader.has(key) or reader.shape(key) != shape:
                raise reader.error(f"{reader.ckpt}: no {key} of shape {shape} (the model_config's)")
            t.copy_(_read_as(reader, key, tuple(t.shape), base, t))


def _read_as(reader, key: str, shape: tuple, base: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's tensor `key` (its elements [base, base + numel(shape)) of the global one), shaped."""
    n = torch.Size(shape).numel()
    flat = reader.read(key, base, base + n)
    if flat.numel() != n:
        raise reader.error(f"{reader.ckpt}: {key} has {flat.numel()} elements where {n} were wanted")
    out = flat.view(shape)
    return out if like is None else out.to(like.dtype)


# --- ZeRO-1/2 (with or without expert parallelism) -------------------------------------------------

def _fragments(zero):
    """Per flat group i: (fp32 partition, its start in the group, [(j, param, offset in the group)])."""
    import torch.distributed as dist

    for i, part_S in enumerate(zero.single_partition_of_fp32_groups):
        flat = zero.bit16_groups_flat[i]
        size = zero.bit16_groups[i][0].element_size()
        # ZeRO-1/2 keep every parameter's .data as a view into its group's flat buffer.
        params = [(j, p, (p.data.data_ptr() - flat.data_ptr()) // size) for j, p in enumerate(zero.bit16_groups[i])]
        yield i, part_S, dist.get_rank(zero.real_dp_process_group[i]) * part_S.numel(), params


def _overlap(offset: int, numel: int, start: int, S: int) -> tuple[int, int] | None:
    """[lo, hi) of a parameter (its own flat indices) inside partition [start, start + S), or None."""
    lo, hi = max(offset, start), min(offset + numel, start + S)
    return (lo - offset, hi - offset) if lo < hi else None


def _matrix_range(client: ZeroMuon, part_S, group: dict, j: int, start: int) -> tuple[int, int, int, tuple]:
    """ZeroMuon's matrices [b_lo, b_hi) of the group's j-th parameter on this rank, m, and (rows, cols)."""
    _, _, spans, matrix_numels, _ = client._layout[id(part_S)]
    offset, shape = spans[j]
    m = matrix_numels[j]
    b_lo, b_hi = overlapping_matrices(offset, shape.numel(), m, start, start + part_S.numel())
    _, rows, cols = matrices(shape, group["row_blocks"])
    return b_lo, b_hi, m, (rows, cols)


def zero_shards(model: nn.Module, zero) -> ShardSet:
    client = zero.optimizer
    place, names = placements(model), {id(p): n for n, p in model.named_parameters()}
    held, scalars, grouped = [], {}, set()
    for i, part_S, start, params in _fragments(zero):
        group, state = client.param_groups[i], client.state.get(part_S, {})
        for j, p, offset in params:
            name = names[id(p)]
            grouped.add(name)
            shape, base = place[name]
            span = _overlap(offset, p.numel(), start, part_S.numel())
            if span is not None:
                lo, hi = span
                at = offset + lo - start  # where the overlap sits in the partition
                held.append(Held(f"model/{name}", shape, base + lo, base + hi, part_S.detach()[at:at + hi - lo]))
                for k, v in state.items():
                    key = f"optimizer/{name}/{k}"
                    if torch.is_tensor(v) and v.shape == part_S.shape:
                        held.append(Held(key, shape, base + lo, base + hi, v[at:at + hi - lo]))
                    elif k != "momentum":
                        scalars[key] = _scalar(v, key)
            if j in state.get("momentum", {}):
                b_lo, b_hi, m, _ = _matrix_range(client, part_S, group, j, start)
                held.append(Held(f"optimizer/{name}/momentum_buffer", shape, base + b_lo * m, base + b_hi * m,
                                 state["momentum"][j].reshape(-1)))
    for name, t in model_tensors(model):  # buffers (router biases), and any weight no group holds
        if name not in grouped:
            shape, base = place[name]
            held.append(_whole(f"model/{name}", t, shape, base))
    return ShardSet(held, scalars)


def load_zero(model: nn.Module, zero, reader) -> None:
    client = zero.optimizer
    place, names = placements(model), {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        # Every rank's module holds its whole dense weights and its own experts (ZeRO-1/2 shard only the
        # optimizer's copies); the fp32 masters are then this rank's ranges of the same values.
        for name, t in model_tensors(model):
            shape, base = place[name]
            t.copy_(_read_as(reader, f"model/{name}", tuple(t.shape), base, t))
        for i, part_S, start, params in _fragments(zero):
            group = client.param_groups[i]
            state = dict(client.state.get(part_S, {}))
            muon = isinstance(client, ZeroMuon) and group["use_muon"]
            for j, p, offset in params:
                name = names[id(p)]
                _, base = place[name]
                span = _overlap(offset, p.numel(), start, part_S.numel())
                if span is not None:
                    lo, hi = span
                    at = offset + lo - start
                    part_S[at:at + hi - lo].copy_(reader.read(f"model/{name}", base + lo, base + hi))
                    for key in reader.keys(f"optimizer/{name}/"):
                        k = key.rsplit("/", 1)[1]
                        if muon and k == "momentum_buffer":
                            continue  # per matrix, below
                        buf = state.setdefault(k, torch.zeros_like(part_S))
                        buf[at:at + hi - lo].copy_(reader.read(key, base + lo, base + hi))
                    for key in reader.scalar_keys(f"optimizer/{name}/"):
                        state[key.rsplit("/", 1)[1]] = _unscalar(*reader.scalar(key))
                key = f"optimizer/{name}/momentum_buffer"
                if muon and reader.has(key):
                    b_lo, b_hi, m, (rows, cols) = _matrix_range(client, part_S, group, j, start)
                    if b_lo < b_hi:
                        buf = reader.read(key, base + b_lo * m, base + b_hi * m).view(b_hi - b_lo, rows, cols)
                        state.setdefault("momentum", {})[j] = buf.to(part_S.device)
            if state:
                client.state[part_S] = state


# --- ZeRO-3 -----------------------------------------------------------------------------------------

def zero3_shards(model: nn.Module, zero) -> ShardSet:
    """Each parameter gathered whole (collective: every rank walks the parameters in the same order);
    `shards.assign` then has each rank write 1/N of it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    held, scalars = [], {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        group_idx = zero.grad_position[zero.get_param_id(p)][0]
        part = zero.fp32_partitioned_groups_flat[group_idx]
        held.append(_whole(f"model/{name}", safe_get_full_fp32_param(p).cpu(), p.ds_shape, 0))
        for k, v in zero.optimizer.state.get(part, {}).items():
            key = f"optimizer/{name}/{k}"
            if torch.is_tensor(v) and v.shape == part.shape:
                held.append(_whole(key, safe_get_full_optimizer_state(p, k).cpu(), p.ds_shape, 0))
            else:
                scalars[key] = _scalar(v, key)
    for name, t in model_tensors(model):  # buffers: ZeRO-3 partitions parameters only
        if name not in params:
            held.append(_whole(f"model/{name}", t.cpu(), tuple(t.shape), 0))
    return ShardSet(held, scalars)


def load_zero3(model: nn.Module, zero, reader) -> None:
    """Each rank's partitions of the fp32 masters and moments, then the working partitions re-made
    from them (and the persistent small parameters gathered again), as DeepSpeed's own loader does."""
    import torch.distributed as dist

    client = zero.optimizer
    params = dict(model.named_parameters())
    states = {}
    zero.checkpoint_event_prologue()  # every parameter back to its partition before the partitions change
    with torch.no_grad():
        for name, t in model_tensors(model):  # buffers: not partitioned
            if name not in params:
                t.copy_(_read_as(reader, f"model/{name}", tuple(t.shape), 0, t))
        for name, p in params.items():
            i, at, P = zero.grad_position[zero.get_param_id(p)]
            part = zero.fp32_partitioned_groups_flat[i]
            r = dist.get_rank(group=getattr(p, "ds_process_group", zero.dp_process_group))
            lo, hi = min(r * P, p.ds_numel), min((r + 1) * P, p.ds_numel)
            part[at:at + hi - lo].copy_(reader.read(f"model/{name}", lo, hi))
            state = states.setdefault(i, dict(client.state.get(part, {})))
            for key in reader.keys(f"optimizer/{name}/"):
                buf = state.setdefault(key.rsplit("/", 1)[1], torch.zeros_like(part))
                buf[at:at + hi - lo].copy_(reader.read(key, lo, hi))
            for key in reader.scalar_keys(f"optimizer/{name}/"):
                state[key.rsplit("/", 1)[1]] = _unscalar(*reader.scalar(key))
        for i, state in states.items():
            if state:
                client.state[zero.fp32_partitioned_groups_flat[i]] = state
        for low, master in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat):
            low.data.copy_(master.data)  # the working partitions every gather reads
    zero.checkpoint_event_epilogue()
