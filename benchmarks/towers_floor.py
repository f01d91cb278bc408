"""How close a `Towers` training step gets to its first layer's three GEMMs.

    python benchmarks/towers_floor.py [--rounds N] [--batch 256]

A ``Towers(1024, hidden_units=[16, 16])`` over 256 inputs spends most of
its FLOPs in the shared first layer, a dense ``(256, 16384)`` product. A
training step (SGD, gradients w.r.t. the weights and the input) needs that
product three times: forward ``x @ W``, input gradient ``dy @ W.T`` and
weight gradient ``x.T @ dy``. No implementation can beat those three GEMMs
at this machine's rate; everything the step does besides them (bias, ReLU,
the tower products, loss, update) is its overhead.

Times, side by side in one process as ``run.py`` does (rounds in shuffled
order, each round several consecutive calls of one after the warm-up
steps that refill the caches), the Towers step and two functions running
the three plain GEMMs of those shapes: on operands transposed beforehand,
and in the step's own forms (a transpose flag, an einsum). The faster of
the two is the floor; it prints the ratio step / floor per measurement and
its median, with the CPU model.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SPARSELAYERS_AUTOTUNE_CACHE", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The sparselayers of this checkout, not an installed one.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402
from run import interleaved_medians, machine, steps  # noqa: E402

TOWERS, HIDDEN, TRUNK = 1024, [16, 16], 256


def three_gemms(batch: int, trunk: int, units: int, flags: bool = False):
    """The first layer's three products as plain GEMMs, on operands made once.

    ``flags``: as the step forms them, from untransposed operands (a
    transpose flag for ``x.T @ dy``, an einsum for ``dy @ W.T``); otherwise
    on operands transposed beforehand.
    """
    rng = np.random.default_rng(1)

    def matrix(rows, cols):
        return tf.constant(rng.normal(size=(rows, cols)).astype("float32"))

    x, w, dy, w_t, x_t = matrix(batch, trunk), matrix(trunk, units), matrix(batch, units), matrix(units, trunk), matrix(
        trunk, batch
    )

    @tf.function
    def gemms():
        # forward x @ W, input gradient dy @ W.T, weight gradient x.T @ dy;
        # like the step, it returns only small results: handing a 16 MiB
        # tensor to Python cost 2 to 4 ms more than computing it.
        if flags:
            return (tf.matmul(x, w)[0], tf.einsum("bj,ij->bi", dy, w),
                    tf.matmul(x, dy, transpose_a=True)[0])
        return tf.matmul(x, w)[0], tf.matmul(dy, w_t), tf.matmul(x_t, dy)[0]

    return gemms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="independent measurements (each a full set of rounds)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed steps per measurement")
    args = parser.parse_args(argv)
    batch = args.batch
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, TRUNK)).astype("float32"))
    y = tf.constant(rng.normal(size=(batch, TOWERS)).astype("float32"))
    keras.utils.set_random_seed(0)
    towers = sl.Towers(TOWERS, hidden_units=HIDDEN)
    inputs = keras.Input((TRUNK,))
    calls = {"Towers step": (steps(keras.Model(inputs, towers(inputs)))[1], (x, y))}
    # Two forms of the same three GEMMs: the faster of the two, round by round, is the floor
    # (on the 2-core Intel Xeon either form alone ran at 225 to 290 GFLOP/s from run to run).
    calls["3 GEMMs"] = (three_gemms(batch, TRUNK, TOWERS * HIDDEN[0]), ())
    calls["3 GEMMs, flags"] = (three_gemms(batch, TRUNK, TOWERS * HIDDEN[0], flags=True), ())
    flops = 3 * 2 * batch * TRUNK * TOWERS * HIDDEN[0]
    print(f"Machine: {machine()}, load average {os.getloadavg()[0]:.1f}; sparselayers from {os.path.dirname(sl.__file__)}")
    print(f"Towers({TOWERS}, hidden_units={HIDDEN}) over {TRUNK} inputs, batch {batch}, SGD training step, "
          f"compiled ops {'built' if sl.ops.compiled.available() else 'NOT available'}; median ms\n")
    print("| measurement | Towers step ms | 3 GEMMs ms | GEMM GFLOP/s | Towers / GEMMs |\n|---|---:|---:|---:|---:|")
    ratios = []
    for k in range(args.repeat):
        medians = interleaved_medians(calls, budget=args.budget)
        step, gemms = medians["Towers step"], min(medians["3 GEMMs"], medians["3 GEMMs, flags"])
        ratios.append(step / gemms)
        print(f"| {k + 1} | {1000 * step:.2f} | {1000 * gemms:.2f} | {flops / gemms / 1e9:.0f} | {step / gemms:.2f}x |",
              flush=True)
    print(f"Towers / GEMMs: median {np.median(ratios):.2f}x, range {min(ratios):.2f}x to {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
