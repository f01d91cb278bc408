"""What the index check of a sparse input costs: the product with and without it.

    python benchmarks/sparse_input_check.py [--quick]

A ``tf.SparseTensor`` input's indices are checked against its dense shape
and the layer's ``input_dim`` (two reductions over the indices, and an
assert inside ``tf.function``). This times, side by side as ``run.py`` does
(``interleaved_medians``), inside ``tf.function``, the product
``sparse_input_matmul`` (checked) beside ``SparseInputProduct`` (the same
product, unchecked), forward and forward plus the gradient for the layer's
values, and prints the ratio.

``--cpu-time`` times instead the process's CPU time with TensorFlow on one
thread, calls taking turns in the same way: on a machine shared with other
work, wall time measures the neighbours as much as the check.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SPARSELAYERS_AUTOTUNE_CACHE", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402
from run import interleaved_medians, machine  # noqa: E402
from sparselayers.ops.sparse_input import SparseInputProduct, sparse_input_matmul  # noqa: E402

# (features, units, fan_in, batch, nonzeros per row): the case of
# SPARSE_INPUT.md, a small batch where fixed costs weigh most, and one between.
CASES = [(200_000, 64, 2_000, 2_048, 50), (20_000, 64, 200, 32, 20), (20_000, 64, 2_000, 512, 20)]
QUICK = [(2_000, 16, 50, 32, 5)]


def _batch(features: int, batch: int, per_row: int) -> tf.SparseTensor:
    rng = np.random.default_rng(0)
    columns = np.sort(np.stack([rng.choice(features, per_row, replace=False) for _ in range(batch)]), axis=1)
    rows = np.repeat(np.arange(batch), per_row)
    indices = np.stack([rows, columns.ravel()], axis=1).astype(np.int64)
    return tf.SparseTensor(indices, rng.integers(1, 3, len(indices)).astype("float32"), (batch, features))


def _calls(features: int, units: int, fan_in: int, batch: int, per_row: int) -> dict:
    pattern = sl.patterns.random((features, units), fan_in=fan_in, seed=0)
    values = tf.Variable(np.random.default_rng(1).normal(size=pattern.nnz).astype("float32"))
    x = _batch(features, batch, per_row)
    unchecked = SparseInputProduct(pattern)
    products = {
        "checked": lambda x: sparse_input_matmul(x, pattern, values, "float32"),
        "unchecked": lambda x: unchecked(x, values),
    }
    calls = {}
    for name, product in products.items():
        def step(x, product=product):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(product(x)))
            return tf.convert_to_tensor(tape.gradient(loss, values))

        calls[("forward", name)] = (tf.function(product), (x,))
        calls[("step", name)] = (tf.function(step), (x,))
    return calls


def cpu_time_medians(calls: dict, rounds: int, seconds: float) -> dict:
    """Median CPU seconds per call of each call; each round runs every call, in turn, for about ``seconds``."""
    for fn, args in calls.values():
        fn(*args)  # traced
    times: dict = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            fn(*args)  # refills the caches the previous call evicted, untimed
            count, start = 0, time.process_time()
            while True:
                tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
                count += 1
                if time.process_time() - start >= seconds:
                    break
            times[name].append((time.process_time() - start) / count)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny case: checks that it runs")
    parser.add_argument("--cpu-time", action="store_true", help="CPU time on one thread instead of wall time")
    options = parser.parse_args()
    quick = options.quick
    if options.cpu_time:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    what = "CPU ms, TensorFlow on one thread" if options.cpu_time else "ms"
    print(f"Machine: {machine()}\nMedian {what} inside tf.function; checked / unchecked\n")
    print("| features | units x fan_in | batch | nonzeros per row | forward checked | forward unchecked | ratio "
          "| step checked | step unchecked | ratio |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in QUICK if quick else CASES:
        if options.cpu_time:
            medians = cpu_time_medians(_calls(*case), rounds=3 if quick else 15, seconds=0.05 if quick else 0.3)
        else:
            medians = interleaved_medians(_calls(*case), budget=2 if quick else 20)
        ms = {key: 1e3 * value for key, value in medians.items()}
        features, units, fan_in, batch, per_row = case
        cells = []
        for what in ("forward", "step"):
            checked, unchecked = ms[(what, "checked")], ms[(what, "unchecked")]
            cells += [f"{checked:.3f}", f"{unchecked:.3f}", f"{checked / unchecked:.3f}"]
        print(f"| {features:,} | {units} x {fan_in:,} | {batch:,} | {per_row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
