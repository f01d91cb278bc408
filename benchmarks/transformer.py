"""A small transformer classifier, dense and sparse: Static ERK, RigL ERK and GradualPruning on MNIST-1D.

    nice python benchmarks/transformer.py              # about 15-20 minutes on 2 loaded cores
    python benchmarks/transformer.py --quick           # tiny sizes: checks that everything runs

Data: MNIST-1D (Greydanus 2020, ``pip install mnist1d``), generated offline
with ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())``: 4,000
training and 1,000 test sequences of 40 floats, 10 classes. Each value is
discretized into one of ``--vocab`` tokens (equal-count bins of the training
values), so the model reads token ids.

Model: token ``Embedding`` plus a learned position embedding (a dense
weight of its own, which ``sl.sparsify`` leaves alone), ``--blocks`` blocks
of ``MultiHeadAttention`` + residual + ``LayerNormalization`` and a
``Dense`` FFN (ReLU) + residual + ``LayerNormalization``, mean pooling, a
``Dense`` head. ``sl.sparsify`` converts the embedding, the attention's four
projections, the FFN and the head.

Methods, as ``benchmarks/sparse_training.py`` (the RigL paper's comparison):

* Dense;
* Static ERK: ``sl.sparsify(criterion="random", distribution="erk")`` of
  the initial model, kept fixed;
* RigL ERK: from the Static ERK start, ``sl.callbacks.RigL`` (drop fraction
  0.3, cosine, ending at 75% of training);
* GradualPruning: dense start (``sl.sparsify(model, density=1.0)``), Zhu &
  Gupta's cubic schedule from 10% to 75% of training, then
  ``sl.strip_pruning``.

Each at 10% and 30% density: test accuracy (mean ± std over seeds), the
median time per training step inside ``fit`` (median over seeds), and the
kernel entries the final model stores (sparse layers' kept entries plus
every dense weight of two or more axes, the position embedding included).

Writes ``TRANSFORMER.md`` and ``transformer.json`` (in --out, default this
directory) and the plot ``transformer.png`` (in --plot-dir, default this
directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import sparselayers as sl  # noqa: E402
from pruning import StepTimer, accuracy, compile_model  # noqa: E402
from run import machine  # noqa: E402

METHODS = ["Dense", "Static ERK", "RigL ERK", "GradualPruning"]


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned ``(sequence, features)`` table to its input."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), initializer="glorot_uniform", name="table")

    def call(self, x):
        return x + self.table


def mnist1d_tokens(vocab: int, quick: bool):
    """MNIST-1D, generated (no download), each value replaced by its bin among ``vocab`` equal-count bins."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if quick:
        args.num_samples = 250
    data = make_dataset(args)
    # Bin edges from the training values only.
    edges = np.quantile(data["x"], np.linspace(0, 1, vocab + 1)[1:-1])
    tokens = [np.digitize(data[k], edges).astype("int32") for k in ("x", "x_test")]
    return tokens[0], tokens[1], data["y"].astype("int32"), data["y_test"].astype("int32")


def transformer(args, seq: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    ids = keras.Input((seq,), dtype="int32")
    x = keras.layers.Embedding(args.vocab, args.dim, name="tokens")(ids)
    x = PositionEmbedding(name="positions")(x)
    for b in range(args.blocks):
        h = keras.layers.MultiHeadAttention(args.heads, args.dim // args.heads, name=f"attention_{b}")(x, x)
        x = keras.layers.LayerNormalization(name=f"norm_{b}a")(x + h)
        h = keras.layers.Dense(args.ffn, activation="relu", name=f"ffn_{b}a")(x)
        h = keras.layers.Dense(args.dim, name=f"ffn_{b}b")(h)
        x = keras.layers.LayerNormalization(name=f"norm_{b}b")(x + h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(10, name="head")(x))


def stored_entries(model: keras.Model) -> int:
    """Kept entries of the sparse layers, plus every other weight of two or more axes that is not a bias.

    Biases are left out on both sides: MultiHeadAttention's are 2-D, and a
    sparse layer's stay dense.
    """
    sparse = sl.sparse_layers(model)
    owned = {id(v) for layer in sparse for v in layer.weights}
    dense = sum(int(np.prod(v.shape)) for v in model.weights
                if len(v.shape) >= 2 and id(v) not in owned and not v.path.endswith("bias"))
    return sum(layer.pattern.nnz for layer in sparse) + dense


def fit(model, data, epochs, batch, callbacks=()):
    """Step times (s) inside ``fit``, and the whole ``fit`` in seconds (tracing and topology updates included)."""
    x_train, _, y_train, _ = data
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[timer, *callbacks])
    return timer.times, time.perf_counter() - start


def run_seed(args, data, seed: int) -> list[dict]:
    total = args.epochs * math.ceil(len(data[0]) / args.batch)
    update_freq = max(2, total // 30)
    seq = data[0].shape[1]
    rows = []

    def row(method, density, model, timed):
        times, fit_s = timed
        rows.append(dict(method=method, density=density, seed=seed, accuracy=accuracy(model, data), fit_s=fit_s,
                         step_ms=1e3 * float(np.median(times)), mean_step_ms=1e3 * float(np.mean(times)),
                         entries=stored_entries(model),
                         params=int(sum(np.prod(v.shape) for v in model.trainable_variables))))
        print(f"  seed {seed} {method} {density:.0%}: accuracy {rows[-1]['accuracy']:.3f}, "
              f"step {rows[-1]['step_ms']:.2f} ms, fit {fit_s:.0f} s, entries {rows[-1]['entries']:,}", flush=True)

    def init():
        return transformer(args, seq, seed)

    dense = compile_model(init(), args.lr)
    row("Dense", 1.0, dense, fit(dense, data, args.epochs, args.batch))
    for density in args.densities:
        def static():
            return sl.sparsify(init(), density, criterion="random", seed=seed, distribution="erk")

        model = compile_model(static(), args.lr)
        row("Static ERK", density, model, fit(model, data, args.epochs, args.batch))

        model = compile_model(static(), args.lr)
        rigl = sl.callbacks.RigL(update_freq, 0.3, seed=seed)
        row("RigL ERK", density, model, fit(model, data, args.epochs, args.batch, [rigl]))

        model = compile_model(sl.sparsify(init(), density=1.0), args.lr)
        pruning = sl.callbacks.GradualPruning(density, begin_step=int(0.1 * total), end_step=int(0.75 * total),
                                              frequency=max(1, total // 40))
        timed = fit(model, data, args.epochs, args.batch, [pruning])
        row("GradualPruning", density, sl.strip_pruning(model), timed)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["density"]), []).append(r)
    out = []
    for (method, density), group in groups.items():
        acc = np.array([g["accuracy"] for g in group])
        out.append(dict(method=method, density=density, accuracy=float(acc.mean()), accuracy_std=float(acc.std()),
                        seeds=len(group), step_ms=float(np.median([g["step_ms"] for g in group])),
                        mean_step_ms=float(np.median([g["mean_step_ms"] for g in group])),
                        fit_s=float(np.median([g["fit_s"] for g in group])),
                        entries=group[0]["entries"], params=group[0]["params"]))
    return sorted(out, key=lambda r: (-r["density"], METHODS.index(r["method"])))


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown (no lscpu)"


def table(results: dict) -> str:
    a = results["settings"]
    dense = next(r for r in results["summary"] if r["method"] == "Dense")
    lines = [
        "# A small transformer classifier, dense and sparse (MNIST-1D)",
        "",
        f"Command: `nice python benchmarks/transformer.py{' --quick' if a['quick'] else ''}`  ",
        f"Machine: {results['machine']}  ",
        f"CPU (lscpu): {results['lscpu']}  ",
        f"Duration {results['seconds']:.0f} s; 1-minute load average {results['load'][0]:.1f} at the start, "
        f"{results['load'][1]:.1f} at the end: other engineers' jobs shared the 2 cores, so step times "
        "are noisy (compare within a column, not with other files).",
        "",
        f"Data: MNIST-1D, generated offline by `mnist1d.data.make_dataset(get_dataset_args())` "
        f"({results['train_size']} train / {results['test_size']} test sequences of {results['seq']}), each value "
        f"binned into {a['vocab']} equal-count tokens. Model: token embedding {a['vocab']} x {a['dim']} + learned "
        f"position embedding (dense, not sparsified), {a['blocks']} block(s) of MultiHeadAttention "
        f"({a['heads']} heads x {a['dim'] // a['heads']}) and FFN {a['dim']}-{a['ffn']}-{a['dim']}, post-norm "
        f"residuals, mean pooling, Dense head. Adam {a['lr']}, batch {a['batch']}, {a['epochs']} epochs "
        f"({results['total_steps']} steps); RigL updates every {results['update_freq']} steps, drop fraction 0.3 "
        "(cosine) ending at 75%; GradualPruning from 10% to 75% of training, then `sl.strip_pruning`. "
        f"Accuracy: mean ± std over {a['seeds']} seed(s). Step: median ms per training step inside `fit` "
        "(median over seeds; GradualPruning trains the density-1.0 sparse layers it prunes); mean step: the mean, "
        "which also carries the steps with a topology update (RigL, GradualPruning); fit: seconds of the whole "
        "`fit`, tracing included. Entries: kernel "
        "entries the final model stores (sparse layers' kept entries + the other weights of 2+ axes "
        "but biases: the position embedding); params: its trainable parameters.",
        "",
        "| density | method | test accuracy | step ms | step vs Dense | mean step ms | fit s | stored entries "
        "| trainable params |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["summary"]:
        lines.append(f"| {r['density']:.0%} | {r['method']} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['step_ms']:.2f} | {r['step_ms'] / dense['step_ms']:.2f} | {r['mean_step_ms']:.2f} | "
                     f"{r['fit_s']:.0f} | "
                     f"{r['entries']:,} | "
                     f"{r['params']:,} |")
    lines += ["", "Layer densities under ERK at each target (entries kept / dense kernel):", ""]
    for density, layers in results["erk_layers"].items():
        lines.append(f"* {float(density):.0%}: " + ", ".join(f"{name} {d:.2f}" for name, d in layers))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    dense = next(r for r in results["summary"] if r["method"] == "Dense")
    markers = {"Static ERK": "s", "RigL ERK": "o", "GradualPruning": "^"}
    for k, method in enumerate(markers):
        group = sorted((r for r in results["summary"] if r["method"] == method), key=lambda r: r["density"])
        d = [r["density"] for r in group]
        axes[0].errorbar(d, [r["accuracy"] for r in group], yerr=[r["accuracy_std"] for r in group],
                         marker=markers[method], color=f"C{k}", label=method, capsize=3)
        axes[1].plot(d, [r["step_ms"] for r in group], marker=markers[method], color=f"C{k}", label=method)
    axes[0].axhline(dense["accuracy"], color="gray", ls="--", lw=1, label="Dense")
    axes[1].axhline(dense["step_ms"], color="gray", ls="--", lw=1, label="Dense")
    axes[0].set_ylabel("test accuracy (mean ± std)")
    axes[1].set_ylabel("median training step (ms)")
    for ax in axes:
        ax.set_xlabel("density")
        ax.set_xticks(sorted({r["density"] for r in results["summary"] if r["density"] < 1}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Transformer on MNIST-1D", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def erk_layers(args, seq: int) -> dict:
    out = {}
    for density in args.densities:
        model = sl.sparsify(transformer(args, seq, 0), density, criterion="random", seed=0, distribution="erk")
        out[str(density)] = [(layer.name, layer.pattern.nnz / (layer.pattern.shape[0] * layer.pattern.shape[1]))
                             for layer in sl.sparse_layers(model)]
    return out


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    parser.add_argument("--out", default=HERE, help="directory for TRANSFORMER.md and transformer.json")
    parser.add_argument("--plot-dir", default=HERE, help="directory for transformer.png")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    full = not args.quick
    args.densities = [0.3, 0.1] if full else [0.1]
    args.seeds = args.seeds or (2 if full else 1)
    args.epochs = args.epochs or (15 if full else 1)
    args.vocab = 32 if full else 8
    args.dim = 32 if full else 8
    args.heads = 4 if full else 2
    args.ffn = 64 if full else 16
    args.blocks = 2 if full else 1
    args.batch = 64
    args.lr = 2e-3
    return args


def main(argv=None) -> int:
    args = parse(argv)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    print(machine(), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot_dir")}
    print(settings, flush=True)
    # The position table is meant to stay dense (the table says so): no warning per sparsify call.
    logging.getLogger("sparselayers").setLevel(logging.ERROR)
    data = mnist1d_tokens(args.vocab, args.quick)
    rows = [r for seed in range(args.seeds) for r in run_seed(args, data, seed)]
    total = args.epochs * math.ceil(len(data[0]) / args.batch)
    results = dict(machine=machine(), lscpu=lscpu_model(), settings=settings, rows=rows, summary=summary(rows),
                   erk_layers=erk_layers(args, data[0].shape[1]), train_size=len(data[0]), test_size=len(data[1]),
                   seq=data[0].shape[1], total_steps=total, update_freq=max(2, total // 30),
                   seconds=time.perf_counter() - start, load=[load_start, os.getloadavg()[0]])
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.plot_dir, exist_ok=True)
    with open(os.path.join(args.out, "transformer.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.out, "TRANSFORMER.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(args.plot_dir, "transformer.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
