"""Where does each structured kernel start to beat CSR? The thresholds of kernel="auto".

    python benchmarks/crossovers.py            # every question
    python benchmarks/crossovers.py bands      # only questions whose title contains "bands"

Times one training step (as in run.py: forward, MSE loss, gradients, SGD) at
4096 x 4096 (blocks: 4096 rows), batch 256, for the candidate kernels of
each pattern, side by side in rounds, and prints one table per question.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402
from run import interleaved_medians, machine, steps  # noqa: E402

QUESTIONS = {
    "blocks (block vs csr)": [
        (f"{r}x{c} blocks", sl.patterns.block_diagonal([(r, c)] * (4096 // r)), ["block", "csr"])
        for r, c in [(2, 2), (4, 4), (8, 8), (16, 1), (16, 16)]
    ],
    "bands (banded vs csr)": [
        (f"width {2 * h + 1}", sl.patterns.banded((4096, 4096), lower=h, upper=h), ["banded", "csr"])
        for h in [4, 8, 16, 32]
    ],
    "wide bands (banded vs dense)": [
        (f"width {2 * h + 1} ({100 * sl.patterns.banded((4096, 4096), lower=h, upper=h).density:.0f}%)",
         sl.patterns.banded((4096, 4096), lower=h, upper=h), ["banded", "dense"])
        for h in [64, 128, 256, 512, 2048]
    ],
    "density (dense vs the csr values-gradient strategies)": [
        (f"random {d:g}", sl.patterns.random((4096, 4096), density=d, seed=0),
         ["dense", "csr", "csr_gather", "csr_dense_grad"])
        for d in [0.001, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1]
    ],
    "compiled blocks (compiled_block vs block)": [
        (f"{4096 // r} blocks of {r}x{r}", sl.patterns.block_diagonal([(r, r)] * (4096 // r)), ["compiled_block", "block"])
        for r in [8, 16, 32, 64, 128, 256, 1024]
    ],
    "compiled density (compiled_csr vs dense)": [
        (f"random {d:g}", sl.patterns.random((4096, 4096), density=d, seed=0), ["compiled_csr", "dense"])
        for d in [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
    ],
}


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    print(f"Machine: {machine()}\nTraining step, batch 256, float32, median ms (lower is better); per round each kernel "
          "runs untimed for 0.1 s, then three timed steps.\n")
    rng = np.random.default_rng(0)
    for question, cases in QUESTIONS.items():
        if only not in question:
            continue
        print(f"## {question}\n\n| pattern | auto picks | " + " | ".join(cases[0][2]) + " |\n|---|---|"
              + "---:|" * len(cases[0][2]))
        for label, pattern, kernels in cases:
            x = tf.constant(rng.normal(size=(256, pattern.shape[0])).astype("float32"))
            y = tf.constant(rng.normal(size=(256, pattern.shape[1])).astype("float32"))
            calls = {}
            for kernel in kernels:
                inputs = keras.Input((pattern.shape[0],))
                model = keras.Model(inputs, sl.SparseDense(pattern, kernel=kernel)(inputs))
                calls[kernel] = (steps(model)[1], (x, y))
            medians = interleaved_medians(calls, budget=1.0)
            cells = " | ".join(f"{1000 * medians[k]:.1f}" for k in kernels)
            print(f"| {label} | {sl.ops.choose_kernel(pattern)} | {cells} |", flush=True)
            keras.backend.clear_session()
        print()


if __name__ == "__main__":
    main()
