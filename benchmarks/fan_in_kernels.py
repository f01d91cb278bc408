"""Does an equal fan-in (SRigL) pattern make an ELL kernel faster than the others?

One command: ``python benchmarks/fan_in_kernels.py [--size 1024] [--rounds 5]``.
For an equal fan-in pattern (``sl.patterns.random(shape, fan_in=k)``) at 10%
and 5% density, times side by side in one process, round after round (an
untimed warm-up, then several consecutive calls of one kernel, then the
next): a training step (forward and backward, batch 256) and inference at
batch 1 and 256, for the training kernels (csr, csr_dense_grad, gather,
dense, and the automatic choice) and the ELL layout of
:class:`sparselayers.ops.export_kernels.EllKernel`, which with equal fan-in
holds no padding. Medians in milliseconds; writes ``fan_in_kernels.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparselayers as sl  # noqa: E402
from sparselayers.ops import get_kernel  # noqa: E402
from sparselayers.ops.export_kernels import EllKernel  # noqa: E402


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def functions(kernel, values, batch):
    x = tf.constant(np.random.default_rng(0).normal(size=(batch, kernel.pattern.shape[0])).astype("float32"))

    @tf.function
    def infer():
        return kernel(x, values)

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            tape.watch([x, values])
            y = kernel(x, values)
            loss = tf.reduce_sum(y * y)
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, [x, values])]

    return infer, train


def time_of(function, calls: int) -> float:
    function()  # untimed warm-up
    start = time.perf_counter()
    for _ in range(calls):
        out = function()
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return (time.perf_counter() - start) / calls * 1e3


class _Ell:
    """The ELL layout as a training kernel: EllKernel's computation, differentiable as it is."""

    def __init__(self, pattern):
        self.pattern, self._ell = pattern, EllKernel(pattern)

    def __call__(self, x, values):
        return self._ell.compute(x, values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    header = (
        f"Machine: {machine()}, {os.cpu_count()} cores (shared with other jobs: figures are noisy), "
        f"TensorFlow {tf.__version__}; {args.size} x {args.size}, equal fan-in, {args.rounds} rounds of "
        f"{args.calls} calls, medians in ms"
    )
    print(header, flush=True)
    rows = []
    for density in (0.10, 0.05):
        fan_in = round(density * args.size)
        pattern = sl.patterns.random((args.size, args.size), fan_in=fan_in, seed=0)
        values = tf.constant(np.random.default_rng(1).normal(size=pattern.nnz).astype("float32"))
        kernels = {name: get_kernel(name, pattern) for name in ("csr", "csr_dense_grad", "gather", "dense")}
        kernels["ell"] = _Ell(pattern)
        auto = sl.ops.choose_kernel(pattern)
        cases = {}
        for name, kernel in kernels.items():
            infer1, _ = functions(kernel, values, 1)
            infer, train = functions(kernel, values, 256)
            cases[name] = {"train b256": train, "infer b256": infer, "infer b1": infer1}
        times = {name: {what: [] for what in case} for name, case in cases.items()}
        for _ in range(args.rounds):
            for name, case in cases.items():
                for what, function in case.items():
                    times[name][what].append(time_of(function, args.calls))
        for name in cases:
            medians = {what: float(np.median(t)) for what, t in times[name].items()}
            rows.append((density, fan_in, name + (" (auto)" if name == auto else ""), medians))
            print(f"{density:.0%} fan_in={fan_in} {name:15s} " + "  ".join(f"{w} {m:.3f}" for w, m in medians.items()), flush=True)
    lines = [header, "", "| density | fan-in | kernel | train step b256 (ms) | inference b256 (ms) | inference b1 (ms) |",
             "|---|---|---|---|---|---|"]
    for density, fan_in, name, m in rows:
        lines.append(f"| {density:.0%} | {fan_in} | {name} | {m['train b256']:.2f} | {m['infer b256']:.2f} | {m['infer b1']:.3f} |")
    with open(os.path.join(args.out, "fan_in_kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
