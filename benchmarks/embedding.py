"""A large sparse embedding table: SparseEmbedding vs keras.layers.Embedding, memory and step time.

One command: ``python benchmarks/embedding.py [--quick]``. Writes
``benchmarks/EMBEDDING.md``.

The model: ids ``(batch, seq)`` -> embedding ``(vocab, dim)`` -> mean over
the sequence -> ``Dense(1)``, trained with Adam on MSE. Keras' ``Embedding``
holds ``vocab * dim`` floats (and Adam two more tables); ``SparseEmbedding``
holds a random pattern's entries at ``density`` (and Adam two more of
those). Memory: peak RSS growth from before the model is made through
three ``train_on_batch`` steps, each method in its own subprocess. Step
time: ``train_on_batch`` in one process, the methods in turn round by
round, after an untimed warm-up; the median over rounds.
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

METHODS = ("keras_embedding", "sparse_embedding")


def _model(method: str, vocab: int, dim: int, density: float, seq: int):
    import keras

    import sparselayers as sl

    ids = keras.Input((seq,), dtype="int32")
    if method == "keras_embedding":
        table = keras.layers.Embedding(vocab, dim)
    else:
        table = sl.SparseEmbedding(sl.patterns.random((vocab, dim), density=density, seed=0))
    x = keras.layers.GlobalAveragePooling1D()(table(ids))
    model = keras.Model(ids, keras.layers.Dense(1)(x))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def _batch(vocab: int, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, seq)).astype("int32"), rng.normal(size=(batch, 1)).astype("float32")


def _child(method: str, vocab: int, dim: int, density: float, batch: int, seq: int) -> None:
    x, y = _batch(vocab, batch, seq, 0)
    import keras  # noqa: F401 - imported before the measure starts

    import sparselayers  # noqa: F401

    # The peak of this address space (VmHWM, reset to the live size), not
    # ru_maxrss, which a child inherits from its parent.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    model = _model(method, vocab, dim, density, seq)
    for _ in range(3):
        model.train_on_batch(x, y)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_growth(method: str, *sizes) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, *map(str, sizes)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def step_times(sizes, rounds: int) -> dict[str, float]:
    vocab, dim, density, batch, seq = sizes
    models = {m: _model(m, vocab, dim, density, seq) for m in METHODS}
    x, y = _batch(vocab, batch, seq, 1)
    for model in models.values():
        model.train_on_batch(x, y)  # trace and warm up
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method, model in models.items():
            start = time.perf_counter()
            for _ in range(3):
                model.train_on_batch(x, y)
            times[method].append((time.perf_counter() - start) / 3 * 1000)
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 100k-row table and fewer rounds")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, vocab, dim, density, batch, seq = args.child
        _child(method, int(vocab), int(dim), float(density), int(batch), int(seq))
        return
    import tensorflow as tf

    vocab = 100_000 if args.quick else 1_000_000
    sizes = (vocab, 64, 0.05, 1024, 32)
    memory = {m: peak_growth(m, *sizes) for m in METHODS}
    steps = step_times(sizes, rounds=3 if args.quick else 7)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "unknown",
    )
    vocab, dim, density, batch, seq = sizes
    lines = [
        "# A large embedding table: SparseEmbedding vs keras.layers.Embedding",
        "",
        f"`python benchmarks/embedding.py{' --quick' if args.quick else ''}`; CPU: {cpu} ({os.cpu_count()} cores "
        f"visible), TensorFlow {tf.__version__}.",
        "",
        f"Table {vocab:,} x {dim}; SparseEmbedding on a random pattern at density {density} "
        f"({round(density * vocab * dim):,} entries). Batch {batch} x {seq} ids, mean over the sequence, Dense(1), "
        "Adam, MSE. Memory: peak RSS growth from making the model through three steps, each method in its own "
        "process. Step time: `train_on_batch`, side by side in one process, median of rounds of three steps.",
        "",
        "| method | peak memory growth (MiB) | step time (ms) |",
        "|---|---:|---:|",
    ]
    for method in METHODS:
        lines.append(f"| {method} | {memory[method]:.0f} | {steps[method]:.1f} |")
    lines += [
        "",
        f"Ratios (Keras / sparse): memory {memory['keras_embedding'] / memory['sparse_embedding']:.1f}x, "
        f"step time {steps['keras_embedding'] / steps['sparse_embedding']:.2f}x.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(HERE, "EMBEDDING.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
