"""The TRM demo (trm/demo.py) end to end at toy size: three variants on one set of puzzles, their table and plot."""

import json

import pytest

from trm.demo import main

TINY = "{hidden_size: 32, intermediate_size: 64, num_heads: 2, n_sup: 2}"


def test_the_demo_trains_each_variant_on_the_same_puzzles_and_writes_its_results(tmp_path):
    out = tmp_path / "demo"
    main(["--out-dir", str(out), "--size", "4", "--train", "40", "--val", "8", "--test", "8", "--steps", "4",
          "--model", TINY])
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["trm", "no-recursion", "no-deep-sup"]
    assert results["variants"]["no-recursion"]["model"] == {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                                            "n_sup": 2, "T": 1, "n": 1}
    assert all(v["steps"] == 4 for v in results["variants"].values())
    assert (out / "demo.png").stat().st_size > 10_000
    for name in results["variants"]:
        assert json.loads((out / name / "data.json").read_text()) == results["data"]  # one set of puzzles


def test_the_demo_refuses_an_existing_directory_and_unknown_variants(tmp_path):
    with pytest.raises(SystemExit, match="--variants: 'big' is not one of"):
        main(["--out-dir", str(tmp_path / "x"), "--variants", "trm,big"])
    (tmp_path / "y").mkdir()
    with pytest.raises(SystemExit, match="exists"):
        main(["--out-dir", str(tmp_path / "y"), "--steps", "1"])
    assert not (tmp_path / "x").exists()
