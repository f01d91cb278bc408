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

``--n-of-m`` asks the same of N:M sparsity: an N:M pattern
(``sl.patterns.n_of_m``, 2:4, 1:8 and 1:16) against a random pattern of the
same density, for each kernel, the two patterns interleaved round by round;
ratios N:M over random per kernel; writes ``n_of_m_kernels.md``. The
dense kernel, which does not read the pattern, is the control: its ratio
shows the noise. ``--cpu-time`` times the process's CPU time with
TensorFlow on one thread instead of wall time (steadier on a shared machine).
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


#: The clock of :func:`time_of`; ``--cpu-time`` makes it the process's CPU time.
CLOCK = time.perf_counter


def time_of(function, calls: int) -> float:
    function()  # untimed warm-up
    start = CLOCK()
    for _ in range(calls):
        out = function()
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return (CLOCK() - start) / calls * 1e3


class _Ell:
    """The ELL layout as a training kernel: EllKernel's computation, differentiable as it is."""

    def __init__(self, pattern):
        self.pattern, self._ell = pattern, EllKernel(pattern)

    def __call__(self, x, values):
        return self._ell.compute(x, values)


#: Kernels timed on N:M and random patterns: the training kernels, the
#: compiled CSR op where it builds, and ELL at batch 1 only (the export
#: layout for serving; at batch 256 a call takes seconds at 2:4).
N_OF_M_KERNELS = ("csr", "csr_dense_grad", "compiled_csr", "dense", "ell")
N_OF_M_RATIOS = ((2, 4), (1, 8), (1, 16))


def compare_n_of_m(args) -> None:
    from sparselayers.ops.compiled import build

    compiled = build.enabled() and build.available()
    names = [k for k in N_OF_M_KERNELS if k != "compiled_csr" or compiled]
    header = (
        f"Machine: {machine()}, {os.cpu_count()} cores (shared with other jobs: figures are noisy), "
        f"TensorFlow {tf.__version__}; {args.size} x {args.size}, N:M against random of equal density, "
        f"{args.rounds} rounds of {args.calls} calls, patterns and kernels interleaved, medians in "
        + ("CPU ms, TensorFlow on one thread" if args.cpu_time else "ms")
        + ("" if compiled else "; compiled kernels not built")
    )
    print(header, flush=True)
    lines = [header, "", "| N:M | density | kernel | case | random (ms) | N:M (ms) | N:M / random |", "|---|---|---|---|---|---|---|"]
    for n, m in N_OF_M_RATIOS:
        patterns = {
            "random": sl.patterns.random((args.size, args.size), density=n / m, seed=0),
            "n_of_m": sl.patterns.n_of_m((args.size, args.size), n, m, seed=0),
        }
        cases = {}
        for kind, pattern in patterns.items():
            values = tf.constant(np.random.default_rng(1).normal(size=pattern.nnz).astype("float32"))
            for name in names:
                kernel = _Ell(pattern) if name == "ell" else get_kernel(name, pattern)
                infer1, _ = functions(kernel, values, 1)
                infer, train = functions(kernel, values, 256)
                modes = {"infer b1": infer1} if name == "ell" else {"infer b256": infer, "infer b1": infer1, "train b256": train}
                for what, function in modes.items():
                    cases[(name, what, kind)] = function
        times = {key: [] for key in cases}
        for _ in range(args.rounds):
            for key, function in cases.items():
                times[key].append(time_of(function, args.calls))
        slots = {kind: EllKernel(p).slots for kind, p in patterns.items()}
        print(f"{n}:{m} ELL slots: random {slots['random']}, n_of_m {slots['n_of_m']} (nnz {patterns['n_of_m'].nnz})")
        for name, what, kind in cases:
            if kind != "random":
                continue
            a, b = (float(np.median(times[(name, what, k)])) for k in ("random", "n_of_m"))
            line = f"| {n}:{m} | {n / m:.2%} | {name} | {what} | {a:.3f} | {b:.3f} | {b / a:.2f} |"
            print(line, flush=True)
            lines.append(line)
        lines.append(
            f"| {n}:{m} | {n / m:.2%} | ell slots | (stored, padding included) | {slots['random']} | "
            f"{slots['n_of_m']} | {slots['n_of_m'] / slots['random']:.2f} |"
        )
    with open(os.path.join(args.out, "n_of_m_kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--n-of-m", action="store_true", help="N:M against random patterns of equal density")
    parser.add_argument("--cpu-time", action="store_true", help="CPU time on one thread instead of wall time")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.n_of_m:
        compare_n_of_m(args)
        return
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
