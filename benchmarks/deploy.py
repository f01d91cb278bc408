"""What a sparse model costs deployed, next to the dense model: size and batch-1 latency per format.

    python benchmarks/deploy.py            # every case, ~2 minutes on 2 cores
    python benchmarks/deploy.py --quick    # small models, checks that it all runs

Cases (each sparse model next to the dense model holding the same weights):

* MLP 1024-1024-1024-10, ``sl.sparsify`` at 10% density (random), and with
  ``block=(4, 1)`` at 10% and 5% density (FULLY_CONNECTED's 1x4 blocks:
  4 consecutive inputs of one unit); and as full-integer int8 (LiteRT only)
  with ``block=(16, 1)`` (FULLY_CONNECTED's int8 1x16 blocks) at 10% and 5%,
  exported with ``EXPERIMENTAL_SPARSITY`` against the dense int8 model;
* CNN, MobileNet-style: a 3x3 stride-2 stem, four depthwise + 1x1 blocks,
  global mean, a dense head; the 1x1 convolutions sparsified to 20% and 10%
  density (80% and 90% sparsity);
* ``Towers(128, [16, 16])`` over 64 inputs, against Keras ``Dense`` layers
  holding its kernels with zeros outside the blocks (the masked-dense
  model); an ``Embedding`` of 20,000 x 64 sparsified to 10%, against Keras'
  ``Embedding`` holding its table with zeros; a 4-head
  ``MultiHeadAttention`` (width 128, length 32) sparsified to 10%, against
  the same model exported inside ``sl.export.densified()``.

Artifacts, all written with Keras' own ``model.export``: LiteRT (default,
i.e. sparse tensors; ``sl.export.gather_graph()``; ``sl.export.densified()``)
run in the LiteRT interpreter with and without its default XNNPACK
delegate; ONNX (default: ``sparse_initializer``) in onnxruntime; SavedModel
(the TF Serving format) loaded with ``tf.saved_model.load``. One thread each,
batch 1. Every artifact is checked against Keras first. Timing interleaves
rounds: each round runs every artifact of a case for the same number of
calls, in a shuffled order; the table gives the median over rounds of the
mean time per call. Writes ``deploy.md`` and ``deploy.png`` next to this file
(or in --out), with the CPU model from lscpu.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import textwrap
import time
import warnings
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's sparselayers, not an installed one
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402
from run import machine  # noqa: E402


def mlp(width: int) -> keras.Model:
    inputs = keras.Input((width,))
    h = keras.layers.Dense(width, activation="relu")(inputs)
    h = keras.layers.Dense(width, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def cnn(size: int, channels: tuple[int, ...]) -> keras.Model:
    """A 3x3 stride-2 stem, depthwise + 1x1 blocks, global mean: the shape of XNNPACK's sparse subgraph."""
    inputs = keras.Input((size, size, 3))
    # Strided windows pad 1 on each side, as XNNPACK's sparse subgraph requires
    # ("same" pads 0 before and 1 after an even length at stride 2).
    h = keras.layers.ZeroPadding2D(1)(inputs)
    h = keras.layers.Conv2D(channels[0], 3, strides=2, activation="relu")(h)
    for k, c in enumerate(channels[1:]):
        if k % 2:
            h = keras.layers.ZeroPadding2D(1)(h)
            h = keras.layers.DepthwiseConv2D(3, strides=2, activation="relu")(h)
        else:
            h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
        h = keras.layers.Conv2D(c, 1, activation="relu", name=f"pointwise_{k}")(h)
    h = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)  # MEAN over the spatial axes, 4-D
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))


def densified_twin(dense: keras.Model, sparse: keras.Model) -> keras.Model:
    """``dense``'s architecture holding ``sparse``'s weights (zeros outside the patterns)."""
    twin = keras.Model.from_config(dense.get_config())
    by_name = {layer.name: layer for layer in sparse.layers}
    for layer in twin.layers:
        source = by_name.get(layer.name)
        if isinstance(source, sl.SparseKernelLayer):
            bias = [] if source.bias is None else [keras.ops.convert_to_numpy(source.bias)]
            layer.set_weights([source.to_dense(), *bias])
        elif source is not None and layer.weights:
            layer.set_weights(source.get_weights())
    return twin


class DenselyExported:
    """A sparse model exported inside ``sl.export.densified()``: the dense model of layers with no Keras twin here."""

    def __init__(self, model: keras.Model):
        self.model = model

    def __call__(self, x):
        return self.model(x)

    def export(self, path: str, **kwargs) -> None:
        with sl.export.densified():
            self.model.export(path, **kwargs)


class Int8Export:
    """A model exported to LiteRT only, as full-integer int8 calibrated on ``calibration``.

    ``sparse_storage``: with ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``, which
    a user asks for (the default stores a sparse layer's int8 weights dense).
    """

    formats = ("litert",)

    def __init__(self, model: keras.Model, calibration: np.ndarray, sparse_storage: bool):
        self.model, self.inputs, self.layers = model, model.inputs, model.layers
        self.calibration, self.sparse_storage = calibration, sparse_storage

    def __call__(self, x):
        return self.model(x)

    def tolerance(self, expected: np.ndarray) -> float:
        return 0.05 * float(np.abs(expected).max())  # int8 rounding

    def export(self, path: str, **kwargs) -> None:
        def representative():
            for row in self.calibration:
                yield [row[None]]

        optimizations = [tf.lite.Optimize.DEFAULT]
        if self.sparse_storage:
            optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparselayers' note on int8 storage: this is the measurement of it
            self.model.export(path, optimizations=optimizations, representative_dataset=representative, **kwargs)


def towers(inputs: int, n: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((inputs,)), sl.Towers(n, hidden_units=[16, 16])])


def masked_dense_towers(model: keras.Model) -> keras.Model:
    """The Towers' layers as Keras Dense layers holding their kernels with zeros outside the blocks."""
    towers_layer = model.layers[-1]
    inputs = keras.Input(model.inputs[0].shape[1:])
    h = inputs
    for layer in towers_layer.tower_layers:
        dense = keras.layers.Dense(layer.units, activation=layer.activation)
        h = dense(h)
        dense.set_weights([layer.to_dense(), keras.ops.convert_to_numpy(layer.bias)])
    return keras.Model(inputs, h)


def embedding(vocabulary: int, width: int) -> keras.Model:
    ids = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(vocabulary, width, name="embedding")(ids)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(ids, keras.layers.Dense(10)(h))


def attention(length: int, width: int) -> keras.Model:
    x = keras.Input((length, width))
    h = keras.layers.MultiHeadAttention(4, width // 4, name="attention")(x, x)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(x, keras.layers.Dense(10)(h))


def cases(quick: bool) -> list[tuple[str, keras.Model, keras.Model]]:
    """(label, sparse model, dense model with the same weights)."""
    width = 128 if quick else 1024
    size, channels = (32, (16, 32, 64)) if quick else (128, (32, 64, 128, 256, 256))
    out = []
    for label, kwargs in (
        ("MLP random 10%", {"density": 0.1}),
        ("MLP 1x4 blocks 10%", {"density": 0.1, "block": (4, 1)}),
        ("MLP 1x4 blocks 5%", {"density": 0.05, "block": (4, 1)}),
    ):
        base = mlp(width)
        sparse = sl.sparsify(base, seed=0, **kwargs)
        out.append((label, sparse, densified_twin(base, sparse)))
    calibration = np.random.default_rng(2).normal(size=(32, width)).astype("float32")
    for density in (0.1, 0.05):
        base = mlp(width)
        sparse = sl.sparsify(base, density=density, block=(16, 1), seed=0)
        out.append((f"MLP int8 1x16 tiles {density:.0%}", Int8Export(sparse, calibration, True),
                    Int8Export(densified_twin(base, sparse), calibration, False)))
    for density in (0.2, 0.1):
        base = cnn(size, channels)
        pointwise = [layer.name for layer in base.layers if layer.name.startswith("pointwise")]
        sparse = sl.sparsify(base, density=density, layers=pointwise, seed=0)
        out.append((f"CNN 1x1 convs {density:.0%}", sparse, densified_twin(base, sparse)))
    # Layers whose dense model is the same one exported with dense kernels.
    model = towers(32, 16) if quick else towers(64, 128)
    out.append(("Towers 16-16", model, masked_dense_towers(model)))
    base = embedding(1000 if quick else 20000, 64)
    sparse = sl.sparsify(base, density=0.1, layers=["embedding"], seed=0)
    out.append(("Embedding 10%", sparse, densified_twin(base, sparse)))
    base = attention(8 if quick else 32, 32 if quick else 128)
    sparse = sl.sparsify(base, density=0.1, layers=["attention"], seed=0)
    out.append(("Attention 10%", sparse, DenselyExported(sparse)))
    return out


class SavedModelCall:
    """A SavedModel's serving signature, as TF Serving runs it (in process)."""

    def __init__(self, path: str):
        self._fn = tf.saved_model.load(path).signatures["serve"]
        self._name = list(self._fn.structured_input_signature[1])[0]

    def __call__(self, x):
        return next(iter(self._fn(**{self._name: tf.constant(x)}).values())).numpy()


def directory_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


#: (artifact label, Keras format, file suffix, layout block or None, runner options)
ARTIFACTS = [
    ("litert, XNNPACK", "litert", ".tflite", None, {}),
    ("litert, no XNNPACK", "litert", ".tflite", None, {"xnnpack": False}),
    ("litert gather_graph, XNNPACK", "litert", ".tflite", "gather_graph", {}),
    ("onnx", "onnx", ".onnx", None, {}),
    ("onnx gather_graph", "onnx", ".onnx", "gather_graph", {}),
    ("SavedModel", "tf_saved_model", "", None, {}),
]


def _artifacts(model: Any) -> list[tuple]:
    """The artifacts of :data:`ARTIFACTS` a case has: an int8 case only LiteRT's default layout."""
    formats = getattr(model, "formats", None)
    if formats is None:
        return ARTIFACTS
    return [a for a in ARTIFACTS if a[1] in formats and a[3] is None]


def runner(path: str, format: str, xnnpack: bool = True):  # noqa: A002
    if format == "tf_saved_model":
        return SavedModelCall(path)
    if format == "litert" and not xnnpack:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        interpreter = Interpreter(
            model_path=path, num_threads=1,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        output = interpreter.get_output_details()[0]["index"]

        def call(x):
            interpreter.set_tensor(index, x)
            interpreter.invoke()
            return interpreter.get_tensor(output)

        return call
    model = sl.export.ExportedModel(path, num_threads=1)
    return model


def per_call_times(calls: dict, x: np.ndarray, budget: float, rounds: int) -> dict:
    """Per call, the mean seconds per call of every round; every round runs all calls, shuffled."""
    repeats = []
    for fn in calls.values():
        fn(x)
        start = time.perf_counter()
        fn(x)
        repeats.append(max(1, int(budget / max(time.perf_counter() - start, 1e-6))))
    repeat = min(repeats)
    times: dict = {name: [] for name in calls}
    names = list(calls)
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for k in order.permutation(len(names)):
            fn = calls[names[k]]
            start = time.perf_counter()
            for _ in range(repeat):
                fn(x)
            times[names[k]].append((time.perf_counter() - start) / repeat)
    return {name: np.array(t) for name, t in times.items()}


def run(quick: bool, budget: float, rounds: int, directory: str) -> list[dict]:
    rows = []
    for label, sparse, dense in cases(quick):
        shape = sparse.inputs[0].shape[1:]
        if sparse.inputs[0].dtype == "int32":  # token ids
            x = np.random.default_rng(1).integers(0, sparse.layers[1].input_dim, size=(1, *shape)).astype("int32")
        else:
            x = np.random.default_rng(1).normal(size=(1, *shape)).astype("float32")
        sparse(x), dense(x)
        calls, sizes, stored = {}, {}, {}
        artifacts = _artifacts(sparse)
        for artifact, format, suffix, layout, options in artifacts:  # noqa: A001
            for name, model in (("sparse", sparse), ("dense", dense)):
                if name == "dense" and layout is not None:
                    continue  # the dense model's artifact does not depend on the layout
                path = os.path.join(directory, f"{label}-{name}-{artifact}{suffix}".replace(" ", "_").replace(",", ""))
                if not os.path.exists(path):
                    block = getattr(sl.export, layout)() if layout else contextlib.nullcontext()
                    with block:
                        model.export(path, format=format, verbose=False)
                fn = runner(path, format, **options)
                expected = keras.ops.convert_to_numpy(model(x))
                atol = model.tolerance(expected) if hasattr(model, "tolerance") else 1e-4
                np.testing.assert_allclose(fn(x), expected, rtol=1e-4, atol=atol)
                calls[name, artifact] = fn
                sizes[name, artifact] = directory_bytes(path)
                if name == "sparse" and format != "tf_saved_model":
                    stored[artifact] = sl.export.sparse_weights(path)
        times = per_call_times(calls, x, budget, rounds)
        for artifact, format, _, layout, _ in artifacts:  # noqa: A001
            baseline = artifact if layout is None else artifact.replace(" gather_graph", "")
            weights = stored.get(artifact, [])
            sparse_t, dense_t = times["sparse", artifact], times["dense", baseline]
            row = {
                "case": label, "artifact": artifact,
                "sparse_us": 1e6 * np.median(sparse_t), "dense_us": 1e6 * np.median(dense_t),
                # Per round, both ran within a second of each other: the median of
                # those ratios shrugs off load that comes and goes between rounds.
                "speedup": float(np.median(dense_t / sparse_t)),
                "sparse_kib": sizes["sparse", artifact] / 2**10, "dense_kib": sizes["dense", baseline] / 2**10,
                "storage": _storage(format, layout, weights, label),
            }
            rows.append(row)
            print(
                f"{label:22s} {artifact:30s} sparse {row['sparse_us']:9.1f} us  dense {row['dense_us']:9.1f} us  "
                f"{row['speedup']:5.2f}x  {row['sparse_kib']:8.0f} / {row['dense_kib']:8.0f} KiB  "
                f"{row['storage']}",
                flush=True,
            )
        keras.backend.clear_session()
    return rows


#: What a case's default artifact holds where no weight is stored in a sparse format.
_NOT_SPARSE_STORAGE = {
    "Towers": "the blocks' entries only (batched matmul)",
}


def _storage(format: str, layout: str | None, weights: list[dict], label: str = "") -> str:  # noqa: A002
    if format == "tf_saved_model":
        return "training kernels (TF CSR ops)"
    if layout == "gather_graph":
        return "index constants, gather graph"
    if not weights:
        return _NOT_SPARSE_STORAGE.get(label.split()[0], "dense")
    if format == "onnx":
        encodings = sorted({w["encoding"] for w in weights})
        return f"{len(weights)} sparse weights: " + ", ".join("bit mask + values, folded at load" if e == "mask" else e for e in encodings)
    kinds = sorted({f"{'x'.join(map(str, w['block']))} {'densified at load' if w['read_by'] == 'DENSIFY' else 'sparse ' + w['read_by']}"
                    for w in weights})
    return f"{len(weights)} sparse tensors: " + "; ".join(kinds)


def table(rows: list[dict]) -> str:
    lines = [
        "Batch 1, float32, one thread; microseconds per call, median over interleaved rounds; "
        "dense / sparse is the median over rounds of the ratio within a round.",
        "",
        "| case | artifact | sparse us | dense us | dense / sparse | sparse KiB | dense KiB | size ratio | what the file stores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['artifact']} | {r['sparse_us']:.1f} | {r['dense_us']:.1f} | "
            f"{r['speedup']:.2f}x | {r['sparse_kib']:,.0f} | {r['dense_kib']:,.0f} | "
            f"{r['sparse_kib'] / r['dense_kib']:.2f} | {r['storage']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["case"] for r in rows))
    artifacts = list(dict.fromkeys(r["artifact"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(artifacts)
    for k, artifact in enumerate(artifacts):
        # NaN (no bar) where a case has no such artifact: int8 cases are LiteRT only.
        speedups = [next((r["speedup"] for r in rows if r["case"] == c and r["artifact"] == artifact), np.nan)
                    for c in labels]
        ax.bar(np.arange(len(labels)) + (k - len(artifacts) / 2 + 0.5) * width, speedups, width, label=artifact)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    # Case names wrapped to lines of at most 11 characters: twelve fit side by side.
    ax.set_xticks(np.arange(len(labels)), [textwrap.fill(label, 11) for label in labels], fontsize=8.5)
    ax.set_ylabel("dense latency / sparse latency (batch 1)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and short timing: checks that it runs")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    budget, rounds = (0.002, 2) if args.quick else (0.05, 15)
    print(f"Machine: {machine()}")
    with tempfile.TemporaryDirectory() as directory:
        rows = run(args.quick, budget, rounds, directory)
    command = "python benchmarks/deploy.py" + (" --quick" if args.quick else "")
    text = f"Machine: {machine()}\n\nCommand: `{command}`\n\n{table(rows)}\n"
    print("\n" + text)
    with open(os.path.join(args.out, "deploy.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.out, "deploy.png"))


if __name__ == "__main__":
    main()
