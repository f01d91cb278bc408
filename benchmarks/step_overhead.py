"""What a training step costs besides the sparse products: the floor under the fastest kernels.

    python benchmarks/step_overhead.py

Times, side by side as ``run.py`` does (4096 x 4096, batch 256, float32,
SGD, gradients w.r.t. weights and inputs), the block-diagonal 64 x (64 x 64)
layer with each block kernel beside a layer of the same shapes and
parameters whose "product" is ``x * values[0]``: the loss, its gradient,
the bias and the update, at no matmul cost. A kernel's step minus that
layer's is what its products cost.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SPARSELAYERS_AUTOTUNE_CACHE", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402
from run import interleaved_medians, machine, steps  # noqa: E402


class NoProduct(keras.layers.Layer):
    """``x * values[0] + bias``, with ``values`` as large as the pattern's."""

    def __init__(self, pattern: sl.SparsityPattern, **kwargs):
        super().__init__(**kwargs)
        self.pattern = pattern

    def build(self, input_shape):
        self.values = self.add_weight(shape=(self.pattern.nnz,), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.pattern.shape[1],), initializer="zeros")

    def call(self, x):
        return x * self.values[0] + self.bias


def main() -> None:
    pattern = sl.patterns.block_diagonal([(64, 64)] * 64)
    batch, n = 256, pattern.shape[0]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, n)).astype("float32"))
    y = tf.constant(rng.normal(size=(batch, n)).astype("float32"))
    layers = {"no product": NoProduct(pattern)}
    layers.update({name: sl.SparseDense(pattern, kernel=name) for name in ("compiled_block", "block")})
    calls = {}
    for name, layer in layers.items():
        inputs = keras.Input((n,))
        calls[name] = (steps(keras.Model(inputs, layer(inputs)))[1], (x, y))
    medians = interleaved_medians(calls, budget=20)
    flops = 3 * 2 * batch * pattern.nnz
    print(f"Machine: {machine()}\nTraining step, block diagonal 64 x (64 x 64), batch 256, median ms\n")
    print("| layer | step ms | step minus no product, ms | products at GFLOP/s |\n|---|---:|---:|---:|")
    base = medians["no product"]
    for name, seconds in medians.items():
        extra = seconds - base
        rate = f"{flops / extra / 1e9:.0f}" if name != "no product" and extra > 0 else ""
        print(f"| {name} | {1000 * seconds:.2f} | {1000 * extra:.2f} | {rate} |")


if __name__ == "__main__":
    main()
