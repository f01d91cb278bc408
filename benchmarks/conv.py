"""Sparse convolutions against Keras' dense ones: training step time, side by side.

    python benchmarks/conv.py            # the four targets, the alternatives, a density sweep: CONV.md, conv.png
    python benchmarks/conv.py --quick    # tiny sizes: checks that it runs

Times one training step (forward, MSE loss, gradients w.r.t. the weights
and the input, SGD) of a one-layer model, as a compiled ``tf.function`` in
steady state, in one process: methods take turns round by round (shuffled
each round), each running untimed for 0.1 s and then three timed steps in
a row; the median over rounds is reported (``run.interleaved_medians``).

Methods, each on the same random pattern:

- ``keras``: ``keras.layers.Conv{1,2}D`` (oneDNN), the reference;
- ``SparseConv``: ``sl.SparseConv{1,2}D`` with default arguments, what a
  user gets (the kernel it ran is in the ``kernel`` column);
- ``im2col``: image patches times the compiled CSR product (forced
  ``kernel="compiled_csr"``), the formulation before the direct op;
- ``per-tap``: one compiled CSR product per kernel tap over the shifted
  input, summed;
- ``scattered dense``: the values scattered into a dense kernel and Keras'
  convolution (what a dense kernel costs, the floor at high density);
- ``rest of step``: no convolution at all, the input times a weight, plus
  a bias (the output's shape, or 2% more positions for Conv1D's
  ``"valid"``): what the loss, the bias, the
  input gradient and SGD cost in every method's step. ``keras / rest`` is
  the largest ratio a free convolution could reach;
- ``1 entry per filter``: ``SparseConv`` on a pattern of one entry per
  filter, i.e. the ops moving their tensors with almost no multiply-adds:
  the floor of any layer that reads and writes ``channels_last`` tensors.

The floor column is ``density x keras`` time: the dense convolution's rate
applied to the sparse layer's useful multiply-adds only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SPARSELAYERS_AUTOTUNE_CACHE", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402
from run import density_plot, interleaved_medians, machine, steps  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KERAS = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}
SPARSE = {1: sl.SparseConv1D, 2: sl.SparseConv2D}
#: Methods that bound the others instead of computing the convolution.
FLOORS = ("rest of step", "1 entry per filter")


def cases(quick: bool) -> list[dict]:
    """The issue's four targets, then the density sweep of the 3x3 case."""
    scale = 8 if quick else 1
    conv3 = dict(rank=2, shape=(32 // scale, 32 // scale, 32, 128 // scale), kernel_size=3, filters=128 // scale,
                 padding="same")
    targets = [
        dict(name="3x3 conv, 10%", density=0.10, target=2.0, **conv3),
        dict(name="3x3 conv, 2%", density=0.02, target=6.0, **conv3),
        dict(name="1x1 conv, 10%", density=0.10, target=2.0, rank=2, shape=(32 // scale, 16, 16, 256 // scale),
             kernel_size=1, filters=256 // scale, padding="valid"),
        dict(name="Conv1D k5, 10%", density=0.10, target=2.0, rank=1, shape=(64 // scale, 256 // scale, 128 // scale),
             kernel_size=5, filters=128 // scale, padding="valid"),
    ]
    densities = [0.02, 0.1] if quick else [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
    sweep = [dict(name=f"3x3 sweep {d:g}", density=d, sweep=True, **conv3) for d in densities]
    return targets + sweep


def make_pattern(case: dict) -> sl.SparsityPattern:
    rows = case["kernel_size"] ** case["rank"] * case["shape"][-1]
    return sl.patterns.random((rows, case["filters"]), density=case["density"], seed=0)


class _Alternative(keras.layers.Layer):
    """A benchmark-only formulation of a sparse convolution (stride 1, no dilation)."""

    def __init__(self, case: dict, pattern: sl.SparsityPattern):
        super().__init__()
        self.case, self.pattern = case, pattern
        self.k, self.rank = case["kernel_size"], case["rank"]

    def build(self, input_shape):
        self.values = self.add_weight(shape=(self.pattern.nnz,), initializer="glorot_uniform", name="values")
        self.bias = self.add_weight(shape=(self.pattern.shape[1],), initializer="zeros", name="bias")

    def padded(self, x):
        total = self.k - 1 if self.case["padding"] == "same" else 0
        return tf.pad(x, [[0, 0]] + [[total // 2, total - total // 2]] * self.rank + [[0, 0]])


class PerTap(_Alternative):
    """``sum_t shift_t(x) @ W_t``: one compiled CSR product per tap on the tap's rows of the pattern."""

    def build(self, input_shape):
        super().build(input_shape)
        channels, p = self.case["shape"][-1], self.pattern
        pointers = np.asarray(p.row_pointers)
        self.taps = []
        for t in range(self.k**self.rank):
            lo, hi = pointers[t * channels], pointers[(t + 1) * channels]
            sub = sl.SparsityPattern(p.indices[lo:hi] - [t * channels, 0], (channels, p.shape[1]))
            self.taps.append((int(lo), int(hi), sl.ops.get_kernel("compiled_csr", sub)))

    def call(self, x):
        xp = self.padded(x)
        out = [xp.shape[a] - self.k + 1 for a in range(1, self.rank + 1)]
        y = 0
        for (lo, hi, kernel), offsets in zip(self.taps, np.ndindex(*(self.k,) * self.rank)):
            shifted = xp[(slice(None), *(slice(o, o + n) for o, n in zip(offsets, out)))]
            y = y + kernel(tf.reshape(shifted, [-1, shifted.shape[-1]]), self.values[lo:hi])
        return tf.reshape(y, [-1, *out, self.pattern.shape[1]]) + self.bias


class ScatteredDense(_Alternative):
    """Keras' dense convolution on the values scattered into the dense kernel."""

    def call(self, x):
        kernel = tf.scatter_nd(self.pattern.indices, self.values, self.pattern.shape)
        kernel = tf.reshape(kernel, (*(self.k,) * self.rank, self.case["shape"][-1], self.pattern.shape[1]))
        return tf.nn.convolution(x, kernel, padding=self.case["padding"].upper()) + self.bias


class RestOfStep(keras.layers.Layer):
    """No convolution: ``x`` times a weight, plus a bias (filters == channels)."""

    def __init__(self, case: dict):
        super().__init__()
        self.case = case

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")
        self.bias = self.add_weight(shape=(self.case["filters"],), initializer="zeros", name="bias")

    def call(self, x):
        # Not cropped to a "valid" output (2% fewer positions in Conv1D k5):
        # the gradient of a slice would add passes of its own.
        return x * self.scale + self.bias


def layer_for(case: dict, method: str, pattern: sl.SparsityPattern) -> keras.layers.Layer:
    options = dict(kernel_size=case["kernel_size"], padding=case["padding"])
    if method == "keras":
        return KERAS[case["rank"]](case["filters"], **options)
    if method == "SparseConv":
        return SPARSE[case["rank"]](pattern, **options)
    if method == "rest of step":
        return RestOfStep(case)
    if method == "1 entry per filter":
        rows = np.random.default_rng(0).integers(0, pattern.shape[0], pattern.shape[1])
        one = sl.SparsityPattern.from_coo(rows, np.arange(pattern.shape[1]), pattern.shape)
        return SPARSE[case["rank"]](one, **options)
    if method == "im2col":
        return SPARSE[case["rank"]](pattern, kernel="compiled_csr", **options)
    return {"per-tap": PerTap, "scattered dense": ScatteredDense}[method](case, pattern)


def methods_for(case: dict, choice: str | None) -> list[str]:
    if case.get("sweep"):
        return ["keras", "SparseConv", "scattered dense"]
    if case["kernel_size"] == 1:  # SparseDense on the channels: its kernels are the alternatives
        return ["keras", "SparseConv", *FLOORS]
    return (choice or ",".join(["keras", "SparseConv", "im2col", "per-tap", "scattered dense", *FLOORS])).split(",")


def time_case(case: dict, methods: list[str], budget: float) -> list[dict]:
    pattern = make_pattern(case)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=case["shape"]).astype("float32"))
    calls, kernels = {}, {}
    for method in methods:
        keras.utils.set_random_seed(0)
        layer = layer_for(case, method, pattern)
        model = keras.Sequential([keras.Input(case["shape"][1:], batch_size=case["shape"][0]), layer])
        y = tf.zeros_like(model(x))
        _, train = steps(model)
        calls[method] = (train, (x, y))
        kernels[method] = layer
    medians = interleaved_medians(calls, budget)
    for method, layer in kernels.items():  # the kernel of the last (traced) call
        kernels[method] = getattr(layer, "kernel_name", "oneDNN" if method in ("keras", "scattered dense") else "")
        if method == "1 entry per filter":
            kernels[method] = f"{kernels[method]}, {layer.pattern.nnz} entries"
    keras_ms = medians["keras"] * 1e3
    out_pixels = math.prod(case["shape"][:-1]) if case["padding"] == "same" or case["kernel_size"] == 1 else (
        case["shape"][0] * math.prod(n - case["kernel_size"] + 1 for n in case["shape"][1:-1]))
    return [
        dict(case=case["name"], method=m, kernel=kernels[m], density=case["density"], step_ms=t * 1e3,
             ratio=keras_ms / (t * 1e3), floor_ms=case["density"] * keras_ms,
             gflops=None if m in FLOORS else 3 * 2 * pattern.nnz * out_pixels / t / 1e9 if m != "keras" else
             3 * 2 * pattern.shape[0] * pattern.shape[1] * out_pixels / t / 1e9,
             target=case.get("target"), sweep=bool(case.get("sweep")))
        for m, t in medians.items()
    ]


def table(rows: list[dict]) -> str:
    lines = ["| case | method | kernel | step ms | keras / method | target | floor ms (density x keras) | "
             "floor / method | useful GFLOP/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        target = ""
        if r["target"] and r["method"] == "SparseConv":
            target = f">= {r['target']:g}x: {'holds' if r['ratio'] >= r['target'] else 'MISSED'}"
        floor = "" if r["method"] == "keras" or r["method"] in FLOORS else f"{r['floor_ms'] / r['step_ms']:.2f}"
        gflops = "" if r["gflops"] is None else f"{r['gflops']:.1f}"
        lines.append(f"| {r['case']} | {r['method']} | {r['kernel']} | {r['step_ms']:.1f} | {r['ratio']:.2f} | "
                     f"{target} | {r['floor_ms']:.1f} | {floor} | {gflops} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    density_plot([r for r in rows if r["sweep"]], path, bold="SparseConv", solid=("SparseConv",),
                 ylabel="training step (ms)",
                 title="3x3 conv, input (32, 32, 32, 128), 128 filters, same: step time vs density")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs")
    parser.add_argument("--out", default=HERE, help="folder of CONV.md and conv.png")
    parser.add_argument("--only", default="", help="only cases whose name contains this text")
    parser.add_argument("--methods", default=None, help="comma-separated methods of the target cases")
    parser.add_argument("--budget", type=float, default=None, help="seconds of repeats per case")
    args = parser.parse_args(argv)
    budget = args.budget or (0.05 if args.quick else 3.0)
    os.makedirs(args.out, exist_ok=True)
    header = (f"Machine: {machine()}\nTraining step (forward, MSE, gradients w.r.t. weights and input, SGD), "
              f"float32, steady state, median of rounds; ratios are keras time / method time in one process. "
              f"Compiled kernels built: {sl.ops.compiled.available()}.")
    print(header, flush=True)
    rows = []
    for case in cases(args.quick):
        if args.only not in case["name"]:
            continue
        case_rows = time_case(case, methods_for(case, args.methods), budget)
        print(table(case_rows).split("\n", 2)[-1], flush=True)
        rows += case_rows
    text = f"{header}\n\n{table(rows)}\n"
    if not args.quick:
        with open(os.path.join(args.out, "CONV.md"), "w") as f:
            f.write("# Sparse convolutions vs Keras (benchmarks/conv.py)\n\n" + text)
    if any(r["sweep"] for r in rows):
        plot(rows, os.path.join(args.out, "conv.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
