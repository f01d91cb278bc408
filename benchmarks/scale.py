"""Scale check: bytes per entry of training a 100,000 x 100,000 pattern with Adam.

    python benchmarks/scale.py                        # 10^6 and 10^7 entries, batch 64
    python benchmarks/scale.py --entries 1e8          # one size (24 GB machine: ~1 hour)
    python benchmarks/scale.py --entries 1e7 --save   # also save and load a .keras file

Each size runs in a fresh process, which prints the wall time of each phase
and its peak resident memory above the process's baseline (after imports
and one training step of a tiny layer, which starts TF's runtime); the
pattern's own memory (int64 indices and cached flat positions, 24 bytes per
entry) is included. The
training peak is measured after resetting the peak counter once the pattern
is built, so it is the peak of building the model and training, not of
drawing the random pattern. Values, gradient and two Adam slots need 16
bytes per entry.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sparselayers as sl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import machine  # noqa: E402


def rss_mib(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def warm_up() -> None:
    """Trains a tiny layer with Adam: TF's runtime, oneDNN and Keras' tracing
    take a few hundred MiB that do not grow with the pattern."""
    model = keras.Sequential([keras.Input((8,)), sl.SparseDense(sl.patterns.random((8, 8), density=0.5, seed=0))])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((4, 8), "float32"), np.ones((4, 8), "float32"))


def one_size(size: int, entries: int, batch: int, steps: int, save: bool) -> None:
    warm_up()
    baseline = rss_mib("VmRSS")
    phases = {}

    def phase(name, fn):
        start = time.perf_counter()
        result = fn()
        phases[name] = time.perf_counter() - start
        print(f"  {name:<28} {phases[name]:8.2f} s   peak {rss_mib() - baseline:9.0f} MiB above baseline", flush=True)
        return result

    pattern = phase("pattern", lambda: sl.patterns.random((size, size), fan_in=max(1, entries // size), seed=0))
    print(f"  {pattern!r}")
    reset_peak()
    layer = sl.SparseDense(pattern)
    inputs = keras.Input((size,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size)).astype("float32")
    y = rng.normal(size=(batch, size)).astype("float32")
    phase("first train step (traces)", lambda: model.train_on_batch(x, y))
    for k in range(steps - 1):
        phase(f"train step {k + 2}", lambda: model.train_on_batch(x, y))
    peak = rss_mib() - baseline
    print(f"  kernel={layer.kernel_name}: {pattern.nnz:,} entries, peak {peak:,.0f} MiB above baseline, "
          f"{peak * 2**20 / pattern.nnz:.1f} bytes per entry; step {phases[f'train step {steps}']:.2f} s")
    print(f"RESULT {pattern.nnz} {peak * 2**20 / pattern.nnz:.1f} {phases[f'train step {steps}']:.3f}", flush=True)
    if save:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "scale.keras")
            phase("save .keras", lambda: model.save(path))
            print(f"  file size {os.path.getsize(path) / 2**20:.1f} MiB "
                  f"({os.path.getsize(path) / pattern.nnz:.2f} bytes per entry)")
            loaded = phase("load .keras", lambda: keras.models.load_model(path))
            same = np.array_equal(loaded.layers[-1].values.numpy(), layer.values.numpy())
            print(f"  loaded values identical: {same}; pattern identical: {loaded.layers[-1].pattern == pattern}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000, help="input_dim = units")
    parser.add_argument("--entries", default="1e6,1e7", help="comma-separated entry counts (fan_in = entries / size)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="also save and load a .keras file")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_size(args.size, args.one, args.batch, args.steps, args.save)
        return
    print(f"Machine: {machine()}\n{args.size:,} x {args.size:,}, Adam, batch {args.batch}, float32\n")
    rows = []
    for entries in (int(float(e)) for e in args.entries.split(",")):
        command = [sys.executable, __file__, "--one", str(entries), "--size", str(args.size),
                   "--batch", str(args.batch), "--steps", str(args.steps)] + (["--save"] if args.save else [])
        print(f"{entries:,} entries:", flush=True)
        out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
        print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT")), flush=True)
        rows.append(next(line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")))
    print("\n| entries | peak bytes per entry | training step s |\n|---:|---:|---:|")
    for nnz, per_entry, step in rows:
        print(f"| {int(nnz):,} | {float(per_entry):.0f} | {float(step):.2f} |")


if __name__ == "__main__":
    main()
