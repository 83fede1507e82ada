"""Deep supervision with adaptive halting: a batch of slots, each holding an example in progress.

Shape legend: B slots, L cells, D hidden, V vocab.

Each training step takes one supervision step for every slot (TRM.supervise), a loss and an
optimizer step. A slot's (y, z) carry over to its next step, detached. After the step a slot halts
when it has taken n_sup steps or, with halting on, when its halting head says its answer is right
(q > 0); `refill` then puts the next training example in it, with a fresh (y, z). So an example
the model solves early costs few steps, and a hard one gets up to n_sup (the paper's ACT, as the
reference code runs it: the batch never waits for its slowest example).

The halting head learns, by binary cross-entropy, whether the current answer is exactly right.
With probability halt_exploration a new example must take a random number of steps in
[2, n_sup] before it may halt, so the head also sees later steps of examples it would stop early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trm.losses import token_losses
from trm.model import TRM


@dataclass
class Carry:
    inputs_BL: torch.Tensor
    targets_BL: torch.Tensor
    puzzle_ids_B: torch.Tensor
    y_BLD: torch.Tensor
    z_BLD: torch.Tensor
    steps_B: torch.Tensor  # supervision steps taken by the slot's example
    min_steps_B: torch.Tensor  # it may not halt before this many (exploration)
    halted_B: torch.Tensor  # True: the slot takes a new example at the next refill
    examples_B: torch.Tensor  # index of the slot's example in the training set (-1: none yet)


def new_carry(model: TRM, batch: int, device) -> Carry:
    """Every slot empty (halted), so the first refill loads them all."""
    cfg = model.cfg
    y, z = model.initial_state(batch)
    zeros = torch.zeros(batch, cfg.seq_len, dtype=torch.int64, device=device)
    ints = torch.zeros(batch, dtype=torch.int64, device=device)
    return Carry(zeros, zeros.clone(), ints.clone(), y.to(device), z.to(device), ints.clone(), ints.clone(),
                 torch.ones(batch, dtype=torch.bool, device=device), ints - 1)


def refill(model: TRM, carry: Carry, draw, generator: torch.Generator, before: int = 0,
           total: int | None = None) -> int:
    """Load the next example into every halted slot: draw(k) -> (example indices [k], inputs [k, L],
    targets [k, L], puzzle ids [k]). Returns k, the examples loaded.

    Data parallel: this carry's k halted slots are numbers before .. before + k - 1 of the `total`
    halted in all processes' carries, taken in rank order (None: k, a single carry). The exploration
    draws are made for all `total` and this carry keeps its own, so P carries of B slots draw what
    one carry of P * B slots would; draw(k) must do likewise, and is called even when k = 0."""
    slots = carry.halted_B.nonzero().squeeze(-1)
    k = len(slots)
    total = k if total is None else total
    if total == 0:
        return 0
    index, inputs, targets, ids = draw(k)
    device = carry.inputs_BL.device
    carry.examples_B[slots] = index.to(device)
    carry.inputs_BL[slots] = inputs.to(device)
    carry.targets_BL[slots] = targets.to(device)
    carry.puzzle_ids_B[slots] = ids.to(device)
    y, z = model.initial_state(k)
    carry.y_BLD[slots] = y.to(device, carry.y_BLD.dtype)
    carry.z_BLD[slots] = z.to(device, carry.z_BLD.dtype)
    carry.steps_B[slots] = 0
    n_sup, p = model.cfg.n_sup, model.cfg.halt_exploration
    explore = torch.rand(total, generator=generator) < p
    minimum = torch.where(explore, torch.randint(2, max(n_sup, 2) + 1, (total,), generator=generator), 1)
    carry.min_steps_B[slots] = minimum[before : before + k].to(device)
    carry.halted_B[slots] = False
    return k


def supervision_step(model: TRM, carry: Carry, training: bool = True) -> tuple[torch.Tensor, dict]:
    """One supervision step for every slot, in place on `carry`; returns (loss, figures).

    loss = mean over slots of the cells' mean output loss + q_loss_weight * BCE(q, exactly right).
    With training=False no slot halts before n_sup (evaluation always runs every step)."""
    cfg = model.cfg
    x = model.embed(carry.inputs_BL, carry.puzzle_ids_B if model.puzzle_emb is not None else None)
    y_BLD, z_BLD, logits_BLV, q_B = model.supervise(x, carry.y_BLD, carry.z_BLD)
    # Kept in the carry's dtype whatever autocast made of them: the checkpointed state has one dtype.
    carry.y_BLD, carry.z_BLD = y_BLD.to(carry.y_BLD.dtype), z_BLD.to(carry.z_BLD.dtype)
    predicted_BL = logits_BLV.argmax(-1)
    scored_BL = carry.targets_BL != cfg.ignore_token  # ARC's pad cells: no loss, not scored
    right_BL = (predicted_BL == carry.targets_BL) | ~scored_BL
    exact_B = right_BL.all(-1)
    cell_loss = masked_mean(token_losses(logits_BLV, carry.targets_BL, cfg.loss), scored_BL)
    q_loss = F.binary_cross_entropy_with_logits(q_B.float(), exact_B.float(), reduction="none")
    loss = (cell_loss + cfg.q_loss_weight * q_loss).mean()
    carry.steps_B += 1
    halted = carry.steps_B >= cfg.n_sup
    if training and cfg.halting:
        halted |= (q_B.detach() > 0) & (carry.steps_B >= carry.min_steps_B)
    carry.halted_B = halted
    figures = {"cell_loss": cell_loss.mean().item(), "q_loss": q_loss.mean().item(),
               "exact": exact_B.float().mean().item(),
               "cell_accuracy": (right_BL & scored_BL).sum().item() / max(1, scored_BL.sum().item()),
               "halted": halted.float().mean().item(), "predicted_BL": predicted_BL, "exact_B": exact_B,
               "q_B": q_B.detach()}
    return loss, figures


def masked_mean(values_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Per-example mean [B] over the cells where mask is True (an example with none: 0)."""
    return (values_BL * mask_BL).sum(-1) / mask_BL.sum(-1).clamp_min(1)


@torch.no_grad()
def evaluate(model: TRM, inputs_PL: torch.Tensor, targets_PL: torch.Tensor, puzzle_ids_P: torch.Tensor | None = None,
             batch_size: int = 256) -> dict:
    """Every example through all n_sup steps: exact accuracy and mean cell loss after each step, and
    where the halting head would first have stopped (its step, and whether the answer then was right)."""
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    P, n_sup = len(inputs_PL), model.cfg.n_sup
    exact_per_step, loss_per_step = torch.zeros(n_sup), torch.zeros(n_sup)
    halt_step = torch.full((P,), n_sup, dtype=torch.int64)
    halt_right = torch.zeros(P, dtype=torch.bool)
    predictions = torch.zeros_like(targets_PL)
    for start in range(0, P, batch_size):
        sl = slice(start, start + batch_size)
        B = len(inputs_PL[sl])
        y, z = model.initial_state(B)
        ids = None if puzzle_ids_P is None else puzzle_ids_P[sl].to(device)
        x = model.embed(inputs_PL[sl].to(device), ids)
        targets = targets_PL[sl].to(device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(n_sup):
            y, z, logits, q = model.supervise(x, y.to(device), z.to(device))
            predicted = logits.argmax(-1)
            scored = targets != model.cfg.ignore_token
            exact = ((predicted == targets) | ~scored).all(-1)
            exact_per_step[step] += exact.sum().item()
            loss_per_step[step] += masked_mean(token_losses(logits, targets, model.cfg.loss), scored).sum().item()
            first = (q > 0) & ~stopped
            halt_step[sl][first.cpu()] = step + 1
            halt_right[sl][first.cpu()] = exact[first].cpu()
            stopped |= q > 0
        predictions[sl] = predicted.cpu()
        never = ~stopped.cpu()
        halt_right[sl][never] = exact.cpu()[never]  # never halted: the answer after the last step
    model.train(model_was_training)
    return {"exact_by_step": (exact_per_step / P).tolist(), "exact": float(exact_per_step[-1] / P),
            "loss_by_step": (loss_per_step / P).tolist(),
            "halted_exact": float(halt_right.float().mean()), "halt_step_mean": float(halt_step.float().mean()),
            "halt_steps": torch.bincount(halt_step, minlength=n_sup + 1)[1:].tolist(), "predictions": predictions}
