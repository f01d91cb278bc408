"""What `sl.autotune` measures and chooses on this machine, beside the static rule.

    python benchmarks/autotune.py            # 4096 x 4096 layers, batch 256 (about a minute on 2 cores)
    python benchmarks/autotune.py --quick    # 1024 x 1024, batch 64

The cache is not used (``SPARSELAYERS_AUTOTUNE_CACHE=0``): every kernel is timed.
"""

import argparse
import os
import time

os.environ["SPARSELAYERS_AUTOTUNE_CACHE"] = "0"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sparselayers as sl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layers, for a smoke test")
    args = parser.parse_args()
    n, batch = (1024, 64) if args.quick else (4096, 256)
    patterns = {
        "band65": sl.patterns.banded((n, n), lower=32, upper=32),
        "blockdiag": sl.patterns.block_diagonal([(64, 64)] * (n // 64)),
        "random20": sl.patterns.random((n, n), density=0.2, seed=0),
        "random1": sl.patterns.random((n, n), density=0.01, seed=0),
    }
    inputs = keras.Input((n,))
    model = keras.Model(inputs, [sl.SparseDense(p, name=name)(inputs) for name, p in patterns.items()])
    x = np.random.default_rng(0).normal(size=(batch, n)).astype("float32")
    start = time.perf_counter()
    report = sl.autotune(model, x)
    print(f"sl.autotune took {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs, Keras {keras.__version__}")
    print(report)
    for row in report:
        print(f"{row.layer}: measured {row.chosen}, static rule {sl.ops.choose_kernel(patterns[row.layer])}")


if __name__ == "__main__":
    main()
