"""The RigL paper's comparison at equal parameter count, on scikit-learn's digits.

    nice python benchmarks/sparse_training.py          # about 10-15 minutes on 2 loaded cores
    python benchmarks/sparse_training.py --quick       # tiny sizes: checks that everything runs
    nice python benchmarks/sparse_training.py --cnn    # the CNN section, about 25 minutes per dataset

Methods (Evci et al. 2020, table 1 and figure 2), an MLP 64-256-256-10 on
scikit-learn's handwritten digits (shipped with scikit-learn, no download),
at densities 10% and 5% of the weights:

* Dense, and Small-Dense: a dense MLP with hidden widths shrunk to the same
  number of weights as the sparse models;
* Static: a random pattern kept fixed (``sl.sparsify(criterion="random")``
  of the initial model), uniform and ERK;
* SNIP: ``sl.sparsify(criterion="snip", distribution="global")`` on one
  batch at initialisation, then fixed;
* SET and RigL (uniform and ERK) and SRigL (RigL with
  ``constant_fan_in=True`` from an equal fan-in start), from the Static start;
* GradualPruning: dense start (``sl.sparsify(model, density=1.0)``),
  Zhu & Gupta's cubic schedule from 10% to 75% of training, then
  ``sl.strip_pruning``;
* One-shot: the trained dense model, ``sl.sparsify``, then fine-tuned for
  half as many epochs.

Each: test accuracy, mean ± std over seeds; training FLOPs in the RigL
paper's accounting (per sample and step ``3 f`` for a model of forward cost
``f``, ``f`` counting 2 operations per weight; RigL's update steps cost
``2 f_S + f_D``; GradualPruning counts the density of each step; One-shot
adds the dense training); the median time per training step inside ``fit``;
trainable parameters of the final model. Then the teacher problem (as
``benchmarks/pruning.py``): a linear teacher on a hidden random pattern; the
share of its connections the student's pattern recovers under Static, SET,
RigL and SRigL.

Writes ``SPARSE_TRAINING.md`` and ``sparse_training.json`` (in --out, default
this directory) and the plot ``sparse-training.png`` (in --plot-dir, default
docs/images).

``--cnn`` runs the same comparison for convolutions instead, at densities
20% and 10%, without SNIP and One-shot: a Conv1D net of the published
MNIST-1D CNN's shape (Greydanus 2020; the dataset generated offline by the
``mnist1d`` package from its default arguments) and a Conv2D net on digits
as 8x8 images. A sparse convolution's forward cost counts ``2 nnz`` per
output position, a dense one ``2 prod(kernel.shape)``. Writes
``SPARSE_TRAINING_CNN.md``, ``sparse_training_cnn.json`` and
``sparse-training-cnn.png``; ``--datasets`` runs one dataset and merges it
into the json already there, so the two can run in parallel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import sparselayers as sl  # noqa: E402
from pruning import Overlap, StepTimer, accuracy, compile_model, digits, mlp  # noqa: E402
from run import machine, trainable_params  # noqa: E402

DST = {"SET", "RigL uniform", "RigL ERK", "SRigL"}


def positions(layer: keras.layers.Layer) -> int:
    """Output positions per sample at which ``layer``'s kernel is applied (1 for a Dense layer on vectors)."""
    return int(np.prod(layer.output.shape[1:-1]))


def forward_flops(model: keras.Model) -> int:
    """Forward operations per sample of the model's kernels: 2 per weight and output position.

    A sparse layer (any ``sl.SparseKernelLayer``) counts its ``nnz``, a dense
    ``Dense`` or ``Conv`` its whole kernel; a convolution applies its kernel
    at every output position (Dense: one). Biases, activations and pooling
    are left out, as in the RigL paper.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, sl.SparseKernelLayer):
            total += 2 * layer.pattern.nnz * positions(layer)
        elif isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)):
            total += 2 * int(np.prod(layer.kernel.shape)) * positions(layer)
        elif layer.trainable_weights:
            raise ValueError(f"forward_flops does not count {type(layer).__name__} layers. Received: {layer.name}")
    return total


def small_dense_widths(widths: list[int], density: float) -> list[int]:
    """Hidden widths scaled by one factor so the weights total ``density`` of the full MLP's."""
    target = density * sum(a * b for a, b in zip(widths[:-1], widths[1:]))

    def weights(s):
        w = [widths[0]] + [max(1, round(s * h)) for h in widths[1:-1]] + [widths[-1]]
        return sum(a * b for a, b in zip(w[:-1], w[1:])), w

    scale = min((s / 1000 for s in range(1, 1001)), key=lambda s: abs(weights(s)[0] - target))
    return weights(scale)[1]


def fan_in_start(model: keras.Model, density: float, seed: int) -> keras.Model:
    """Equal fan-in per unit or filter (``round(density * rows)`` of the kernel's 2-D view), initial values kept."""
    full = sl.sparsify(model, density=1.0)
    out = keras.Sequential([keras.Input(model.input_shape[1:])])
    for i, layer in enumerate(full.layers):
        if not isinstance(layer, sl.SparseKernelLayer):
            out.add(type(layer).from_config(layer.get_config()))
            continue
        n, m = layer.pattern.shape
        pattern = sl.patterns.random((n, m), fan_in=max(1, round(density * n)), seed=seed * 100 + i)
        new = type(layer).from_config({**layer.get_config(), "pattern": pattern})
        out.add(new)
        kernel = layer.to_dense().reshape(n, m)
        new.values.assign(kernel[pattern.rows, pattern.cols])
        new.bias.assign(layer.bias.numpy())
    return out


def fit(model, data, epochs, batch, callbacks=()):
    x_train, _, y_train, _ = data
    timer = StepTimer()
    model.fit(x_train, y_train, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[timer, *callbacks])
    return timer.times


def run_seed(args, data, seed: int, build, baselines: bool = True) -> list[dict]:
    """Every method on one seed: ``build(seed)`` is the dense model, ``build(seed, density)`` the Small-Dense one.

    ``baselines=False`` leaves out SNIP and One-shot (the CNN section).
    """
    steps_per_epoch = math.ceil(len(data[0]) / args.batch)
    total = args.epochs * steps_per_epoch
    update_freq = max(2, total // 30)
    rows = []

    def row(method, density, model, times, flops, batches=total, **extra):
        f = forward_flops(model)
        rows.append(dict(method=method, density=density, seed=seed, accuracy=accuracy(model, data),
                         step_ms=1e3 * float(np.median(times)) if times else float("nan"),
                         params=trainable_params(model), train_flops=flops if flops is not None else 3 * f * args.batch * batches,
                         forward_flops=f, **extra))

    def init():
        return build(seed)

    dense = compile_model(init(), args.lr)
    dense_times = fit(dense, data, args.epochs, args.batch)
    f_dense = forward_flops(dense)
    row("Dense", 1.0, dense, dense_times, None)
    x_train, _, y_train, _ = data
    for density in args.densities:
        small = compile_model(build(seed, density), args.lr)
        row("Small-Dense", density, small, fit(small, data, args.epochs, args.batch), None)

        starts = {
            "uniform": lambda: sl.sparsify(init(), density, criterion="random", seed=seed),
            "erk": lambda: sl.sparsify(init(), density, criterion="random", seed=seed, distribution="erk"),
        }
        for name, start in (("Static uniform", "uniform"), ("Static ERK", "erk")):
            model = compile_model(starts[start](), args.lr)
            row(name, density, model, fit(model, data, args.epochs, args.batch), None)

        if baselines:
            at_init = compile_model(init(), args.lr)
            batch = (x_train[: args.snip_batch], y_train[: args.snip_batch])
            model = sl.sparsify(at_init, density, criterion="snip", distribution="global", data=batch)
            model = compile_model(model, args.lr)
            row("SNIP", density, model, fit(model, data, args.epochs, args.batch), None)

        evolving = [
            ("SET", starts["uniform"], lambda: sl.callbacks.SET(update_freq, 0.3, seed=seed)),
            ("RigL uniform", starts["uniform"], lambda: sl.callbacks.RigL(update_freq, 0.3, seed=seed)),
            ("RigL ERK", starts["erk"], lambda: sl.callbacks.RigL(update_freq, 0.3, seed=seed)),
            ("SRigL", lambda: fan_in_start(init(), density, seed),
             lambda: sl.callbacks.RigL(update_freq, 0.3, seed=seed, constant_fan_in=True)),
        ]
        for name, start, callback in evolving:
            model = compile_model(start(), args.lr)
            cb = callback()
            times = fit(model, data, args.epochs, args.batch, [cb])
            f_s = forward_flops(model)
            updates = len({u["step"] for u in cb.updates}) if name != "SET" else 0
            # RigL's update steps also compute the dense gradient: 2 f_S + f_D instead of 3 f_S.
            flops = args.batch * (3 * f_s * (total - updates) + (2 * f_s + f_dense) * updates)
            row(name, density, model, times, flops)

        model = compile_model(sl.sparsify(init(), density=1.0), args.lr)
        pruning = sl.callbacks.GradualPruning(density, begin_step=int(0.1 * total), end_step=int(0.75 * total),
                                              frequency=max(1, total // 40))
        full_nnz = {layer.path: layer.pattern.nnz for layer in sl.sparse_layers(model)}
        times = fit(model, data, args.epochs, args.batch, [pruning])
        # FLOPs of each step at the density in force: dense until the first
        # update; a layer's entries count once per output position.
        at = {layer.path: positions(layer) for layer in sl.sparse_layers(model)}
        flops, current, previous = 0, f_dense, 0
        for update in pruning.updates + [dict(step=total)]:
            flops += 3 * current * args.batch * (update["step"] - previous)
            previous = update["step"]
            if "layers" in update:
                current = f_dense - sum(2 * nnz_full * at[path] for path, nnz_full in full_nnz.items()) + sum(
                    2 * nnz * at[path] for path, nnz in update["layers"].items())
        row("GradualPruning", density, sl.strip_pruning(model), times, flops)

        if baselines:
            tune = max(1, args.epochs // 2)
            model = compile_model(sl.sparsify(dense, density), args.lr)
            times = fit(model, data, tune, args.batch)
            flops = 3 * f_dense * args.batch * total + 3 * forward_flops(model) * args.batch * tune * steps_per_epoch
            row("One-shot + fine-tune", density, model, times, flops)
        print(f"  seed {seed} density {density:.0%} done", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["density"]), []).append(r)
    dense_flops = np.mean([r["train_flops"] for r in rows if r["method"] == "Dense"])
    out = []
    for (method, density), group in groups.items():
        acc = np.array([g["accuracy"] for g in group])
        out.append(dict(method=method, density=density, accuracy=float(acc.mean()), accuracy_std=float(acc.std()),
                        seeds=len(group), train_flops=float(np.mean([g["train_flops"] for g in group])),
                        flops_vs_dense=float(np.mean([g["train_flops"] for g in group]) / dense_flops),
                        step_ms=float(np.median([g["step_ms"] for g in group])), params=group[0]["params"]))
    return out


def teacher_rows(args) -> list[dict]:
    n, m, density = args.teacher_shape[0], args.teacher_shape[1], args.teacher_density
    rng = np.random.default_rng(0)
    teacher = sl.patterns.random((n, m), density=density, seed=123)
    kernel = teacher.to_dense(rng.normal(size=teacher.nnz)).astype("float32")
    x = rng.normal(size=(args.teacher_samples, n)).astype("float32")
    y = x @ kernel + 0.01 * rng.normal(size=(len(x), m)).astype("float32")
    total = args.teacher_epochs * math.ceil(len(x) / args.batch)
    update_freq = max(2, total // 40)
    fan_in = round(density * n)
    methods = [
        ("Static", sl.patterns.random((n, m), density=density, seed=7), None),
        ("SET", sl.patterns.random((n, m), density=density, seed=7), lambda: sl.callbacks.SET(update_freq, 0.3, seed=0)),
        ("RigL", sl.patterns.random((n, m), density=density, seed=7), lambda: sl.callbacks.RigL(update_freq, 0.3, seed=0)),
        ("SRigL", sl.patterns.random((n, m), fan_in=fan_in, seed=7),
         lambda: sl.callbacks.RigL(update_freq, 0.3, seed=0, constant_fan_in=True)),
    ]
    rows = []
    for name, start, callback in methods:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((n,)), sl.SparseDense(start, use_bias=False, name="student")])
        model.compile(optimizer=keras.optimizers.Adam(args.teacher_lr), loss="mse")
        overlap = Overlap("student", teacher, every=max(1, total // 40))
        model.fit(x, y, batch_size=args.batch, epochs=args.teacher_epochs, verbose=0,
                  callbacks=[overlap] + ([callback()] if callback else []))
        overlap._record()
        rows.append(dict(method=name, start_overlap=overlap.history[0][1], final_overlap=overlap.history[-1][1],
                         nnz=start.nnz, teacher_nnz=teacher.nnz))
        print(f"  teacher {name}: overlap {overlap.history[0][1]:.2f} -> {overlap.history[-1][1]:.2f}", flush=True)
    return rows


def table(results: dict) -> str:
    a = results["settings"]
    lines = [
        "# Sparse training: the RigL paper's comparison on digits",
        "",
        f"Command: `nice python benchmarks/sparse_training.py{' --quick' if a['quick'] else ''}`  ",
        f"Machine: {results['machine']}  ",
        f"Duration {results['seconds']:.0f} s; 1-minute load average {results['load'][0]:.1f} at the start, "
        f"{results['load'][1]:.1f} at the end: five other engineers' jobs shared the 2 cores, so step times "
        "are noisy (compare within a column).",
        "",
        f"MLP {'-'.join(map(str, a['widths']))} on scikit-learn's digits ({results['train_size']} train / "
        f"{results['test_size']} test), Adam {a['lr']}, batch {a['batch']}, {a['epochs']} epochs "
        f"({results['total_steps']} steps; One-shot: dense training, then {max(1, a['epochs'] // 2)} epochs of "
        f"fine-tuning); SET/RigL update every {results['update_freq']} steps, drop fraction 0.3 (cosine), "
        f"end at 75%. Accuracy: mean ± std over {a['seeds']} seed(s). Training FLOPs: the RigL paper's "
        "accounting, relative to Dense. Params: trainable parameters of the final model (GradualPruning "
        "trains the dense model's before `strip_pruning`). Step: median ms per training step inside `fit`.",
        "",
        "| density | method | test accuracy | training FLOPs (x Dense) | step ms | trainable params |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    order = ["Dense", "Small-Dense", "Static uniform", "Static ERK", "SNIP", "SET", "RigL uniform", "RigL ERK",
             "SRigL", "GradualPruning", "One-shot + fine-tune"]
    for r in sorted(results["summary"], key=lambda r: (-r["density"], order.index(r["method"]))):
        lines.append(f"| {r['density']:.0%} | {r['method']} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['flops_vs_dense']:.2f} | {r['step_ms']:.2f} | {r['params']:,} |")
    t = results["teacher"]
    lines += [
        "",
        f"## Teacher problem: support recovery ({a['teacher_shape'][0]} x {a['teacher_shape'][1]}, "
        f"density {a['teacher_density']:.0%})",
        "",
        "A linear teacher on a hidden random pattern; each student starts from another random pattern of the "
        "same density (SRigL: of equal fan-in) and learns it. Overlap: share of the teacher's connections that "
        "the student's pattern holds, at the start and after training. SRigL keeps each unit's fan-in, so it "
        "can hold at most the teacher's entries that fit within it.",
        "",
        "| method | overlap at start | overlap at end |",
        "|---|---:|---:|",
    ]
    for r in t:
        lines.append(f"| {r['method']} | {r['start_overlap']:.2f} | {r['final_overlap']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({r["density"] for r in results["summary"] if r["density"] < 1}, reverse=True)
    # Stacked, at about the docs' column width, so the text stays readable there.
    fig, axes = plt.subplots(len(densities), 1, figsize=(7, 3.8 * len(densities) + 0.9), squeeze=False)
    dense = next(r for r in results["summary"] if r["method"] == "Dense")
    for ax, density in zip(axes[:, 0], densities):
        group = [r for r in results["summary"] if r["density"] == density]
        for k, r in enumerate(sorted(group, key=lambda r: r["method"])):
            ax.errorbar(r["flops_vs_dense"], r["accuracy"], yerr=r["accuracy_std"], fmt="o", color=f"C{k % 10}",
                        label=r["method"], capsize=3)
        ax.axhline(dense["accuracy"], color="gray", ls="--", lw=1, label="Dense")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (x Dense)")
        ax.set_title(f"density {density:.0%}")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("test accuracy\n(mean ± std over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.9 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The CNN section (--cnn): the same comparison for convolutions.

CNN_ORDER = ["Dense", "Small-Dense", "Static uniform", "Static ERK", "SET", "RigL uniform", "RigL ERK", "SRigL",
             "GradualPruning"]


def mnist1d_data():
    """MNIST-1D (Greydanus 2020) generated from its default arguments and seed, offline: 4000 train / 1000 test."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return d["x"][..., None].astype("float32"), d["x_test"][..., None].astype("float32"), d["y"], d["y_test"]


def digits_images():
    """scikit-learn's digits as 8x8 one-channel images (the MLP section's split)."""
    x_train, x_test, y_train, y_test = digits()
    return x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1), y_train, y_test


def cnn(spec: dict, seed: int, scale: float = 1.0) -> keras.Model:
    """``spec``'s convolutions ("same" padding, ReLU), channels times ``scale``, then a Dense head on the flattened map."""
    keras.utils.set_random_seed(seed)
    conv = keras.layers.Conv1D if len(spec["input"]) == 2 else keras.layers.Conv2D
    layers = [keras.Input(spec["input"])]
    for i, (filters, kernel, stride) in enumerate(spec["convs"]):
        layers.append(conv(max(1, round(scale * filters)), kernel, strides=stride, padding="same", activation="relu",
                           name=f"conv_{i}"))
    return keras.Sequential(layers + [keras.layers.Flatten(), keras.layers.Dense(spec["classes"], name="logits")])


def cnn_weights(spec: dict, scale: float = 1.0) -> int:
    """Kernel weights of ``cnn(spec, seed, scale)``, without building it."""
    spatial, channels, total = list(spec["input"][:-1]), spec["input"][-1], 0
    for filters, kernel, stride in spec["convs"]:
        out = max(1, round(scale * filters))
        total += kernel ** len(spatial) * channels * out
        spatial, channels = [-(-n // stride) for n in spatial], out
    return total + int(np.prod(spatial)) * channels * spec["classes"]


def small_dense_scale(spec: dict, density: float) -> float:
    """The channel scale whose dense CNN has ``density`` of the full CNN's weights (closest on a 0.001 grid)."""
    target = density * cnn_weights(spec)
    return min((s / 1000 for s in range(1, 1001)), key=lambda s: abs(cnn_weights(spec, s) - target))


def cnn_dataset(name: str, args) -> dict:
    """One dataset's runs: every method, density and seed, with its summary."""
    spec, settings = args.cnns[name], argparse.Namespace(**{**vars(args), **args.cnn_settings[name]})
    data = mnist1d_data() if name == "MNIST-1D" else digits_images()
    if args.quick:
        data = tuple(part[:128] for part in data)

    def build(seed, density=None):
        return cnn(spec, seed, 1.0 if density is None else small_dense_scale(spec, density))

    start = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(settings, data, seed, build, baselines=False)
        print(f"  {name} seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    total = settings.epochs * math.ceil(len(data[0]) / settings.batch)
    return dict(spec=spec, settings=args.cnn_settings[name], rows=rows, summary=summary(rows),
                train_size=len(data[0]), test_size=len(data[1]), total_steps=total, update_freq=max(2, total // 30),
                weights=cnn_weights(spec), seconds=time.perf_counter() - start,
                small_dense_channels={d: [max(1, round(small_dense_scale(spec, d) * f)) for f, _, _ in spec["convs"]]
                                      for d in args.densities})


def describe(spec: dict) -> str:
    rank = len(spec["input"]) - 1
    convs = ", ".join(f"{f}x{'x'.join([str(k)] * rank)}{f'/{s}' if s > 1 else ''}" for f, k, s in spec["convs"])
    return f"Conv{rank}D {convs} (filters x kernel / stride, 'same', ReLU), Flatten, Dense {spec['classes']}"


def cnn_table(results: dict) -> str:
    a = results["settings"]
    lines = [
        "# Sparse training of CNNs: the RigL paper's comparison on MNIST-1D and digits",
        "",
        f"Command: `nice python benchmarks/sparse_training.py --cnn{' --quick' if a['quick'] else ''}`  ",
        f"Machine: {results['machine']}  ",
        f"1-minute load average {results['load'][0]:.1f} at the start, {results['load'][1]:.1f} at the end: other "
        "engineers' jobs shared the 2 cores, so step times are noisy (compare within a column).",
        "",
        f"Densities {', '.join(f'{d:.0%}' for d in a['densities'])} of the weights (sparsity "
        f"{', '.join(f'{1 - d:.0%}' for d in a['densities'])}), every Conv and Dense kernel sparse (the first "
        "convolution too). Static: a random pattern kept fixed; SET and RigL (uniform and ERK) start from it; "
        "SRigL is RigL with `constant_fan_in=True` from an equal fan-in per filter; GradualPruning: dense start, "
        "Zhu & Gupta's cubic schedule from 10% to 75% of training, then `sl.strip_pruning`. Small-Dense: every "
        "convolution's channels shrunk by one factor to the same number of weights. SET/RigL: drop fraction 0.3 "
        "(cosine), end at 75%. Accuracy: mean ± std over the seeds. Training FLOPs: the RigL paper's accounting "
        "(3 forward costs per sample and step, RigL's update steps 2 f_S + f_D, GradualPruning at the density "
        "of each step), a convolution's kernel counted once per output position, relative to Dense. Step: "
        "median ms per training step inside `fit`.",
    ]
    for name, d in results["datasets"].items():
        s = d["settings"]
        lines += [
            "",
            f"## {name}",
            "",
            f"{describe(d['spec'])}: {d['weights']:,} kernel weights. {d['train_size']} train / {d['test_size']} "
            f"test, Adam {s['lr']}, batch {s['batch']}, {s['epochs']} epochs ({d['total_steps']} steps), "
            f"{a['seeds']} seed(s); SET/RigL update every {d['update_freq']} steps. Small-Dense channels: "
            + "; ".join(f"{float(k):.0%}: {v}" for k, v in d["small_dense_channels"].items()) + ".",
            "",
            "| density | method | test accuracy | training FLOPs (x Dense) | step ms | trainable params |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in sorted(d["summary"], key=lambda r: (-r["density"], CNN_ORDER.index(r["method"]))):
            lines.append(f"| {r['density']:.0%} | {r['method']} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                         f"{r['flops_vs_dense']:.2f} | {r['step_ms']:.2f} | {r['params']:,} |")
    return "\n".join(lines) + "\n"


def cnn_plot(results: dict, path: str) -> None:
    """Accuracy against training FLOPs, one panel per dataset; marker shape: density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    names = list(results["datasets"])
    # About 900 px wide at dpi 100: the docs' column width, text readable there.
    fig, axes = plt.subplots(1, len(names), figsize=(9, 5.4), squeeze=False)
    densities = sorted({r["density"] for d in results["datasets"].values() for r in d["summary"] if r["density"] < 1},
                       reverse=True)
    markers = dict(zip(densities, "os^D"))
    methods = [m for m in CNN_ORDER if m != "Dense"]
    for ax, name in zip(axes[0], names):
        summary_ = results["datasets"][name]["summary"]
        dense = next(r for r in summary_ if r["method"] == "Dense")
        for r in summary_:
            if r["method"] != "Dense":
                ax.errorbar(r["flops_vs_dense"], r["accuracy"], yerr=r["accuracy_std"], fmt=markers[r["density"]],
                            color=f"C{methods.index(r['method'])}", capsize=2, ms=6, alpha=0.9)
        ax.axhline(dense["accuracy"], color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        # Plain tick labels: the log axis' own ones overlap at this width.
        low, high = ax.get_xlim()
        ax.set_xlim(low, high)
        ax.set_xticks([t for t in (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if low <= t <= high], minor=False)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training FLOPs (x Dense)")
        ax.set_title(f"{name}: Dense {dense['accuracy']:.3f}", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean ± std over seeds)")
    handles = [Line2D([], [], color=f"C{k}", marker="o", ls="", label=m) for k, m in enumerate(methods)]
    handles += [Line2D([], [], color="black", marker=markers[d], ls="", label=f"density {d:.0%}") for d in densities]
    handles += [Line2D([], [], color="gray", ls="--", label="Dense")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.95 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cnn_main(args) -> int:
    """Runs the datasets asked for, merges them into the json already in ``--out``, and writes table and plot."""
    load_start = os.getloadavg()[0]
    path = os.path.join(args.out, "sparse_training_cnn.json")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot_dir", "cnns", "cnn_settings")}
    results = dict(machine=machine(), settings=settings, datasets={})
    ran = {name: cnn_dataset(name, args) for name in args.datasets}
    # Read only now, so that runs of the other dataset in parallel merge.
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous["settings"].get("quick") == args.quick:
            results["datasets"] = previous["datasets"]
    results["datasets"].update(ran)
    results["datasets"] = {n: results["datasets"][n] for n in args.cnns if n in results["datasets"]}
    results["load"] = [load_start, os.getloadavg()[0]]
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.plot_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    text = cnn_table(results)
    with open(os.path.join(args.out, "SPARSE_TRAINING_CNN.md"), "w") as f:
        f.write(text)
    cnn_plot(results, os.path.join(args.plot_dir, "sparse-training-cnn.png"))
    print(text)
    return 0


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    parser.add_argument("--out", default=HERE, help="directory for SPARSE_TRAINING.md and sparse_training.json")
    parser.add_argument("--plot-dir", default=os.path.join(os.path.dirname(HERE), "docs", "images"))
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--cnn", action="store_true", help="the CNN section (MNIST-1D and digits) instead of the MLP")
    parser.add_argument("--datasets", nargs="+", choices=["MNIST-1D", "digits"], default=["MNIST-1D", "digits"],
                        help="with --cnn: the datasets to run (the others are kept from the json in --out)")
    args = parser.parse_args(argv)
    full = not args.quick
    if args.cnn:
        args.densities = [0.2, 0.1] if full else [0.2]
        args.seeds = args.seeds or (3 if full else 1)
        # MNIST-1D: the published CNN's shape (Greydanus 2020: 3 convolutions of 25 channels, then linear).
        args.cnns = {"MNIST-1D": dict(input=(40, 1), convs=[(25, 5, 2), (25, 3, 2), (25, 3, 2)] if full else
                                      [(4, 5, 2), (4, 3, 2)], classes=10),
                     "digits": dict(input=(8, 8, 1), convs=[(32, 3, 1), (64, 3, 2)] if full else [(4, 3, 1), (8, 3, 2)],
                                    classes=10)}
        args.cnn_settings = {"MNIST-1D": dict(epochs=20 if full else 1, batch=100, lr=1e-2),
                             "digits": dict(epochs=12 if full else 1, batch=64, lr=2e-3)}
        return args
    args.widths = [64, 256, 256, 10] if full else [64, 16, 10]
    args.densities = [0.1, 0.05] if full else [0.1]
    args.seeds = args.seeds or (3 if full else 1)
    args.epochs = 30 if full else 1
    args.batch = 64
    args.lr = 2e-3
    args.snip_batch = 256 if full else 32
    args.teacher_shape = [128, 64] if full else [16, 8]
    args.teacher_density = 0.1 if full else 0.25
    args.teacher_samples = 4096 if full else 128
    args.teacher_epochs = 15 if full else 1
    args.teacher_lr = 1e-2
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.cnn:
        print(machine(), flush=True)
        return cnn_main(args)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    print(machine(), flush=True)
    print({k: v for k, v in vars(args).items() if k not in ("out", "plot_dir")}, flush=True)
    data = digits()
    if args.quick:
        data = tuple(part[:128] for part in data)
    def build(seed, density=None):
        return mlp(args.widths if density is None else small_dense_widths(args.widths, density), seed)

    rows = [r for seed in range(args.seeds) for r in run_seed(args, data, seed, build)]
    teacher = teacher_rows(args)
    total = args.epochs * math.ceil(len(data[0]) / args.batch)
    results = dict(machine=machine(), settings={k: v for k, v in vars(args).items() if k not in ("out", "plot_dir")},
                   rows=rows, summary=summary(rows), teacher=teacher, train_size=len(data[0]),
                   test_size=len(data[1]), total_steps=total, update_freq=max(2, total // 30),
                   seconds=time.perf_counter() - start, load=[load_start, os.getloadavg()[0]])
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.plot_dir, exist_ok=True)
    with open(os.path.join(args.out, "sparse_training.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.out, "SPARSE_TRAINING.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(args.plot_dir, "sparse-training.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
