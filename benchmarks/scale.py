"""Scale check: time and peak memory per entry of training a 100,000 x 100,000 pattern with Adam.

    python benchmarks/scale.py                        # 10^5 ... 10^7 entries: table and plot
    python benchmarks/scale.py --entries 1e8 --steps 2  # one size: 6,400 MiB, 1.5 minutes on the 2-core Xeon
    python benchmarks/scale.py --entries 1e7 --save   # also save and load a .keras file

Each size runs in a fresh process, which prints the wall time of each phase
and its peak resident memory above the process's baseline (after imports
and one training step of a tiny layer, which starts TF's runtime). The
peak counter is reset once the random pattern is drawn, so the peak is that
of building the layer and model and training; the pattern itself (int32
indices, 8 bytes per entry) is included. Values, gradient and two Adam
slots need 16 bytes per entry; the rest is the kernel's index constant (8
bytes), transients, and a part that grows with batch x size, not with the
entries (about 300 MiB at batch 64), which dominates below 10^6 entries.

Results are merged by entry count into ``results/scale.json`` (a new
machine starts afresh) and written as ``results/scale.md`` (a table naming
the machine) and ``results/scale.png`` (step time and peak memory against
the entries, log-log, with a line proportional to the entries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# This checkout's sparselayers, not an installed copy: the figures are of this code.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sparselayers as sl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import machine  # noqa: E402

RESULTS = os.path.join(HERE, "results")
DEFAULT_ENTRIES = "1e5,3e5,1e6,3e6,1e7"


def cpu_detail() -> str:
    """``family F model M, N cores`` from /proc/cpuinfo: the model name alone may be generic."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"family {info['cpu family']} model {info['model']}, {os.cpu_count()} cores"
    except (OSError, KeyError):
        return f"{os.cpu_count()} cores"


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
    wall = time.perf_counter()
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
    result = {"entries": pattern.nnz, "bytes_per_entry": peak * 2**20 / pattern.nnz, "peak_mib": peak,
              "step_s": phases[f"train step {steps}"], "wall_s": time.perf_counter() - wall,
              "kernel": layer.kernel_name, "batch": batch, "size": size, "steps": steps}
    print("RESULT " + json.dumps(result), flush=True)
    if save:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "scale.keras")
            phase("save .keras", lambda: model.save(path))
            print(f"  file size {os.path.getsize(path) / 2**20:.1f} MiB "
                  f"({os.path.getsize(path) / pattern.nnz:.2f} bytes per entry)")
            loaded = phase("load .keras", lambda: keras.models.load_model(path))
            same = np.array_equal(loaded.layers[-1].values.numpy(), layer.values.numpy())
            print(f"  loaded values identical: {same}; pattern identical: {loaded.layers[-1].pattern == pattern}")


def write_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| entries | peak bytes per entry | peak MiB above baseline | training step s | "
             "steps | process wall s | kernel |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: r["entries"]):
        lines.append(f"| {r['entries']:,} | {r['bytes_per_entry']:.0f} | {r['peak_mib']:,.0f} | {r['step_s']:.2f} | "
                     f"{r['steps']} | {r['wall_s']:.0f} | {r['kernel']} |")
    lines.append("\nThe training step is the last step's wall time (one measurement: the machine is shared). "
                 "Below about 10^6 entries the peak is mostly the batch's dense activations "
                 "(25.6 MB each at 100,000 units and batch 64), which do not grow with the entries.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["entries"])
    nnz = np.array([r["entries"] for r in rows], float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "step_s", "training step (s)"), (axes[1], "peak_mib", "peak memory (MiB)")):
        y = np.array([r[key] for r in rows], float)
        ax.loglog(nnz, y, marker="o", label="measured")
        # A line proportional to nnz through the largest size: where the
        # points lie on it, the cost grows linearly with the entries.
        ax.loglog(nnz, y[-1] * nnz / nnz[-1], linestyle="--", color="gray", label="proportional to entries")
        ax.set_xlabel("entries (nnz)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if key == "peak_mib":
            ax.loglog(nnz, 80 * nnz / 2**20, linestyle=":", color="red", label="80 bytes per entry")
            ax.set_title("peak resident memory above the process baseline", fontsize=9)
        else:
            ax.set_title("one training step (forward, gradients, Adam update)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000, help="input_dim = units")
    parser.add_argument("--entries", default=DEFAULT_ENTRIES, help="comma-separated entry counts (fan_in = entries / size)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="also save and load a .keras file")
    parser.add_argument("--out", default=RESULTS, help="directory for scale.json/.md/.png")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_size(args.size, args.one, args.batch, args.steps, args.save)
        return
    here = f"{machine()} ({cpu_detail()})"
    print(f"Machine: {here}\n{args.size:,} x {args.size:,}, Adam, batch {args.batch}, float32\n")
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "scale.json")
    settings = {"size": args.size, "batch": args.batch, "machine": here}
    saved = {}
    if os.path.exists(store):
        with open(store) as f:
            previous = json.load(f)
        if previous.get("settings") == settings:
            saved = {r["entries"]: r for r in previous["rows"]}
        else:
            print(f"{store} holds another machine or setting: starting afresh")
    for entries in (int(float(e)) for e in args.entries.split(",")):
        command = [sys.executable, __file__, "--one", str(entries), "--size", str(args.size),
                   "--batch", str(args.batch), "--steps", str(args.steps)] + (["--save"] if args.save else [])
        print(f"{entries:,} entries:", flush=True)
        out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
        print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT")), flush=True)
        row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
        saved[row["entries"]] = row
        rows = list(saved.values())
        with open(store, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=1)
    header = (f"# Training memory and time against entries\n\nMachine: {here}.\n\n"
              f"`python benchmarks/scale.py`: a random {args.size:,} x {args.size:,} pattern, `SparseDense` with "
              f"Adam, MSE, batch {args.batch}, float32, one fresh process per size; peak resident memory "
              "above the process baseline (TF started) from building the layer through the last training step, "
              "the pattern (8 bytes per entry) included.")
    table = write_table(rows, header)
    print("\n" + table)
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(table)
    title = f"random {args.size:,} x {args.size:,} pattern, SparseDense, Adam, batch {args.batch}\n{here}"
    plot(rows, title, os.path.join(args.out, "scale.png"))


if __name__ == "__main__":
    main()
