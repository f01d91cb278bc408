"""Sparse inputs: SparseDense on a tf.SparseTensor vs Keras Dense on it, vs densifying, vs int8 dense.

One command: ``python benchmarks/sparse_input.py [--quick]``. Writes
``benchmarks/SPARSE_INPUT.md`` (tables) and ``benchmarks/sparse_input.png``.

1. The issue's case, 200,000 features, 50 nonzeros per row, batch 2048,
   ``fit`` with Adam: peak memory growth of ``fit`` (each method in its own
   subprocess, peak RSS after minus live RSS before) and the step time
   (``train_on_batch``, one process, methods in turn round by round, an
   untimed warm-up step, then three timed steps; median over rounds) of
   SparseDense with 128,000 entries on the sparse batch, the same layer on
   the densified batch (what ``tf.sparse.to_dense`` in ``call`` used to do),
   and Keras Dense (64 units: 12.8 M weights) on the sparse batch.
2. When a sparse input beats an int8 dense genotype matrix: SparseDense
   step time on the sparse batch vs on the same batch as dense int8, over
   the fraction of nonzeros per row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's sparselayers: the figures are of this code


def _data(features: int, per_row: int, rows: int, seed: int = 0):
    import scipy.sparse

    rng = np.random.default_rng(seed)
    columns = np.sort(np.stack([rng.choice(features, per_row, replace=False) for _ in range(rows)]), axis=1)
    x = scipy.sparse.csr_matrix(
        (rng.integers(1, 3, rows * per_row).astype("float32"), columns.ravel(), np.arange(0, rows * per_row + 1, per_row)),
        shape=(rows, features),
    )
    return x, rng.normal(size=(rows, 1)).astype("float32")


def _model(method: str, features: int, units: int, fan_in: int):
    import keras

    import sparselayers as sl

    sparse = method in ("sparse", "keras_dense")
    inputs = keras.Input((features,), sparse=sparse, dtype="int8" if method == "int8_dense" else "float32")
    if method == "keras_dense":
        hidden = keras.layers.Dense(units, activation="relu")
    else:
        hidden = sl.SparseDense(sl.patterns.random((features, units), fan_in=fan_in, seed=0), activation="relu")
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden(inputs)))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def _batch(method: str, x):
    import tensorflow as tf

    if method in ("sparse", "keras_dense"):
        coo = x.tocoo()
        return tf.SparseTensor(np.stack([coo.row, coo.col], 1).astype(np.int64), coo.data, coo.shape)
    dense = x.toarray()
    return dense.astype("int8") if method == "int8_dense" else dense


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(method: str, features: int, units: int, fan_in: int, batch: int, per_row: int) -> None:
    """Peak memory growth of fit over three batches, printed as JSON."""
    x, y = _data(features, per_row, 3 * batch)
    model = _model(method, features, units, fan_in)
    if method in ("densified", "int8_dense"):
        x = _batch(method, x)
    # The peak of this address space (VmHWM, reset to the live size), not
    # ru_maxrss, which survives exec and would start at the parent's size.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    print(json.dumps({"grown_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_growth(method: str, *sizes: int) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, *map(str, sizes)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["grown_mib"]


def step_times(methods: list[str], x, y, sizes: tuple[int, int, int], rounds: int) -> dict[str, float]:
    """Median seconds per train_on_batch step; methods take turns round by round."""
    models = {m: _model(m, *sizes) for m in methods}
    batches = {m: _batch(m, x) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            models[m].train_on_batch(batches[m], y)  # untimed warm-up (and the first trace)
            start = time.perf_counter()
            for _ in range(3):
                models[m].train_on_batch(batches[m], y)
            times[m].append((time.perf_counter() - start) / 3)
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--child", nargs=6)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], *map(int, args.child[1:]))
        return
    import tensorflow as tf

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "unknown")
    features, units, fan_in, batch, per_row = (2_000, 64, 20, 256, 10) if args.quick else (200_000, 64, 2_000, 2_048, 50)
    rounds = 2 if args.quick else 3
    lines = [
        "# Sparse inputs",
        "",
        f"`python benchmarks/sparse_input.py{' --quick' if args.quick else ''}` on {cpu}, {os.cpu_count()} cores, "
        f"TensorFlow {tf.__version__}; 1-minute load average {os.getloadavg()[0]:.1f} when it started. "
        "Step times are measured side by side in one process; each peak in its own process.",
        "",
        f"## {features:,} features, {per_row} nonzeros per row, batch {batch}, Adam",
        "",
        f"SparseDense: {units} units x fan-in {fan_in} = {units * fan_in:,} entries; Keras Dense: {features * units:,} "
        "weights. Memory: peak RSS growth of `fit` over three batches, each method in its own process.",
        "",
        "| method | peak memory growth (MiB) | step time (ms) |",
        "|---|---:|---:|",
    ]
    methods = ["sparse", "keras_dense", "densified"]
    labels = {
        "sparse": "SparseDense, sparse input (from the nonzeros)",
        "keras_dense": "Keras Dense, sparse input",
        "densified": "SparseDense, densified float32 batch",
        "int8_dense": "SparseDense, int8 dense batch",
    }
    sizes = (features, units, fan_in, batch, per_row)
    memory = {m: peak_growth(m, *sizes) for m in methods}
    x, y = _data(features, per_row, batch)
    timed = step_times(methods, x, y, (features, units, fan_in), rounds)
    for m in methods:
        lines.append(f"| {labels[m]} | {memory[m]:.0f} | {1e3 * timed[m]:.1f} |")
        print(lines[-1], flush=True)

    # Sparse vs int8 dense genotypes: a smaller matrix, the fraction of nonzeros varied.
    features2, batch2 = (2_000, 128) if args.quick else (20_000, 512)
    fractions = [0.001, 0.01, 0.05, 0.2, 0.5]
    lines += [
        "",
        f"## Sparse input vs an int8 dense genotype matrix ({features2:,} features, batch {batch2}, "
        f"{units} units x fan-in {min(fan_in, features2)})",
        "",
        "| nonzeros per row | sparse step (ms) | int8 dense step (ms) | int8 / sparse |",
        "|---:|---:|---:|---:|",
    ]
    crossover = []
    for fraction in fractions:
        per_row2 = max(1, int(fraction * features2))
        x2, y2 = _data(features2, per_row2, batch2)
        t = step_times(["sparse", "int8_dense"], x2, y2, (features2, units, min(fan_in, features2)), rounds)
        crossover.append((fraction, t["sparse"], t["int8_dense"]))
        lines.append(f"| {fraction:.1%} | {1e3 * t['sparse']:.1f} | {1e3 * t['int8_dense']:.1f} | "
                     f"{t['int8_dense'] / t['sparse']:.2f} |")
        print(lines[-1], flush=True)
    suffix = "_quick" if args.quick else ""
    lines += ["", "int8 / sparse above 1: the sparse input is faster."]
    with open(os.path.join(HERE, f"SPARSE_INPUT{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar([labels[m].replace(", ", "\n") for m in methods], [memory[m] for m in methods])
    left.set_ylabel("peak memory growth of fit (MiB)")
    left.tick_params(axis="x", labelsize=7)
    right.plot([c[0] for c in crossover], [1e3 * c[1] for c in crossover], "o-", label="sparse input")
    right.plot([c[0] for c in crossover], [1e3 * c[2] for c in crossover], "s-", label="int8 dense")
    right.set_xscale("log")
    right.set_xlabel("fraction of nonzeros per row")
    right.set_ylabel("step time (ms)")
    right.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, f"sparse_input{suffix}.png"), dpi=100)


if __name__ == "__main__":
    main()
