"""The many-outputs demo: a shared trunk and one small MLP per target.

``sparselayers demo`` generates a problem with many targets, each a
different nonlinear function of a few shared latent features, trains a
trunk + :class:`~sparselayers.Towers` model, then puts the trained weights
into the two usual workarounds (a masked dense stack, and one Keras Dense
MLP per output) to show that they compute the same function at a far
higher cost. A baseline too large to build whole (memory for the masked
one, tracing time for the per-output one) is measured on fewer towers and
scaled, and its row says from what.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from sparselayers import baselines
from sparselayers.towers import Towers

#: The masked baseline is built on as many towers as keep its dense kernels
#: within this many entries, and its step time scaled to the full size by the
#: ratio of dense entries, to which every part of its step is proportional
#: (the products, the mask, the gradient and Adam's update). Training costs
#: it about ``MASKED_BYTES_PER_ENTRY`` (kernel, mask, masked kernel, gradient, Adam's
#: two slots, temporaries), so the whole demo stays within 4 GiB; the default
#: 1024 towers would take 290 M entries and 12 GB.
MASKED_MAX_ENTRIES = 3 * 10**7
#: Bytes a dense entry of the masked baseline costs while it trains (see above).
MASKED_BYTES_PER_ENTRY = 40
#: Keras needs minutes to trace a model of thousands of tiny Dense layers, so
#: at most this many per-output towers are built; the rest is scaled.
DENSE_TOWERS_TIMED = 64


@dataclasses.dataclass
class Problem:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def make_problem(n_outputs: int, n_samples: int, *, n_latent: int = 8, n_features: int = 16, seed: int = 0) -> Problem:
    """Targets that are each a different nonlinear function of 3 of ``n_latent`` latents.

    The model sees ``n_features`` noisy linear mixtures of the latents, so it
    must first recover them (the trunk) and then fit each target (a tower).
    """
    rng = np.random.default_rng(seed)
    n_total = n_samples + n_samples // 4
    z = rng.normal(size=(n_total, n_latent))
    x = z @ rng.normal(size=(n_latent, n_features)) / np.sqrt(n_latent)
    x += 0.05 * rng.normal(size=x.shape)
    chosen = np.stack([rng.choice(n_latent, 3, replace=False) for _ in range(n_outputs)])
    weights = rng.normal(size=(n_outputs, 3))
    a = np.einsum("nok,ok->no", z[:, chosen], weights)
    kind = np.arange(n_outputs) % 3
    y = np.where(kind == 0, np.sin(a), np.where(kind == 1, np.tanh(a) * z[:, chosen[:, 1]], 0.3 * a**2))
    y = (y - y.mean(0)) / (y.std(0) + 1e-9)
    y += 0.05 * rng.normal(size=y.shape)
    x, y = x.astype("float32"), y.astype("float32")
    return Problem(x[:n_samples], y[:n_samples], x[n_samples:], y[n_samples:])


def build_model(n_features: int, n_outputs: int, hidden: Sequence[int], trunk: int) -> keras.Model:
    inputs = keras.Input((n_features,), name="features")
    h = keras.layers.Dense(trunk, activation="relu", name="trunk")(inputs)
    outputs = Towers(n_outputs, hidden_units=list(hidden), output_units=1, name="towers")(h)
    return keras.Model(inputs, outputs, name="trunk_and_towers")


def _time_step(model: keras.Model, x: np.ndarray, y: np.ndarray, steps: int) -> float:
    """Median seconds of one Adam training step, after a warm-up step."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _params(model: keras.Model | keras.layers.Layer) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _training_mib(params: int, extra_bytes: int = 0) -> float:
    """Weights, gradients and Adam's two slots in float32, plus constants."""
    return (4 * 4 * params + extra_bytes) / 2**20


def _mse(model: keras.Model, problem: Problem) -> float:
    pred = model.predict(problem.x_val, batch_size=512, verbose=0)
    return float(np.mean((pred - problem.y_val) ** 2))


def dense_entries(input_dim: int, widths: Sequence[int], n_towers: int) -> int:
    """Entries of the masked baseline's dense kernels for ``n_towers`` towers of ``widths``."""
    return input_dim * n_towers * widths[0] + sum(n_towers * a * n_towers * b for a, b in zip(widths[:-1], widths[1:]))


def masked_towers_timed(input_dim: int, widths: Sequence[int], n_towers: int) -> int:
    """How many towers the masked baseline is built on: the most (at least 1) within ``MASKED_MAX_ENTRIES``."""
    low, high = 1, n_towers
    while low < high:
        middle = (low + high + 1) // 2
        if dense_entries(input_dim, widths, middle) <= MASKED_MAX_ENTRIES:
            low = middle
        else:
            high = middle - 1
    return low


def peak_memory_mib() -> float | None:
    """This process's peak resident memory so far, in MiB, or None where unknown.

    Linux's ``VmHWM``; elsewhere ``ru_maxrss``, which on Linux would also
    count a parent's peak across ``exec``.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _on_trunk_copy(trunk: keras.layers.Dense, body: keras.layers.Layer) -> keras.Model:
    """``body`` on a copy of the trained ``trunk``.

    Calling the model's own trunk would record ``body`` among the trunk's
    outbound nodes and keep it alive with the model: the masked baseline's
    dense kernels would stay in memory for the rest of the demo.
    """
    copy = keras.layers.Dense.from_config(trunk.get_config())
    inputs = keras.Input((trunk.kernel.shape[0],))
    outputs = body(copy(inputs))
    copy.set_weights(trunk.get_weights())
    return keras.Model(inputs, outputs)


def _compare(model: keras.Model, problem: Problem, batch: int, steps: int, log) -> list[dict]:
    towers = model.get_layer("towers")
    trunk = model.get_layer("trunk")
    xb, yb = problem.x_train[:batch], problem.y_train[:batch]
    trunk_params = _params(trunk)
    rows = []

    def row(name, m, *, params=None, extra_bytes=0, note="", step_scale=1.0, built=None):
        """Times ``m``; ``built`` is the number of towers it holds when it holds fewer than all."""
        params = _params(m) if params is None else params
        log(f"  timing {name} ...")
        # measured before timing: the timed steps change the weights
        if built is None:
            val = _mse(m, problem)
            columns = slice(None)
        else:
            columns = np.arange(built * towers.output_units)
            reference = model.predict(problem.x_val, batch_size=512, verbose=0)[:, columns]
            diff = np.abs(m.predict(problem.x_val, batch_size=512, verbose=0) - reference).max()
            val, note = float("nan"), f"{note}; outputs equal Towers' to {diff:.1e}"
        weights = m.get_weights()
        step = step_scale * _time_step(m, xb, yb[:, columns], steps)
        m.set_weights(weights)  # the timed steps train it: later rows and the pictures need the trained weights
        rows.append(dict(method=name, params=int(params), mib=_training_mib(int(params), extra_bytes),
                         step=step, val=val, note=note, built=built, n_towers=towers.n_towers))

    row("sparselayers Towers", model)
    n, widths = towers.n_towers, towers.widths
    entries = dense_entries(trunk.units, widths, n)
    built = masked_towers_timed(trunk.units, widths, n)
    note = "the mask is a constant"
    if built < n:
        log(f"  building the masked baseline on {built} of {n} towers (all {n} would take about "
            f"{entries * MASKED_BYTES_PER_ENTRY / 2**30:.0f} GiB to train) ...")
        note += (f"; measured on {built} of {n} towers ({dense_entries(trunk.units, widths, built):,} of "
                 f"{entries:,} dense entries), step scaled x{entries / dense_entries(trunk.units, widths, built):.1f}")
    masked = baselines.masked_towers(towers, None if built == n else range(built))
    biases = sum(layer.units for layer in towers.tower_layers if layer.bias is not None)
    row("masked dense", _on_trunk_copy(trunk, masked), params=trunk_params + entries + biases,
        extra_bytes=4 * entries, note=note, step_scale=entries / dense_entries(trunk.units, widths, built),
        built=None if built == n else built)
    del masked
    gc.collect()  # Keras models hold reference cycles: free the dense kernels before the next baseline
    shown = min(n, DENSE_TOWERS_TIMED)
    log(f"  building {shown} separate Dense towers ...")
    separate = _on_trunk_copy(trunk, baselines.dense_towers(towers, trunk.units, range(shown)))
    row("one Dense MLP per output", separate, params=trunk_params + n / shown * (_params(separate) - trunk_params),
        note="" if shown == n else f"{shown} of {n} towers built, time and size scaled", step_scale=n / shown,
        built=None if shown == n else shown)
    return rows


def format_table(rows: list[dict]) -> str:
    base = rows[0]["step"]
    lines = [
        "| method | trainable params | weights+grads+Adam (MiB) | step (ms) | step / sparselayers | val MSE | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        step = f"{1000 * r['step']:.1f} | {r['step'] / base:.1f}x" if np.isfinite(r["step"]) else "- | -"
        val = f"{r['val']:.4f}" if np.isfinite(r["val"]) else "see note"
        lines.append(f"| {r['method']} | {r['params']:,} | {r['mib']:,.1f} | {step} | {val} | {r['note']} |")
    return "\n".join(lines)


def _comparison_picture(rows: list[dict], path: str) -> str:
    """Bars of the step time and the training memory of every method, as in the table."""
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows][::-1]
    fig, axes = plt.subplots(2, 1, figsize=(7, 5.6))
    panels = (("step", 1000, "one Adam training step (ms)", "{:,.0f} ms"),
              ("mib", 1, "weights + gradients + Adam, float32 (MiB)", "{:,.0f} MiB"))
    for ax, (key, unit, label, text) in zip(axes, panels):
        values = [unit * r[key] for r in rows][::-1]
        scaled = [key == "step" and r["built"] is not None for r in rows][::-1]
        colours = ["tab:green" if name == rows[0]["method"] else "tab:grey" for name in names]
        bars = ax.barh(names, values, color=colours, hatch=["//" if s else "" for s in scaled], edgecolor="white")
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 2, max(values) * 20)  # room for the labels
        ax.set_xlabel(label, fontsize=11)
        ax.tick_params(labelsize=10)
        for bar, value in zip(bars, values):
            ratio = value / (unit * rows[0][key])
            ax.annotate(text.format(value) + (f"  ({ratio:,.1f}x)" if ratio != 1 else ""),
                        (value, bar.get_y() + bar.get_height() / 2), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=10)
    notes = [f"{r['method']}: {r['built']} of {r['n_towers']} towers" for r in rows if r["built"] is not None]
    fig.suptitle("The same trained function, three ways", fontsize=12)
    if notes:
        fig.text(0.5, 0.01, "Hatched: step measured on fewer towers and scaled\n(" + "; ".join(notes) + ")",
                 ha="center", va="bottom", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if notes else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pictures(model: keras.Model, history: dict, problem: Problem, out: str, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparselayers.plotting import plot_pattern

    towers = model.get_layer("towers")
    layers = towers.tower_layers
    paths = []
    # about 900 px wide: the docs show it at about 690 px, and the text must stay readable there
    fig, axes = plt.subplots(2, len(layers), figsize=(3 * len(layers), 6.4), squeeze=False)
    for k, layer in enumerate(layers):
        # coarse bins, so that the 1/n_towers-wide diagonal is a visible band
        plot_pattern(layer.pattern, axes[0, k], resolution=100, title=f"layer {k}: {layer.pattern.structure}")
        axes[0, k].title.set_fontsize(10)
        # the first four towers, where the blocks are visible
        zoom_rows = layer.input_dim if k == 0 else 4 * towers.widths[k - 1]
        zoom = layer.to_scipy()[:zoom_rows, : 4 * towers.widths[k]]
        from sparselayers.sparsity_pattern import SparsityPattern

        plot_pattern(SparsityPattern.from_scipy(zoom), axes[1, k], title=f"layer {k}, first 4 towers")
        axes[1, k].title.set_fontsize(10)
    fig.suptitle(f"Towers: {towers.n_towers} towers, hidden {towers.hidden_units}")
    fig.tight_layout()
    paths.append(os.path.join(out, "patterns.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["loss"], label="train")
    ax.plot(history["val_loss"], label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE")
    ax.legend()
    ax.set_title("Loss of the trunk + towers model")
    fig.tight_layout()
    paths.append(os.path.join(out, "loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if rows:
        paths.append(_comparison_picture(rows, os.path.join(out, "comparison.png")))

    pred = model.predict(problem.x_val, batch_size=512, verbose=0)
    show = np.linspace(0, problem.y_val.shape[1] - 1, min(4, problem.y_val.shape[1])).astype(int)
    fig, axes = plt.subplots(2, 2, figsize=(6.4, 6.4), squeeze=False)
    for ax in axes.flat[len(show):]:
        ax.set_axis_off()
    for ax, t in zip(axes.flat, show):
        ax.scatter(problem.y_val[:, t], pred[:, t], s=4, alpha=0.5)
        lim = [problem.y_val[:, t].min(), problem.y_val[:, t].max()]
        ax.plot(lim, lim, color="tab:red", linewidth=1)
        ax.set_title(f"target {t}")
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
    fig.tight_layout()
    paths.append(os.path.join(out, "predictions.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(
    outputs: int = 1024,
    hidden: Sequence[int] = (16, 16),
    epochs: int = 15,
    out: str = "sparselayers-demo",
    *,
    samples: int = 4096,
    trunk: int = 256,
    batch: int = 256,
    timing_steps: int = 3,
    baselines_too: bool = True,
    seed: int = 0,
    verbose: int = 1,
) -> dict:
    """Runs the demo and returns its figures (also written to ``out``)."""
    log = print if verbose else (lambda *a, **k: None)
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(seed)
    problem = make_problem(outputs, samples, seed=seed)
    model = build_model(problem.x_train.shape[1], outputs, hidden, trunk)
    log(f"sparselayers demo: {outputs} targets, trunk {trunk}, a {list(hidden)} tower per target, "
        f"{model.count_params():,} parameters")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    fit = model.fit(problem.x_train, problem.y_train, validation_data=(problem.x_val, problem.y_val),
                    epochs=epochs, batch_size=batch, verbose=verbose)
    rows = []
    if baselines_too:
        log("Comparing with the usual workarounds, all carrying the trained weights:")
        rows = _compare(model, problem, batch, timing_steps, log)
    table = format_table(rows) if rows else ""
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}"
    pictures = _pictures(model, fit.history, problem, out, rows)
    peak = peak_memory_mib()
    peak_text = "unknown on this system" if peak is None else f"{peak:,.0f} MiB"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# sparselayers demo\n\nMachine: {machine}. Batch {batch}; step = one Adam training step "
                f"(median of {timing_steps}). Peak memory of the whole run: {peak_text}.\n\n{table}\n")
    if table:
        log("\n" + table)
    log(f"\nFinal validation MSE {fit.history['val_loss'][-1]:.4f} (targets have unit variance).")
    log(f"Peak memory of this process: {peak_text}.")
    log(f"Pictures and summary in {os.path.abspath(out)}: " + ", ".join(os.path.basename(p) for p in pictures))
    return {"history": fit.history, "rows": rows, "pictures": pictures, "model": model, "peak_mib": peak}
