"""Finding a pattern: pruning and dynamic sparse training, side by side.

    python benchmarks/pruning.py            # about 10 minutes on 2 cores
    python benchmarks/pruning.py --quick    # tiny sizes: checks that everything runs

Three parts, all in one process:

1. Accuracy against density on scikit-learn's handwritten digits (shipped
   with scikit-learn, no download): an MLP 64-256-256-10 at densities 50%,
   20%, 10% and 5% of every Dense layer, trained as a dense baseline, with a
   static random pattern, one-shot ``sl.sparsify`` of the trained dense
   model + fine-tuning, a gradual loop of ``sparsify`` and ``fit``, SET and
   RigL (the last two when ``sl.callbacks`` exists). Test accuracy, median
   time per training step inside ``fit`` and trainable parameters.
2. A teacher problem: a linear teacher whose kernel lives on a hidden random
   pattern; a student with a random pattern of the same density learns it
   with a fixed pattern, SET or RigL. The share of the teacher's connections
   that the student's pattern holds is recorded over training.
3. Speed: one training step of a 1024-2048-2048-10 MLP, dense Keras beside
   ``sparsify``'d copies (entries, and 16x16 / 32x32 tiles) at several
   densities, timed round-robin in one process.

Results: ``pruning.md`` (tables), ``pruning.json`` and ``pruning.png`` in
``--out`` (default: this directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import WARMUP_SECONDS, interleaved_medians, machine, steps, trainable_params  # noqa: E402

HAVE_CALLBACKS = hasattr(sl, "callbacks")


# Part 1: accuracy against density --------------------------------------------


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    return train_test_split(x, data.target, test_size=0.2, random_state=seed, stratify=data.target)


def mlp(widths: list[int], seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((widths[0],))]
    for i, units in enumerate(widths[1:]):
        last = i == len(widths) - 2
        layers.append(keras.layers.Dense(units, activation=None if last else "relu", name=f"dense_{i}"))
    return keras.Sequential(layers)


def static_random(widths: list[int], density: float, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((widths[0],))]
    for i, (n, m) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        pattern = sl.patterns.random((n, m), density=density, seed=seed * 100 + i)
        layers.append(sl.SparseDense(pattern, activation=None if last else "relu", name=f"dense_{i}"))
    return keras.Sequential(layers)


class StepTimer(keras.callbacks.Callback):
    """Seconds between consecutive training batches of an epoch.

    The first batch of each epoch (which traces, or follows the epoch's end
    work) only starts the clock.
    """

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._last = None

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def compile_model(model: keras.Model, lr: float) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def fit(model, data, epochs: int, batch: int, callbacks=()) -> list[float]:
    x_train, _, y_train, _ = data
    timer = StepTimer()
    model.fit(x_train, y_train, batch_size=batch, epochs=epochs, verbose=0, shuffle=True,
              callbacks=[timer, *callbacks])
    return timer.times


def accuracy(model, data) -> float:
    _, x_test, _, y_test = data
    logits = model.predict(x_test, verbose=0, batch_size=512)
    return float(np.mean(np.argmax(logits, axis=1) == y_test))


def density_of(model) -> float:
    kept = total = 0
    for layer in model.layers:
        if isinstance(layer, sl.SparseDense):
            kept += layer.pattern.nnz
            total += layer.pattern.shape[0] * layer.pattern.shape[1]
    return kept / total


def gradual_densities(final: float, rounds: int) -> list[float]:
    """Zhu & Gupta's cubic schedule from dense to ``final`` in ``rounds`` steps."""
    return [final + (1 - final) * (1 - i / rounds) ** 3 for i in range(1, rounds + 1)]


def accuracy_rows(args, data) -> list[dict]:
    steps_per_epoch = -(-len(data[0]) // args.batch)
    total_steps = args.epochs * steps_per_epoch
    update_freq = max(4, total_steps // 20)
    rows = []

    def row(method, density, model, times, seed, epochs):
        rows.append(dict(method=method, density=density, seed=seed, accuracy=accuracy(model, data),
                         step_ms=1e3 * float(np.median(times)) if times else float("nan"),
                         mean_step_ms=1e3 * float(np.mean(times)) if times else float("nan"),
                         params=trainable_params(model), epochs=epochs,
                         actual_density=density_of(model) if density < 1 else 1.0))

    for seed in range(args.seeds):
        dense = compile_model(mlp(args.widths, seed), args.lr)
        times = fit(dense, data, args.epochs, args.batch)
        row("dense", 1.0, dense, times, seed, f"{args.epochs}")
        tune = args.epochs // 2
        for density in args.densities:
            model = compile_model(static_random(args.widths, density, seed), args.lr)
            row("static random", density, model, fit(model, data, args.epochs, args.batch), seed, f"{args.epochs}")

            model = compile_model(sl.sparsify(dense, density=density), args.lr)
            row("one-shot sparsify", density, model, fit(model, data, tune, args.batch), seed,
                f"{args.epochs} dense + {tune}")

            model, times = dense, []
            schedule = gradual_densities(density, args.rounds)
            for k, step_density in enumerate(schedule):
                model = compile_model(sl.sparsify(model, density=step_density), args.lr)
                epochs = tune // args.rounds + (1 if k < tune % args.rounds else 0)
                times += fit(model, data, max(epochs, 1), args.batch)
            row("gradual sparsify", density, model, times, seed, f"{args.epochs} dense + {tune}")

            if HAVE_CALLBACKS:
                for name, cls in [("SET", sl.callbacks.SET), ("RigL", sl.callbacks.RigL)]:
                    model = compile_model(static_random(args.widths, density, seed), args.lr)
                    callback = cls(update_freq=update_freq, drop_fraction=0.3, seed=seed)
                    row(name, density, model, fit(model, data, args.epochs, args.batch, [callback]), seed,
                        f"{args.epochs}")
        print(f"  seed {seed} done", flush=True)
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, density): mean and spread over seeds."""
    out = {}
    for r in rows:
        out.setdefault((r["method"], r["density"]), []).append(r)
    merged = []
    for (method, density), group in out.items():
        acc = np.array([g["accuracy"] for g in group])
        merged.append(dict(method=method, density=density, accuracy=float(acc.mean()), accuracy_std=float(acc.std()),
                           seeds=len(group), step_ms=float(np.nanmedian([g["step_ms"] for g in group])),
                           mean_step_ms=float(np.nanmean([g["mean_step_ms"] for g in group])),
                           params=group[0]["params"], epochs=group[0]["epochs"],
                           actual_density=group[0]["actual_density"]))
    return merged


# Part 2: recovering a teacher's pattern ---------------------------------------


class Overlap(keras.callbacks.Callback):
    """Share of the teacher's connections held by the student's pattern, every ``every`` steps."""

    def __init__(self, layer_name: str, teacher: sl.SparsityPattern, every: int):
        super().__init__()
        self.layer_name, self.teacher, self.every = layer_name, teacher, every
        self.history: list[tuple[int, float]] = []
        self.step = 0

    def _record(self):
        pattern = self.model.get_layer(self.layer_name).pattern
        self.history.append((self.step, (pattern & self.teacher).nnz / self.teacher.nnz))

    def on_train_begin(self, logs=None):
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self._record()


def teacher_rows(args) -> tuple[list[dict], dict]:
    n, m, density = args.teacher_shape[0], args.teacher_shape[1], args.teacher_density
    rng = np.random.default_rng(0)
    teacher = sl.patterns.random((n, m), density=density, seed=123)
    weights = rng.normal(size=teacher.nnz) * rng.choice([-1, 1], size=teacher.nnz)
    kernel = teacher.to_dense(weights).astype("float32")
    x = rng.normal(size=(args.teacher_samples, n)).astype("float32")
    y = x @ kernel + 0.01 * rng.normal(size=(len(x), m)).astype("float32")
    x_test = rng.normal(size=(1000, n)).astype("float32")
    y_test = x_test @ kernel
    total = args.teacher_epochs * -(-len(x) // args.batch)
    update_freq = max(4, total // 40)
    methods = [("static random", None)]
    if HAVE_CALLBACKS:
        methods += [("SET", sl.callbacks.SET), ("RigL", sl.callbacks.RigL)]
    rows, curves = [], {}
    for name, cls in methods:
        keras.utils.set_random_seed(0)
        start = sl.patterns.random((n, m), density=density, seed=7)
        model = keras.Sequential([keras.Input((n,)), sl.SparseDense(start, use_bias=False, name="student")])
        model.compile(optimizer=keras.optimizers.Adam(args.teacher_lr), loss="mse")
        overlap = Overlap("student", teacher, every=max(1, total // 40))
        callbacks = [overlap]
        if cls is not None:
            callbacks.append(cls(update_freq=update_freq, drop_fraction=0.3, seed=0))
        model.fit(x, y, batch_size=args.batch, epochs=args.teacher_epochs, verbose=0, callbacks=callbacks)
        overlap._record()
        mse = float(np.mean((model.predict(x_test, verbose=0) - y_test) ** 2))
        history = overlap.history
        at = {f"overlap@{q}%": min(history, key=lambda h: abs(h[0] - q / 100 * total))[1] for q in (0, 25, 50, 75, 100)}
        rows.append(dict(method=name, test_mse=mse, **at))
        curves[name] = history
    return rows, dict(curves=curves, total_steps=total, update_freq=update_freq, shape=[n, m], density=density)


# Part 3: speed ---------------------------------------------------------------


def speed_rows(args) -> list[dict]:
    widths = args.speed_widths
    dense = mlp(widths, 0)
    models = {("dense Keras", 1.0): dense}
    for density in args.speed_densities:
        models[("sparsify", density)] = sl.sparsify(dense, density=density)
        for block in args.speed_blocks:
            models[(f"sparsify block={block}x{block}", density)] = sl.sparsify(dense, density=density, block=(block, block))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(args.speed_batch, widths[0])).astype("float32"))
    y = tf.constant(rng.normal(size=(args.speed_batch, widths[-1])).astype("float32"))
    calls = {key: (steps(model)[1], (x, y)) for key, model in models.items()}
    medians = interleaved_medians(calls, budget=args.speed_budget, warmup=0.0 if args.quick else WARMUP_SECONDS)
    rows = []
    for (method, density), model in models.items():
        hidden = model.get_layer("dense_1")  # the largest layer, 2048 x 2048
        kernel = hidden.kernel_name if isinstance(hidden, sl.SparseDense) else "Keras Dense"
        rows.append(dict(method=method, density=density, kernel=kernel, step_ms=1e3 * medians[(method, density)],
                         params=trainable_params(model)))
    base = medians[("dense Keras", 1.0)]
    for r in rows:
        r["speedup"] = 1e3 * base / r["step_ms"]
    return rows


# Report ----------------------------------------------------------------------


def tables(results: dict) -> str:
    args = results["settings"]
    lines = [
        "# Finding a pattern: pruning and dynamic sparse training",
        "",
        f"Command: `python benchmarks/pruning.py{' --quick' if args['quick'] else ''}`  ",
        f"Machine: {results['machine']}  ",
        f"Duration: {results['seconds']:.0f} s; 1-minute load average {results['load'][0]:.1f} at the start, "
        f"{results['load'][1]:.1f} at the end (other jobs share the machine: compare within a table).",
        "",
        f"## Digits (scikit-learn, {results['train_size']} train / {results['test_size']} test), "
        f"MLP {'-'.join(map(str, args['widths']))}",
        "",
        f"Adam {args['lr']}, batch {args['batch']}, every Dense layer at the density; mean test accuracy over "
        f"{args['seeds']} seed(s) (± std). Pruning starts from the trained dense model; gradual: "
        f"{args['rounds']} rounds of `sparsify` + `fit` on a cubic schedule. Step time: time per batch inside "
        "`fit`, Keras overhead included; the median is a step between updates, the mean includes SET/RigL's "
        "topology updates and the retrace after each."
        + ("" if HAVE_CALLBACKS else " **SET and RigL rows missing: `sl.callbacks` is not in this build.**"),
        "",
        "| method | density | accuracy | epochs | step ms (median) | step ms (mean) | trainable params |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(results["accuracy"], key=lambda r: (-r["density"], r["method"])):
        lines.append(f"| {r['method']} | {r['actual_density']:.1%} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['epochs']} | {r['step_ms']:.2f} | {r['mean_step_ms']:.2f} | {r['params']:,} |")
    teacher = results["teacher"]
    lines += [
        "",
        f"## Teacher problem: recovering a hidden pattern ({teacher['shape'][0]} x {teacher['shape'][1]}, "
        f"density {teacher['density']:.0%})",
        "",
        f"A linear teacher whose kernel lives on a hidden random pattern; the student starts from another random "
        f"pattern of the same nnz. Overlap: share of the teacher's connections in the student's pattern, at "
        f"0/25/50/75/100% of {teacher['total_steps']} steps (updates every {teacher['update_freq']} steps, "
        "drop fraction 0.3).",
        "",
        "| method | overlap 0% | 25% | 50% | 75% | 100% | test MSE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["teacher_rows"]:
        lines.append(f"| {r['method']} | " + " | ".join(f"{r[f'overlap@{q}%']:.2f}" for q in (0, 25, 50, 75, 100))
                     + f" | {r['test_mse']:.4f} |")
    lines += [
        "",
        f"## Speed: training step of an MLP {'-'.join(map(str, args['speed_widths']))}, batch {args['speed_batch']}",
        "",
        "One SGD step (forward, MSE, gradients, update) as a `tf.function`, median of interleaved rounds "
        "(each round: every method untimed for 0.1 s, then three timed steps). "
        "Kernel: the one `kernel=\"auto\"` picked for the largest hidden layer.",
        "",
        "| method | density | kernel | step ms | vs dense Keras | trainable params |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in results["speed"]:
        lines.append(f"| {r['method']} | {r['density']:.0%} | {r['kernel']} | {r['step_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['params']:,} |")
    return "\n".join(lines) + "\n"


def percent_ticks(ax, densities: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(densities, [f"{d:.0%}" for d in densities])
    ax.minorticks_off()


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Stacked, at about the docs' column width, so the text stays readable there.
    plt.rcParams.update({"font.size": 11})
    fig, axes = plt.subplots(3, 1, figsize=(7, 12))
    ax = axes[0]
    rows = results["accuracy"]
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0]["accuracy"], color="black", linestyle="--", label="dense")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        points = sorted((r["density"], r["accuracy"], r["accuracy_std"]) for r in rows if r["method"] == method)
        d, a, s = map(np.array, zip(*points))
        ax.errorbar(d, a, yerr=s, marker="o", capsize=3, label=method)
    percent_ticks(ax, results["settings"]["densities"])
    ax.set_xlabel("density (share of Dense entries kept)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Digits MLP: accuracy vs density")
    ax.legend(fontsize=9)

    ax = axes[1]
    for method, history in results["teacher"]["curves"].items():
        s, o = zip(*history)
        ax.plot(s, o, label=method)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of the teacher's connections found")
    ax.set_ylim(0, 1.02)
    ax.set_title("Teacher problem: pattern recovery")
    ax.legend(fontsize=9)

    ax = axes[2]
    speed = results["speed"]
    base = [r for r in speed if r["method"] == "dense Keras"][0]["step_ms"]
    ax.axhline(base, color="black", linestyle="--", label="dense Keras")
    for method in dict.fromkeys(r["method"] for r in speed if r["method"] != "dense Keras"):
        points = sorted((r["density"], r["step_ms"]) for r in speed if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    percent_ticks(ax, results["settings"]["speed_densities"])
    ax.set_yscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel("training step (ms, log scale)")
    ax.set_title(f"MLP {'-'.join(map(str, results['settings']['speed_widths']))}: step time")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    parser.add_argument("--out", default=HERE, help="directory for pruning.md/.json/.png")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args(argv)
    full = not args.quick
    args.widths = [64, 256, 256, 10] if full else [64, 32, 10]
    args.densities = [0.5, 0.2, 0.1, 0.05] if full else [0.2]
    args.seeds = args.seeds or (2 if full else 1)
    args.epochs = 30 if full else 2
    args.rounds = 5 if full else 2
    args.batch = 32
    args.lr = 2e-3
    args.teacher_shape = [128, 64] if full else [16, 8]
    args.teacher_density = 0.1 if full else 0.25
    args.teacher_samples = 4096 if full else 128
    args.teacher_epochs = 20 if full else 1
    args.teacher_lr = 1e-2
    args.speed_widths = [1024, 2048, 2048, 10] if full else [64, 128, 128, 10]
    args.speed_densities = [0.3, 0.1, 0.05, 0.02, 0.01] if full else [0.1]
    args.speed_blocks = [16, 32] if full else [16]
    args.speed_batch = 256 if full else 16
    args.speed_budget = 3.0 if full else 0.05
    return args


def main(argv=None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    print(machine(), flush=True)
    data = digits()
    if args.quick:
        data = (data[0][:128], data[1][:128], data[2][:128], data[3][:128])
    print("part 1: accuracy against density", flush=True)
    accuracy_table = mean_rows(accuracy_rows(args, data))
    print("part 2: teacher problem", flush=True)
    teacher_table, teacher = teacher_rows(args)
    print("part 3: speed", flush=True)
    speed = speed_rows(args)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results = dict(machine=machine(), settings=settings, accuracy=accuracy_table, teacher_rows=teacher_table,
                   teacher=teacher, speed=speed, train_size=len(data[0]), test_size=len(data[1]),
                   seconds=time.perf_counter() - start, callbacks=HAVE_CALLBACKS,
                   load=[load_start, os.getloadavg()[0]])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pruning.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = tables(results)
    with open(os.path.join(args.out, "pruning.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(args.out, "pruning.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
