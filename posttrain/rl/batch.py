"""Training rows of finished RL samples, and their log-probabilities under the policy.

Shape legend: S samples, T the longest response, N tokens of a packed row, L MoE layers, K experts
per token, V vocabulary.
"""

from __future__ import annotations

import torch

from launch.runtime import autocast
from moe.model import Transformer, eval_mode
from posttrain.rl.rollout import Group


class Rows:
    """Training rows of some finished samples, packed into one row of N tokens without padding.

    Sample i is one document of the row (per-document attention, RoPE from 0: moe/model.py), its
    inputs prompt + response[:-1] and its targets the next tokens. Packing leaves no padding token
    to be routed, so the routers' load counts (and the bias update) see only real tokens, whichever
    samples share a micro-batch: that is what makes 2 processes count what 1 process counts.
    The objectives read per-sample [S, T] tensors: index_ST maps them into the row (mask_ST True on
    the response's targets the model drew; an environment's ids, e.g. tool results, take no loss);
    routing_L1NK holds the recorded experts of every input, if recorded.
    """

    def __init__(self, groups: list[Group], device):
        samples = [s for g in groups for s in g.samples]
        S, T = len(samples), max(len(s.tokens) for s in samples)
        inputs, targets, documents, routing = [], [], [], []
        self.index_ST = torch.zeros(S, T, dtype=torch.int64)
        self.mask_ST = torch.zeros(S, T, dtype=torch.bool)
        self.sample_logp_ST = torch.zeros(S, T)
        for i, s in enumerate(samples):
            seq, P, n = s.prompt + s.tokens, len(s.prompt), len(s.tokens)
            start = len(inputs)
            inputs += seq[:-1]
            targets += seq[1:]
            documents += [i] * (len(seq) - 1)
            # The response's targets sit at the inputs P-1 .. P+n-2 of this document.
            self.index_ST[i, :n] = torch.arange(start + P - 1, start + P - 1 + n)
            self.mask_ST[i, :n] = torch.tensor(s.from_model)  # no loss on an environment's ids
            self.sample_logp_ST[i, :n] = torch.tensor(s.logprobs)
            routing.append(s.routing)
        self.inputs_1N = torch.tensor([inputs], device=device)
        self.targets_1N = torch.tensor([targets], device=device)
        self.documents_1N = torch.tensor([documents], device=device)
        self.routing_L1NK = None if routing[0] is None else torch.cat(routing, dim=1)[:, None].to(device)
        self.groups_S = torch.tensor([j for j, g in enumerate(groups) for _ in g.samples], device=device)
        self.index_ST, self.mask_ST, self.sample_logp_ST = (t.to(device) for t in (self.index_ST, self.mask_ST,
                                                                                    self.sample_logp_ST))


def token_logprobs(model: Transformer, rows: Rows, replay: bool) -> torch.Tensor:
    """log p [S, T] of each response token under the model (temperature 1), through the recorded experts
    if `replay`. bf16 autocast on a GPU (fp32 weights), as pre-training on one GPU; fp32 on CPU."""
    with model.replay_routing(rows.routing_L1NK if replay else None), autocast(rows.inputs_1N.device):
        logits_1NV = model(rows.inputs_1N, document_ids_BT=rows.documents_1N).logits
    logp_N = logits_1NV[0].float().log_softmax(-1).gather(1, rows.targets_1N[0, :, None]).squeeze(1)
    return logp_N[rows.index_ST]


@torch.no_grad()
def eval_logprobs(model: Transformer, rows: Rows, replay: bool) -> torch.Tensor:
    """token_logprobs in eval mode: routers count no load and attention records no logits."""
    with eval_mode(model):
        return token_logprobs(model, rows, replay)
