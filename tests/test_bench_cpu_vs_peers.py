"""bench/cpu_vs_peers.py's pieces that need no training: the held-out gate on the speedup, the
profiler split, the matmul ceiling and the held-out row split."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ceiling  # noqa: E402
import heldout  # noqa: E402
import peers_report  # noqa: E402


def _res(name, tok_s, tokens=1000):
    return {"trainer": name, "trained_tokens_per_s": tok_s, "nonpad_tokens_per_s": 2 * tok_s,
            "peak_rss_bytes": 2**30, "trained_tokens_all_steps": tokens, "final_loss": 1.0}


def test_speedup_counts_only_at_equal_quality():
    results = [_res("ours", 300), _res("trl", 100, 900), _res("litgpt", 150, 1100)]
    s = peers_report.summarize(results, {"base": 2.0, "ours": 1.50, "trl": 1.52, "litgpt": 1.55})
    assert s["best_peer"] == "litgpt" and s["speedup_vs_best_peer"] == 2.0
    assert s["heldout_ok"] and s["speedup_counts"] == 2.0
    assert s["trained_tokens_vs_ours"] == {"trl": 0.9, "litgpt": 1.1}
    # within the 0.2 % tolerance of the best peer still counts; beyond it does not
    assert peers_report.summarize(results, {"ours": 1.5025, "trl": 1.50, "litgpt": 1.6})["speedup_counts"] == 2.0
    worse = peers_report.summarize(results, {"ours": 1.51, "trl": 1.50, "litgpt": 1.6})
    assert worse["heldout_ok"] is False and worse["speedup_counts"] is None
    assert "speedup_counts" not in peers_report.summarize(results, {})


def test_profiler_split_counts_matmul_ops():
    ev = lambda key, us: SimpleNamespace(key=key, self_cpu_time_total=us)  # noqa: E731
    got = ceiling.split([ev("aten::mm", 2e6), ev("aten::addmm", 1e6), ev("aten::_scaled_dot_product_flash_attention_for_cpu", 5e5),
                         ev("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 5e5),
                         ev("aten::mul", 1.5e6), ev("aten::copy_", 5e5), ev("aten::empty", 0)], wall_s=8.0, steps=1)
    assert got["matmul_s"] == 4.0 and got["matmul_fraction"] == 0.5
    assert got["top_other_ops_s"] == {"aten::mul": 1.5, "aten::copy_": 0.5}


def test_ceiling_and_shapes():
    shapes = ceiling.matmul_shapes(64, {"q": (8, 8), "k": (8, 4), "o": (8, 8)}, 8, 320)
    assert shapes == [(64, 8, 4), (64, 8, 8), (64, 8, 20)]
    got = ceiling.matmul_ceiling([(256, 256, 256)], min_s=0.0)
    assert got["fp32"]["gflops"] > 0 and got["bf16"]["gflops"] > 0 and "256x256x256" in got["bf16"]["by_shape"]


def test_heldout_rows_are_the_last_ones(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "x" if k % 2 else "", "output": f"o{k}"} for k in range(60)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    info = heldout.split_rows(tmp_path / "a.json", tmp_path / "s", heldout=50)
    assert info["train_rows"] == 10
    assert json.loads((tmp_path / "s" / "heldout.json").read_text()) == rows[10:]
    assert json.loads((tmp_path / "s" / "train.json").read_text()) == rows[:10]
    merged = json.loads(heldout.merged_instruction_rows(tmp_path / "s" / "train.json", tmp_path / "m.json").read_text())
    assert merged[1] == {"instruction": "i1\n\nx", "input": "", "output": "o1"} and merged[0]["instruction"] == "i0"


def test_flops_of_timed_and_profiled_steps():
    from flops import PROJECTIONS, Shape, step_flops

    shape = Shape(layers=2, hidden=4, intermediate=6, heads=2, kv_heads=1, head_dim=2, vocab=10)
    res = {"steps": 3, "measured_s": 2e-6, "trained_tokens": 4, "nonpad_tokens": 10,
           "nonpad_tokens_per_step": [5, 5, 5, 7], "attn_pairs_per_step": [9, 9, 9, 11],
           "head_positions_per_step": [2, 2, 2, 3],
           "profile": {"profiled_steps": 1, "matmul_s": 1e-6, "profiled_s": 2e-6}}
    ceil = {"fp32": {"gflops": 0.01}, "bf16": {"gflops": 0.02}}
    got = peers_report.flops_of(res, shape, 1, 1, ceil, {"fp32_gflops": 0.01, "bf16_gflops": None})
    one = step_flops(shape, 1, PROJECTIONS, 5, 9, 2)["total"]
    assert got["flops_timed_steps"]["total"] == 2 * one  # steps 2 and 3: warmup excluded, profiled excluded
    assert got["achieved_gflops"] == round(2 * one / 2e-6 / 1e9, 2)
    assert got["flops_per_trained_token"] == round(2 * one / 4)
    assert got["fraction_of_ceiling"]["fp32"] == round(2 * one / 2e-6 / 1e9 / 0.01, 3)
    assert set(got["fraction_of_probe"]) == {"fp32"}
    assert res["profile"]["gflops_inside_matmuls"] == round(step_flops(shape, 1, PROJECTIONS, 7, 11, 3)["total"] / 1e-6 / 1e9, 2)
