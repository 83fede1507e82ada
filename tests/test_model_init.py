"""The model's initialisation (moe/model.py's init_weights): a part built on the meta device and
materialised alone holds what the whole model holds, so a pipeline stage or an expert-parallel rank
allocates only its own layers and experts and still starts from the one-process model's weights.

References: the whole model built the ordinary way, tensor by tensor under the same names.
"""

import pytest
import torch
from torch import nn

from moe.config import preset
from moe.model import Transformer, init_weights, materialize
from moe.moe import RoutedExperts


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _whole_and_meta(name: str = "tiny", seed: int = 0):
    torch.manual_seed(seed)
    whole = Transformer(preset(name))
    torch.manual_seed(seed)
    with torch.device("meta"):
        meta = Transformer(preset(name))
    return whole, meta


def test_a_stage_built_on_meta_holds_the_whole_models_weights():
    whole, meta = _whole_and_meta()
    assert meta.init_seed == whole.init_seed
    part = nn.Module()  # a pipeline stage's layout: the full model's names ("layers.1....")
    part.layers = nn.ModuleDict({str(i): meta.layers[i] for i in (1,)})
    part.norm, part.lm_head = meta.norm, meta.lm_head
    materialize(part, torch.device("cpu"), meta.init_seed, meta.cfg.init_std)
    reference = _tensors(whole)
    got = _tensors(part)
    assert len(got) >= 15 and not any(t.is_meta for t in got.values())
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
    assert all(p.is_meta for p in meta.layers[0].parameters())  # what is not ours stays unallocated
    assert meta.embed_tokens.weight.is_meta


def test_a_slice_of_the_experts_draws_each_expert_by_its_global_index():
    whole, meta = _whole_and_meta()
    experts = whole.layers[1].mlp.experts
    E, twoF, D = experts.gate_up_proj.shape

    class Slice(RoutedExperts):  # what an expert-parallel rank holds: experts [2, 4)
        first_expert = 2

    part = nn.Module()
    part.layers = nn.ModuleDict({"1": nn.Module()})
    part.layers["1"].mlp = nn.Module()
    part.layers["1"].mlp.experts = Slice(2, D, twoF // 2)
    init_weights(part, whole.init_seed, whole.cfg.init_std)
    got = part.layers["1"].mlp.experts
    assert torch.equal(got.gate_up_proj, experts.gate_up_proj[2:4])
    assert torch.equal(got.down_proj, experts.down_proj[2:4])
    assert E > 4 and not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])


def test_every_tensor_is_set_and_a_reset_gives_the_same_model():
    whole, _ = _whole_and_meta()
    first = {k: v.clone() for k, v in _tensors(whole).items()}
    with torch.no_grad():
        for tensor in _tensors(whole).values():
            tensor.fill_(float("nan"))
    whole.reset_parameters()
    for name, tensor in _tensors(whole).items():
        if name.endswith("max_logits_H"):  # -inf until a forward records
            assert torch.isneginf(tensor).all(), name
        else:
            assert torch.equal(tensor, first[name]), name


def test_the_initialisation_is_n_0_std_per_matrix_and_independent_across_tensors():
    whole, _ = _whole_and_meta("small")
    std = whole.cfg.init_std
    matrices = {n: p for n, p in whole.named_parameters() if p.dim() >= 2}
    for name, p in matrices.items():
        assert abs(p.float().std().item() - std) < 0.05 * std, name
        assert abs(p.float().mean().item()) < 0.05 * std, name
    q0, q1 = whole.layers[0].self_attn.o_proj.weight, whole.layers[1].self_attn.o_proj.weight
    corr = torch.corrcoef(torch.stack([q0.flatten(), q1.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01  # distinct names, independent draws
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in (whole.norm, whole.layers[0].input_layernorm))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_building_moves_the_global_generator_by_one_draw_on_any_device(device):
    torch.manual_seed(3)
    expected_seed = int(torch.randint(0, 2**62, (), device="cpu"))
    expected_next = torch.rand(4)
    torch.manual_seed(3)
    with torch.device(device):
        model = Transformer(preset("tiny"))
    assert model.init_seed == expected_seed
    assert torch.equal(torch.rand(4, device="cpu"), expected_next)  # what the trainer draws next is the same


def test_materialize_keeps_marks_on_parameters_and_tied_weights():
    """to_empty makes new Parameter objects: what expert parallelism set on them (DeepSpeed reads
    `allreduce` and `group_name`) and a tied head must survive it."""
    torch.manual_seed(0)
    whole = Transformer(preset("tiny", tie_embeddings=True))
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = Transformer(preset("tiny", tie_embeddings=True))
    experts = meta.layers[1].mlp.experts
    experts.gate_up_proj.allreduce, experts.gate_up_proj.group_name = False, "ep_size_2"
    materialize(meta, torch.device("cpu"), meta.init_seed, meta.cfg.init_std)
    assert meta.lm_head.weight is meta.embed_tokens.weight
    assert experts.gate_up_proj.allreduce is False and experts.gate_up_proj.group_name == "ep_size_2"
    for name, tensor in _tensors(whole).items():
        assert torch.equal(tensor, _tensors(meta)[name]), name


def test_materialize_refuses_a_half_allocated_module_and_an_unknown_tensor():
    _, meta = _whole_and_meta()
    part = nn.Module()
    part.norm, part.extra = meta.norm, nn.Linear(2, 2)  # extra is allocated: to_empty would wipe it
    with pytest.raises(ValueError, match="both meta and allocated"):
        materialize(part, torch.device("cpu"), meta.init_seed, meta.cfg.init_std)
    odd = nn.Module()
    odd.scale = nn.Parameter(torch.empty(3, device="meta"))  # no rule in init_weights
    with pytest.raises(TypeError, match="does not initialise \\['scale'\\]"):
        materialize(odd, torch.device("cpu"), 0, 0.02)


def test_the_k2_2b_blocks_materialise_wholly():
    """Every tensor of the target preset's dense and MoE blocks has an init rule (the tiny model's
    checks above would not see a module kind only the larger presets use)."""
    with torch.device("meta"):
        model = Transformer(preset("k2-2b"))
    part = nn.Module()
    part.layers = nn.ModuleDict({str(i): model.layers[i] for i in (0, 1)})
    materialize(part, torch.device("cpu"), model.init_seed, model.cfg.init_std)
    weights = [p for n, p in part.named_parameters() if p.dim() >= 2]
    assert len(weights) > 10 and all(p.isfinite().all() and p.std() > 0 for p in weights)
