"""What the index check of a sparse input costs: the product with and without it.

    python benchmarks/sparse_input_check.py [--quick]

A ``tf.SparseTensor`` input's indices are checked against its dense shape
and the layer's ``input_dim`` (two reductions over the indices, and an
assert inside ``tf.function``). This times, side by side as ``run.py`` does
(``interleaved_medians``), inside ``tf.function``, the product
``sparse_input_matmul`` (checked) beside ``SparseInputProduct`` (the same
product, unchecked), forward and forward plus the gradient for the layer's
values, and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys

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
            return tape.gradient(loss, values)

        calls[("forward", name)] = (tf.function(product), (x,))
        calls[("step", name)] = (tf.function(step), (x,))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny case: checks that it runs")
    quick = parser.parse_args().quick
    print(f"Machine: {machine()}\nMedian ms inside tf.function; checked / unchecked\n")
    print("| features | units x fan_in | batch | nonzeros per row | forward checked | forward unchecked | ratio "
          "| step checked | step unchecked | ratio |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in QUICK if quick else CASES:
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
