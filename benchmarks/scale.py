"""Scale check: a 10,000,000-entry pattern builds, trains a step, saves and loads.

    python benchmarks/scale.py                 # 100,000 x 100,000, fan_in 100
    python benchmarks/scale.py --size 20000    # smaller, for a quick look

Prints the wall time of each phase and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=100_000, help="input_dim = units")
    parser.add_argument("--fan-in", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}")
    phases = {}

    def phase(name, fn):
        start = time.perf_counter()
        result = fn()
        phases[name] = time.perf_counter() - start
        print(f"{name:<28} {phases[name]:8.2f} s   peak RSS {peak_mib():9.0f} MiB", flush=True)
        return result

    n = args.size
    pattern = phase("pattern", lambda: sl.patterns.random((n, n), fan_in=args.fan_in, seed=0))
    print(f"  {pattern!r}")
    layer = sl.SparseDense(pattern)
    inputs = keras.Input((n,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="adam", loss="mse")
    print(f"  kernel={layer.kernel_name}, trainable params {model.count_params():,}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, n)).astype("float32")
    y = rng.normal(size=(args.batch, n)).astype("float32")
    phase("first train step (traces)", lambda: model.train_on_batch(x, y))
    phase("second train step", lambda: model.train_on_batch(x, y))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scale.keras")
        phase("save .keras", lambda: model.save(path))
        print(f"  file size {os.path.getsize(path) / 2**20:.1f} MiB for nnz={pattern.nnz:,} "
              f"({os.path.getsize(path) / pattern.nnz:.2f} bytes per entry)")
        loaded = phase("load .keras", lambda: keras.models.load_model(path))
        same = np.array_equal(loaded.layers[-1].values.numpy(), layer.values.numpy())
        print(f"  loaded values identical: {same}; pattern identical: {loaded.layers[-1].pattern == pattern}")


if __name__ == "__main__":
    main()
