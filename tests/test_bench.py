"""`bench`: FLOP counts by hand, the target rules on known numbers, the interleaved timing loop,
and the whole command on a tiny checkpoint with a small grid."""

import json

import numpy as np
import pytest

from adalora_deploy.bench.flops import count_flops
from adalora_deploy.bench.run import BenchConfig, check_targets, time_cell
from adalora_deploy.bench.variants import VARIANTS, Variant
from adalora_deploy.cli import main
from adalora_deploy.model import AdaLoraModel
from adalora_deploy.ort import cuda_status


def test_flops_by_hand(tiny_checkpoint):
    # tiny BERT: hidden 32, intermediate 64, 2 layers, pooler 32x32; init_r 4;
    # adapters 0 (layer 0 query), 1 (key), 2 (value) at ranks 0, 1, 3; the other 9 at rank 4.
    model = AdaLoraModel.from_pretrained(tiny_checkpoint)
    T = 16
    per_layer = 4 * (2 * 32 * 32) + 2 * (2 * 32 * 64)  # q, k, v, attn out; intermediate, output
    merged = T * (2 * per_layer + 2 * 32 * 32) + 2 * 4 * T * T * 32  # + pooler; + QK^T, AV per layer
    shapes = [(32, 32)] * 4 + [(32, 64), (64, 32)]  # (d_in, d_out) in registration order, per layer

    def branch(d_in, d_out, r):
        return 2 * r * (d_in + d_out) + d_out if r else 0

    ranks = [0, 1, 3] + [4] * 9
    pruned = T * sum(branch(*shapes[i % 6], r) for i, r in enumerate(ranks))
    unpruned = T * sum(branch(*shapes[i % 6], 4) for i in range(12))
    flops = count_flops(model, T)
    assert (flops.merged, flops.branch_pruned, flops.branch_unpruned) == (merged, pruned, unpruned)
    assert flops.share == pytest.approx(pruned / merged)


def cell(batch, seq, **p50):
    return {"batch_size": batch, "seq_len": seq, "results": {k: {"p50_ms": v} for k, v in p50.items()}}


def test_targets_on_known_numbers():
    cells = [
        # merged 2% slower than base; factored 1% over merged; pruned faster; merged 0.85 x plain;
        # merged_int8 0.5 x plain and 0.8 x optimum_int8.
        cell(1, 128, onnx_base=10.0, merged=10.2, factored_pruned=10.302, factored_unpruned=11.0,
             optimum_plain=12.0, merged_int8=6.0, optimum_int8=7.5),
        # merged 5% slower than base; factored 3% over merged; unpruned faster; merged 0.95 x plain;
        # merged_int8 0.6 x plain and 0.95 x optimum_int8.
        cell(32, 128, onnx_base=100.0, merged=105.0, factored_pruned=108.15, factored_unpruned=107.0,
             optimum_plain=110.5263, merged_int8=66.3158, optimum_int8=69.8061),
        cell(8, 32, merged=5.0, factored_pruned=5.0),  # no base, no unpruned, not an Optimum cell
    ]
    flops = {128: {"share": 0.01}, 32: {"share": 0.0}}
    targets = {t["name"]: t for t in check_targets(cells, flops)}
    assert [c["passed"] for c in targets["merged_vs_base"]["cells"]] == [True, False]
    assert [c["passed"] for c in targets["factored_flop_overhead"]["cells"]] == [True, False, True]
    assert [c["passed"] for c in targets["pruned_faster_than_unpruned"]["cells"]] == [True, False]
    assert [c["passed"] for c in targets["merged_vs_optimum_plain"]["cells"]] == [True, False]
    assert [c["passed"] for c in targets["merged_int8_vs_optimum_plain"]["cells"]] == [True, False]
    assert [c["passed"] for c in targets["merged_int8_vs_optimum_int8"]["cells"]] == [True, False]
    assert targets["merged_int8_vs_optimum_int8"]["cells"][0]["value"] == pytest.approx(0.8)
    assert targets["merged_vs_base"]["cells"][0]["value"] == pytest.approx(0.02)
    assert targets["factored_flop_overhead"]["cells"][0]["limit"] == pytest.approx(0.015)
    assert all(t["passed"] is False for t in targets.values())
    assert check_targets([cell(1, 32, merged=1.0)], None)[0]["passed"] is None  # nothing to compare


def test_timing_loop_warms_up_then_rotates():
    calls = []
    variants = [Variant(name, lambda feeds, n=name: calls.append(n), "test") for name in ("a", "b", "c")]
    config = BenchConfig(batch_sizes=[1], seq_lens=[4], runs=4, warmup=2, threads=1)
    times = time_cell(variants, {}, config)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    rounds = [calls[6 + 3 * i: 9 + 3 * i] for i in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}


@pytest.mark.skipif(cuda_status()[0], reason="CUDA starts here")
def test_bench_cuda_without_cuda_fails_before_exporting(tiny_checkpoint, tmp_path, capsys):
    assert main(["bench", str(tiny_checkpoint), "--provider", "cuda", "--json", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --provider cuda") and "\n" not in err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_bench_checkpoint_small_grid(tiny_checkpoint, tiny_eval_csv, tmp_path):
    out = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    argv = ["bench", str(tiny_checkpoint), "--batch-sizes", "1,2", "--seq-lens", "8,16", "--runs", "3",
            "--warmup", "1", "--threads", "1", "--provider", "cpu", "--json", str(out["json"]),
            "--markdown", str(out["md"]), "--plot", str(out["png"]), "--int8", "--eval-data", str(tiny_eval_csv)]
    assert main(argv) == 0
    result = json.loads(out["json"].read_text())
    assert list(result["variants"]) == list(VARIANTS)
    assert [(c["batch_size"], c["seq_len"]) for c in result["cells"]] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for c in result["cells"]:
        assert set(c["results"]) == set(VARIANTS)
        for r in c["results"].values():
            assert r["runs"] == 3 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert r["throughput_seq_per_s"] == pytest.approx(c["batch_size"] / (r["p50_ms"] / 1000))
            assert r["ratio_to_merged"] == pytest.approx(r["p50_ms"] / c["results"]["merged"]["p50_ms"])
    assert result["header"]["provider"] == "CPUExecutionProvider"
    assert result["header"]["threads"]["ort_intra_op"] == 1
    assert set(result["flops"]) == {"8", "16"}
    assert [t["name"] for t in result["targets"]] == [
        "merged_vs_base", "factored_flop_overhead", "pruned_faster_than_unpruned", "merged_vs_optimum_plain",
        "merged_int8_vs_optimum_plain", "merged_int8_vs_optimum_int8"]
    assert {name: v["provider"] for name, v in result["variants"].items() if name.endswith("int8")} == dict.fromkeys(
        ("merged_int8", "factored_int8", "optimum_int8"), "CPUExecutionProvider")
    assert set(result["int8_evaluation"]) == {"merged_int8", "factored_int8"}
    assert result["int8_evaluation"]["merged_int8"]["examples"] == 24
    assert "| 2 | 16 | factored_unpruned |" in out["md"].read_text()
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_export_dir_measures_what_is_there_plus_pytorch(tiny_export_root, tmp_path):
    from adalora_deploy.bench.run import run_bench

    config = BenchConfig(batch_sizes=[2], seq_lens=[8], runs=2, warmup=1, threads=1, provider="cpu")
    result = run_bench(tiny_export_root, config, json_path=str(tmp_path / "b.json"))
    # The manifest names tiny_checkpoint, which exists: PyTorch is measured beside the two graphs.
    assert list(result["variants"]) == ["pytorch", "merged", "factored_pruned"]
    (only,) = result["cells"]
    assert np.isclose(only["results"]["merged"]["ratio_to_merged"], 1.0)
    assert json.loads((tmp_path / "b.json").read_text())["cells"][0]["results"].keys() == only["results"].keys()


def test_bench_refuses_existing_outputs_before_any_work(tiny_checkpoint, tmp_path, capsys):
    kept = tmp_path / "results.json"
    kept.write_text("user data")
    code = main(["bench", str(tiny_checkpoint), "--json", str(kept), "--runs", "1", "--provider", "cpu"])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert kept.read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_int8_variants_need_the_cpu_provider():
    from adalora_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="--provider cpu"):
        BenchConfig(int8=True, provider="auto")
