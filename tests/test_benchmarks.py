"""The benchmark suite's quick mode runs end to end (timings are not asserted)."""

import json
import os
import subprocess
import sys

import numpy as np

import sparselayers as sl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_quick_mode_writes_table_json_and_plot(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {(r["case"], r["method"]) for r in results["rows"]}
    cases = {case for case, _ in methods}
    assert {"many outputs", "banded +-16"} <= cases and len(cases) == 5
    for case in cases - {"many outputs"}:
        assert {(case, "masked dense"), (case, "auto"), (case, "csr")} <= methods
    assert all(r["step_ms"] > 0 and r["params"] > 0 for r in results["rows"])
    assert "peak_mib" in results["rows"][0]
    auto = [r for r in results["rows"] if r["method"] == "auto"]
    # compiled_csr where the compiled kernels build (CI), the tiled banded kernel elsewhere
    band = sl.patterns.banded((256, 256), lower=16, upper=16)  # the --quick case
    assert {r["case"]: r["kernel"] for r in auto}["banded +-16"] == sl.ops.compiled.accelerated("banded", band)
    assert (tmp_path / "density.png").stat().st_size > 0
    assert "| masked dense |" in (tmp_path / "results.md").read_text()


def test_scale_writes_table_json_and_plot_and_merges_runs(tmp_path):
    def run(entries):
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "scale.py"), "--size", "1000", "--batch", "4",
             "--steps", "2", "--entries", entries, "--out", str(tmp_path)],
            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert done.returncode == 0, done.stderr[-3000:]

    run("2e3,1e4")
    run("5e3")  # a later run adds its size to the earlier ones
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert sorted(r["entries"] for r in rows) == [2000, 5000, 10000]
    assert all(r["bytes_per_entry"] > 0 and r["step_s"] > 0 and r["kernel"] for r in rows)
    table = (tmp_path / "scale.md").read_text()
    assert "Machine: " in table and "TensorFlow" in table and "| 5,000 |" in table and "| 10,000 |" in table
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_sparse_training_quick_mode_writes_every_method_table_and_plot(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sparse_training.py"), "--quick", "--out", str(tmp_path),
         "--plot-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "sparse_training.json").read_text())
    methods = {r["method"] for r in results["summary"]}
    assert methods == {"Dense", "Small-Dense", "Static uniform", "Static ERK", "SNIP", "SET", "RigL uniform",
                       "RigL ERK", "SRigL", "GradualPruning", "One-shot + fine-tune"}
    sparse = [r for r in results["summary"] if r["method"] not in ("Dense", "Small-Dense")]
    dense_params = next(r["params"] for r in results["summary"] if r["method"] == "Dense")
    assert all(r["params"] < dense_params and 0 < r["flops_vs_dense"] for r in sparse)
    assert {r["method"] for r in results["teacher"]} == {"Static", "SET", "RigL", "SRigL"}
    assert "| SRigL |" in (tmp_path / "SPARSE_TRAINING.md").read_text()
    assert (tmp_path / "sparse-training.png").stat().st_size > 0


def test_sparse_training_cnn_quick_mode_counts_conv_flops_per_output_position(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sparse_training.py"), "--cnn", "--quick", "--out", str(tmp_path),
         "--plot-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "sparse_training_cnn.json").read_text())
    assert set(results["datasets"]) == {"MNIST-1D", "digits"}
    for name, d in results["datasets"].items():
        assert {r["method"] for r in d["summary"]} == {"Dense", "Small-Dense", "Static uniform", "Static ERK", "SET",
                                                      "RigL uniform", "RigL ERK", "SRigL", "GradualPruning"}
        # Forward cost by hand: 2 * kept weights * output positions per layer ("same" padding); the
        # uniform Static model keeps round(density * size) weights of each kernel.
        spatial, channels, layers = list(d["spec"]["input"][:-1]), d["spec"]["input"][-1], []
        for filters, kernel, stride in d["spec"]["convs"]:
            spatial = [-(-n // stride) for n in spatial]
            layers.append((kernel ** len(spatial) * channels * filters, int(np.prod(spatial))))
            channels = filters
        layers.append((int(np.prod(spatial)) * channels * d["spec"]["classes"], 1))
        for r in d["rows"]:
            if r["method"] in ("Dense", "Static uniform"):
                kept = [size if r["density"] == 1 else round(r["density"] * size) for size, _ in layers]
                assert r["forward_flops"] == sum(2 * k * at for k, (_, at) in zip(kept, layers)), r
        dense = [r for r in d["rows"] if r["method"] == "Dense"]
        assert all(r["params"] < dense[0]["params"] for r in d["rows"] if r["method"] != "Dense")
    assert "| SRigL |" in (tmp_path / "SPARSE_TRAINING_CNN.md").read_text()
    assert (tmp_path / "sparse-training-cnn.png").stat().st_size > 0


def test_n_of_m_kernel_comparison_writes_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fan_in_kernels.py"), "--n-of-m", "--cpu-time", "--size", "64",
         "--rounds", "1", "--calls", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "n_of_m_kernels.md").read_text()
    assert "Machine: " in table and "CPU ms, TensorFlow on one thread" in table
    for n, m in [(2, 4), (1, 8), (1, 16)]:
        assert f"| {n}:{m} | {n / m:.2%} | dense | train b256 |" in table
        # N:M is an equal fan-in: ELL stores exactly its nnz slots.
        assert f"| {64 * 64 * n // m} | " in table.split(f"| {n}:{m} | {n / m:.2%} | ell slots |")[1].splitlines()[0]


def test_transformer_quick_mode_writes_every_method_table_and_plot(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "transformer.py"), "--quick", "--out", str(tmp_path),
         "--plot-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "transformer.json").read_text())
    summary = {(r["method"], r["density"]): r for r in results["summary"]}
    assert set(summary) == {("Dense", 1.0), ("Static ERK", 0.1), ("RigL ERK", 0.1), ("GradualPruning", 0.1)}
    dense = summary["Dense", 1.0]
    # The dense model's kernels counted from the settings: token and position tables, per block four attention
    # projections (dim x heads x dim / heads) and the FFN, then the head.
    a, seq = results["settings"], results["seq"]
    assert dense["entries"] == (a["vocab"] * a["dim"] + seq * a["dim"]
                                + a["blocks"] * (4 * a["dim"] ** 2 + 2 * a["dim"] * a["ffn"]) + a["dim"] * 10)
    # Every method ends with the ERK budget's entries (ERK and GradualPruning allocate alike, so they agree to a
    # few entries); the dense model keeps all of them.
    sparse_layers = [d for _, d in results["erk_layers"]["0.1"]]
    assert all(0 < d < 1 for d in sparse_layers)
    for method in ("Static ERK", "RigL ERK", "GradualPruning"):
        assert summary[method, 0.1]["entries"] < dense["entries"]
        assert summary[method, 0.1]["params"] < dense["params"]
    assert summary["Static ERK", 0.1]["entries"] == summary["RigL ERK", 0.1]["entries"]
    assert all(r["step_ms"] > 0 and 0 <= r["accuracy"] <= 1 for r in results["rows"])
    text = (tmp_path / "TRANSFORMER.md").read_text()
    assert "MNIST-1D" in text and "| 10% | RigL ERK |" in text and "CPU (lscpu): " in text
    assert (tmp_path / "transformer.png").stat().st_size > 0
