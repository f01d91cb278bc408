"""sparselayers benchmark suite: every kernel beside the masked-dense workaround.

    python benchmarks/run.py            # full suite, about 15 minutes on 2 cores
    python benchmarks/run.py --quick    # tiny sizes: checks that everything runs

Each case times, in one process and side by side, the forward pass and one
training step (forward, MSE loss, gradients w.r.t. weights and inputs, SGD
update) of every method, as a compiled ``tf.function`` in steady state:
round after round, each method runs untimed for ``WARMUP_SECONDS`` (one
step at least) and then ``CONSECUTIVE`` timed steps in a row, and the
median over rounds is reported. Peak memory of a training step is measured per method in a
fresh subprocess (peak RSS growth), since allocations cannot be attributed
inside one process. Results: ``results/results.md`` (tables),
``results/results.json`` and ``results/density.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# "auto" is measured as the static rule: a kernel an earlier sl.autotune
# cached on this machine would otherwise replace it.
os.environ.setdefault("SPARSELAYERS_AUTOTUNE_CACHE", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402
from sparselayers import baselines  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_METHODS = [
    "auto", "block", "compiled_block", "banded", "csr", "csr_gather", "csr_dense_grad", "compiled_csr", "dense",
    "gather", "sparse_dense_matmul",
]
# The gather kernel keeps a (batch, nnz) product: skip it where that is huge.
GATHER_MAX_PRODUCTS = 2**27
# Timed steps in a row per method and round...
CONSECUTIVE = 3
# ...after untimed steps lasting this long (one at least). After a step of
# the 4096 x 4096 masked layer, the next ten steps of the block-diagonal
# layer took 8.4, 7.1, 6.7, 6.5, ... 6.0 ms and then stayed at 6.0 (Intel
# Xeon, median of 8 rounds): one untimed step left that layer about 10% slow.
WARMUP_SECONDS = 0.1
# Forward-only latency is also timed at these batch sizes.
LATENCY_BATCHES = (1, 32)


def cases(quick: bool) -> list[dict]:
    n = 256 if quick else 4096
    densities = [0.01, 0.2] if quick else [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3]
    blocks = 8 if quick else 64
    out = [dict(name=f"random {d:g}", kind="pattern", group="density", density=d,
                make=("random", (n, n), d)) for d in densities]
    out.append(dict(name=f"block diagonal {blocks}x{n // blocks}", kind="pattern", group="structure",
                    make=("block_diagonal", n, blocks)))
    out.append(dict(name="banded +-16", kind="pattern", group="structure", make=("banded", n, 16)))
    out.append(dict(name="many outputs", kind="towers", group="towers",
                    outputs=16 if quick else 1024, trunk=32 if quick else 256, hidden=[4, 4] if quick else [16, 16]))
    for case in out:
        case["quick"] = quick
    return out


def make_pattern(spec) -> sl.SparsityPattern:
    kind, *args = spec
    if kind == "random":
        shape, density = args
        return sl.patterns.random(shape, density=density, seed=0)
    if kind == "block_diagonal":
        n, blocks = args
        return sl.patterns.block_diagonal([(n // blocks, n // blocks)] * blocks)
    n, half = args
    return sl.patterns.banded((n, n), lower=half, upper=half)


def pattern_layer(method: str, pattern: sl.SparsityPattern):
    if method == "masked dense":
        return baselines.MaskedDense(pattern)
    if method == "keras Dense":
        return keras.layers.Dense(pattern.shape[1])
    return sl.SparseDense(pattern, kernel=method)


def methods_for(case: dict, pattern=None, batch: int = 256) -> list[str]:
    if case.get("methods"):
        return list(dict.fromkeys(case["methods"]))
    if case["kind"] == "towers":
        return ["sparselayers Towers", "masked dense", "one Dense MLP per output"]
    names = ["masked dense", "keras Dense"]
    for k in KERNEL_METHODS:
        if k == "banded" and sl.structure.detect_band(pattern) is None:
            continue
        if k == "block" and sl.structure.detect_blocks(pattern).mean_area < 4:
            continue
        if k == "compiled_block" and not sl.ops.CompiledBlockKernel.accepts(pattern):
            continue  # it would time its twin, the block kernel
        if k == "gather" and batch * pattern.nnz > GATHER_MAX_PRODUCTS:
            continue
        names.append(k)
    return names


def build_model(case: dict, method: str) -> tuple[keras.Model, int]:
    """The model of one method in one case, and its input width."""
    keras.utils.set_random_seed(0)
    if case["kind"] == "towers":
        towers = sl.Towers(case["outputs"], hidden_units=case["hidden"])
        towers.build((None, case["trunk"]))
        if method == "sparselayers Towers":
            body = towers
        elif method == "masked dense":
            body = baselines.masked_towers(towers)
        else:
            return separate_mlps(towers, case["trunk"]), case["trunk"]
        inputs = keras.Input((case["trunk"],))
        return keras.Model(inputs, body(inputs)), case["trunk"]
    pattern = make_pattern(case["make"])
    inputs = keras.Input((pattern.shape[0],))
    return keras.Model(inputs, pattern_layer(method, pattern)(inputs)), pattern.shape[0]


def separate_mlps(towers: sl.Towers, trunk: int) -> keras.Model:
    """One Keras Dense MLP per tower, every one built (no scaling from a subset).

    Only the cost is compared, so the weights are Keras' own initial ones
    (``baselines.dense_towers`` copies a Towers' weights, one slow
    ``to_scipy`` per tower).
    """
    inputs = keras.Input((trunk,))
    outputs = []
    for _ in range(towers.n_towers):
        x = inputs
        for k, width in enumerate(towers.widths):
            last = k == len(towers.widths) - 1
            x = keras.layers.Dense(width, activation=towers.output_activation if last else towers.activation)(x)
        outputs.append(x)
    return keras.Model(inputs, keras.layers.Concatenate()(outputs) if len(outputs) > 1 else outputs[0])


def useful_flops(case: dict, pattern) -> int:
    """FLOPs of one product by the sparse kernel at batch 1: 2 x nnz (summed over a Towers' layers)."""
    if pattern is not None:
        return 2 * pattern.nnz
    widths = [case["trunk"], *case["hidden"], 1]
    return 2 * case["outputs"] * (widths[0] * widths[1] + sum(a * b for a, b in zip(widths[1:-1], widths[2:])))


def machine_rates(n: int, batch: int) -> dict:
    """Calls measuring this machine's dense GEMM and streaming rates, timed with the methods."""
    rng = np.random.default_rng(1)
    a = tf.constant(rng.normal(size=(batch, n)).astype("float32"))
    b = tf.constant(rng.normal(size=(n, n)).astype("float32"))
    # The streaming read rate: a sum over 64 MiB, less the cost of calling
    # a function at all (a call reading one element).
    big = tf.constant(rng.normal(size=(2**24,)).astype("float32"))
    return {("dense GEMM", "rate"): (tf.function(lambda a, b: tf.matmul(a, b)), (a, b)),
            ("stream", "rate"): (tf.function(lambda t: tf.reduce_sum(t)), (big,)),
            ("call", "rate"): (tf.function(lambda t: t[0]), (big,))}


def steps(model: keras.Model):
    optimizer = keras.optimizers.SGD(1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function
    def forward(x):
        return model(x)

    @tf.function
    def train(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables + [x])
        optimizer.apply(grads[:-1], model.trainable_variables)
        return loss, grads[-1]

    return forward, train


def _run(fn, *args) -> float:
    start = time.perf_counter()
    result = fn(*args)
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)
    return time.perf_counter() - start


def interleaved_medians(
    calls: dict,
    budget: float,
    min_rounds: int = 5,
    max_rounds: int = 15,
    consecutive: int = CONSECUTIVE,
    warmup: float = WARMUP_SECONDS,
) -> dict:
    """Median seconds per call of each call, in steady state.

    Calls take turns round by round, so that drift on a shared machine hits
    every method alike, and the order is shuffled every round. Within a
    round each call runs untimed for ``warmup`` seconds (once at least),
    then ``consecutive`` times in a row, timed: the first steps after
    another model pay for refilling the caches that model evicted, which a
    training loop, calling one model step after step, never does. Each call
    is warmed up (traced) first."""
    for fn, args in calls.values():
        _run(fn, *args)
    times = {name: [] for name in calls}
    order = np.random.default_rng(0)
    names = list(calls)
    while True:
        for k in order.permutation(len(names)):
            fn, args = calls[names[k]]
            warm = 0.0
            while True:  # the steps that refill the caches, untimed
                warm += _run(fn, *args)
                if warm >= warmup:
                    break
            times[names[k]].append(sum(_run(fn, *args) for _ in range(consecutive)) / consecutive)
        rounds = len(next(iter(times.values())))
        slowest = max(sum(t) for t in times.values()) * (consecutive + 1)
        if rounds >= max_rounds or (rounds >= min_rounds and slowest >= budget):
            return {name: float(np.median(t)) for name, t in times.items()}


def trainable_params(model: keras.Model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def time_case(case: dict, batch: int, budget: float) -> list[dict]:
    pattern = make_pattern(case["make"]) if case["kind"] == "pattern" else None
    rows, calls = [], {}
    for method in methods_for(case, pattern, batch):
        model, width = build_model(case, method)
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(size=(batch, width)).astype("float32"))
        y = tf.constant(rng.normal(size=(batch, model.output_shape[-1])).astype("float32"))
        forward, train = steps(model)
        calls[(method, "forward")] = (forward, (x,))
        calls[(method, "step")] = (train, (x, y))
        for small in LATENCY_BATCHES:
            calls[(method, f"forward{small}")] = (forward, (x[:small],))
        row = dict(case=case["name"], group=case["group"], method=method, params=trainable_params(model))
        if method in KERNEL_METHODS:
            row["kernel"] = model.layers[-1].kernel_name
        if pattern is not None:
            row["density"] = pattern.density
        rows.append(row)
    gemm_n = 256 if case.get("quick") else 4096
    calls.update(machine_rates(gemm_n, batch))
    medians = interleaved_medians(calls, budget, warmup=0.0 if case.get("quick") else WARMUP_SECONDS)
    gemm_rate = 2 * batch * gemm_n * gemm_n / medians[("dense GEMM", "rate")] / 1e9
    read_s = max(medians[("stream", "rate")] - medians[("call", "rate")], 1e-6)
    stream_rate = 4 * 2**24 / read_s / 1e9  # GB/s
    flops = useful_flops(case, pattern)
    for row in rows:
        row["forward_ms"] = 1000 * medians[(row["method"], "forward")]
        row["step_ms"] = 1000 * medians[(row["method"], "step")]
        for small in LATENCY_BATCHES:
            row[f"forward{small}_ms"] = 1000 * medians[(row["method"], f"forward{small}")]
        row["gflops"] = 3 * batch * flops / (row["step_ms"] / 1000) / 1e9
        row["gemm_gflops"] = gemm_rate
        row["gemm_fraction"] = row["gflops"] / gemm_rate
        if case["group"] == "density":
            # Every entry reads one row of x.T and one of dy.T (batch floats
            # each) in each of the three products, at the streaming rate.
            row["floor_ms"] = 1000 * 3 * pattern.nnz * 2 * batch * 4 / (stream_rate * 1e9)
            row["read_gbs"] = stream_rate
        print(f"  {case['name']:<26} {row['method']:<26} step {row['step_ms']:9.2f} ms  "
              f"forward {row['forward_ms']:8.2f} ms  {row['gflops']:7.1f} GFLOP/s "
              f"({100 * row['gemm_fraction']:.1f}% of GEMM {gemm_rate:.0f})", flush=True)
    return rows


def run_in_subprocess(flag: str, case: dict, *args: str) -> object:
    """Runs one case (or one memory probe) in a fresh process, so memory never piles up."""
    command = [sys.executable, __file__, flag, json.dumps(case), *args]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    print("\n".join(line for line in lines[:-1] if line.startswith("  ")), flush=True)
    return json.loads(lines[-1])


def memory_probe(case: dict, method: str, batch: int) -> None:
    """Run in a subprocess: prints the peak RSS growth (MiB) of building and training."""
    before = _rss_kib("VmRSS")
    model, width = build_model(case, method)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, width)).astype("float32"))
    y = tf.constant(rng.normal(size=(batch, model.output_shape[-1])).astype("float32"))
    _, train = steps(model)
    for _ in range(3):
        train(x, y)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def _rss_kib(field: str) -> int:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(case: dict, method: str, batch: int) -> float:
    return run_in_subprocess("--probe", case, method, "--batch", str(batch))["peak_mib"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return (f"{cpu}, {os.cpu_count()} CPUs, {'GPU ' + str(len(gpus)) if gpus else 'no GPU'}; "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"sparselayers {sl.__version__}")


def table(rows: list[dict]) -> str:
    lines = ["| case | method | kernel | params | forward ms (batch 1 / 32 / 256) | step ms | masked / method (step) "
             "| GFLOP/s | % of GEMM | peak MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    notes = []
    for case, group in by_case.items():
        masked = next(r for r in group if r["method"] == "masked dense")
        for r in group:
            memory = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""
            forward = " / ".join(f"{r[f'forward{b}_ms']:.2f}" for b in LATENCY_BATCHES) + f" / {r['forward_ms']:.2f}"
            lines.append(
                f"| {case} | {r['method']} | {r.get('kernel', '')} | {r['params']:,} | {forward} | "
                f"{r['step_ms']:.2f} | {masked['step_ms'] / r['step_ms']:.2f}x | {r['gflops']:.1f} | "
                f"{100 * r['gemm_fraction']:.1f}% | {memory} |"
            )
        note = f"- {case}: dense GEMM {group[0]['gemm_gflops']:.0f} GFLOP/s"
        if "floor_ms" in group[0]:
            note += (f"; memory-bound floor of a training step {group[0]['floor_ms']:.2f} ms "
                     f"(reads at {group[0]['read_gbs']:.0f} GB/s)")
        notes.append(note)
    lines.append("\nGFLOP/s count useful FLOPs only: 2 x batch x nnz per product, 3 products per training step "
                 "(the same for every method, so masked dense and Keras Dense score low). % of GEMM: of this "
                 "machine's dense float32 GEMM rate (batch x n times n x n, n = 4096, 256 with --quick), timed in the same rounds. "
                 "The memory-bound floor of scattered patterns: every entry reads one row of x.T and one of dy.T "
                 "(batch floats each) in each of the three products, at the streaming read rate "
                 "(a sum over 64 MiB, less the time of a call that reads one element), timed in the same rounds. "
                 "Rows reused from cache can beat it: it is the floor at main-memory speed.\n")
    lines.extend(notes)
    return "\n".join(lines)


def density_plot(sweep: list[dict], path: str, *, bold: str, solid: tuple[str, ...], ylabel: str, title: str) -> None:
    """Step time against density, one line per method, log-log: ``bold`` drawn thick, ``solid`` methods with markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in sweep):
        points = sorted((r["density"], r["step_ms"]) for r in sweep if r["method"] == method)
        ax.plot(*zip(*points), "-o" if method in solid else "--.", label=method, linewidth=2.5 if method == bold else 1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density of a random pattern")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows: list[dict], path: str) -> None:
    density_plot([r for r in rows if r["group"] == "density"], path, bold="auto", solid=("auto", "masked dense"),
                 ylabel="training step (ms), batch 256", title="Training step time vs density (lower is better)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the suite runs")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=float, default=None, help="seconds of repeats per timing")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to time, masked dense always included (default: all)")
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--time-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    budget = args.budget or (0.05 if args.quick else 2.0)
    if args.probe:
        memory_probe(json.loads(args.probe[0]), args.probe[1], args.batch)
        return 0
    if args.time_case:
        print(json.dumps(time_case(json.loads(args.time_case), args.batch, budget)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    header = f"Machine: {machine()}\nBatch {args.batch}, float32; times are medians; ratios are masked-dense time / method time, measured in one process."
    print(header, flush=True)
    rows = []
    for case in cases(args.quick):
        if args.only and args.only not in case["name"]:
            continue
        if args.methods:
            case["methods"] = ["masked dense", *args.methods.split(",")]
        case_rows = run_in_subprocess("--time-case", case, "--batch", str(args.batch), "--budget", str(budget))
        if not args.no_memory:
            # quick mode only checks that the probe works, on one method
            for r in case_rows[:1] if args.quick else case_rows:
                r["peak_mib"] = measure_memory(case, r["method"], args.batch)
            args.no_memory = args.quick
        rows.extend(case_rows)
    text = f"# sparselayers benchmarks\n\n{header}\n\n{table(rows)}\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": machine(), "batch": args.batch, "rows": rows}, f, indent=1)
    if any(r["group"] == "density" for r in rows):
        plot(rows, os.path.join(args.out, "density.png"))
    print("\n" + table(rows))
    print(f"\nWrote {args.out}/results.md, results.json, density.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
