"""launch.bench: the variants it measures, the JSON it writes, and its errors."""

import json

import pytest

from launch import bench


def test_runs_each_variant_on_the_same_tokens_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--seq-len", "32", "--micro-batch", "2", "--steps", "2",
                         "--warmup", "1", "--variant", "ce:loss_chunk=16", "--variant", "full:recompute=full",
                         "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["variants"].keys() == {"default", "ce", "full"} == result["variants"].keys()
    default, ce, full = (saved["variants"][n] for n in ("default", "ce", "full"))
    assert ce["switches"] == {**bench.DEFAULTS, "loss_chunk": 16}
    # Neither switch changes the maths: the same losses on the same tokens.
    for other in (ce, full):
        assert other["loss_first"] == pytest.approx(default["loss_first"], rel=1e-6)
        assert other["loss_last"] == pytest.approx(default["loss_last"], rel=1e-5)
    assert full["saved_activation_bytes"] < default["saved_activation_bytes"]
    for record in (default, ce, full):
        assert len(record["step_s_all"]) == 2 and record["tokens_per_s"] > 0 and record["mfu"] is None
        assert abs(sum(record["breakdown"]["stages"].values()) - 1) < 1e-3 and record["breakdown"]["top_ops"]
    assert saved["device"].startswith("CPU") and saved["date"]


@pytest.mark.parametrize("text, words", [
    ("nocolon", "NAME:KEY=VALUE"),
    ("x:attention=fast", "attention = 'fast'; valid: flash, sdpa"),
    ("x:loss_chunk=big", "loss_chunk = 'big' is not an integer"),
    ("x:loss_chunk=-4", "loss_chunk = -4 must be >= 0"),
    ("x:speed=11", "'speed=11' is not KEY=VALUE"),
])
def test_bad_variant_names_the_part(text, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        bench.parse_variant(text)


def test_stages_by_name():
    assert bench.stage_of("aten::baddbmm") == "matmul"
    assert bench.stage_of("_gate_up_swiglu_kernel") == "expert_ffn"
    assert bench.stage_of("aten::_scaled_dot_product_flash_attention") == "attention"
    assert bench.stage_of("aten::_foreach_mul_") == "optimizer"
