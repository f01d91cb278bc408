"""Keras' own model.export to LiteRT and ONNX, run in the LiteRT interpreter and onnxruntime."""

from __future__ import annotations

import contextlib
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.ops import export_kernels
from sparselayers.ops.context import exporting
from tests import reference
from tests.strategies import block_diagonal_patterns, block_sparse_patterns, random_patterns

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

FORMATS = {"litert": ".tflite", "onnx": ".onnx"}


def _uneven(n=64, m=32):
    """A pattern whose first column is full and the rest nearly empty: too uneven for ELL."""
    mask = np.zeros((n, m), bool)
    mask[:, 0] = True
    mask[np.arange(m - 1), np.arange(1, m)] = True
    return sl.SparsityPattern.from_dense(mask)


#: (pattern, forced kernel or "auto", the export kernel it must trace with)
CASES = {
    "block": (sl.patterns.block_diagonal([(8, 8)] * 3), "auto", "block"),
    "banded": (sl.patterns.banded((16, 16), lower=2, upper=3), "banded", "banded"),
    "dense-forced": (sl.patterns.random((16, 8), density=0.3, seed=1), "dense", "dense"),
    "gather-forced": (sl.patterns.random((16, 8), density=0.2, seed=2), "gather", "gather"),
    "auto-sparse": (sl.patterns.random((64, 32), density=0.05, seed=3), "auto", "dense"),  # stored sparse
    "auto-uneven": (_uneven(), "auto", "dense"),
    "auto-dense": (sl.patterns.random((16, 8), density=0.7, seed=4), "auto", "dense"),
    "empty": (sl.SparsityPattern.from_dense(np.zeros((6, 3))), "auto", "dense"),
}
#: Inside sl.export.gather_graph(): (case, the export kernel it must trace with)
GATHER_GRAPH_CASES = {"auto-sparse": "ell", "auto-uneven": "gather", "auto-dense": "dense", "empty": "ell"}


def _model(layer, input_shape):
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(0)
    for variable in model.weights:  # nonzero biases, so that a dropped bias shows
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def _export(model, tmp_path, format):  # noqa: A002
    path = os.path.join(tmp_path, "model" + FORMATS[format])
    model(np.zeros((1, *model.inputs[0].shape[1:]), "float32"))  # Keras exports only called models
    model.export(path, format=format, verbose=False)
    return path


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize(
    "case, layout",
    [(case, "default") for case in CASES] + [(case, "gather_graph") for case in GATHER_GRAPH_CASES],
)
def test_exported_artifact_computes_the_layer(case, layout, format, tmp_path):  # noqa: A002
    pattern, kernel, expected_kernel = CASES[case]
    layer = sl.SparseDense(pattern, kernel=kernel)
    model = _model(layer, (pattern.shape[0],))
    block = sl.export.gather_graph if layout == "gather_graph" else contextlib.nullcontext
    with exporting(format), block():
        assert layer._select_kernel().name == (GATHER_GRAPH_CASES[case] if layout == "gather_graph" else expected_kernel)
    with block():
        artifact = sl.export.ExportedModel(_export(model, tmp_path, format))
    values, bias = (keras.ops.convert_to_numpy(w) for w in (layer.values, layer.bias))
    for batch in (1, 7):  # one artifact, two batch sizes: the batch dimension is dynamic
        x = np.random.default_rng(batch).normal(size=(batch, pattern.shape[0])).astype("float32")
        got = artifact(x)
        np.testing.assert_allclose(got, keras.ops.convert_to_numpy(model(x)), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got, reference.forward(x, pattern, values, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format", FORMATS)
def test_towers_and_3d_inputs_export(format, tmp_path):  # noqa: A002
    inputs = keras.Input((3, 10))
    towers = sl.Towers(6, hidden_units=[4, 4], output_units=2)
    hidden = sl.SparseDense(sl.patterns.random((10, 10), density=0.2, seed=0), activation="relu")(inputs)
    model = keras.Model(inputs, towers(hidden))
    path = _export(model, tmp_path, format)
    for batch in (1, 7):
        x = np.random.default_rng(batch).normal(size=(batch, 3, 10)).astype("float32")
        assert sl.export.check_export(model, path, x) <= 1e-5


@pytest.mark.parametrize("format", FORMATS)
def test_sparse_convolutions_export_exactly(format, tmp_path):  # noqa: A002
    inputs = keras.Input((9, 9, 3))
    conv = sl.SparseConv2D(sl.patterns.random((27, 6), density=0.3, seed=0), 3, strides=2, padding="same", activation="relu")
    h = sl.SparseConv2D(sl.patterns.random((6, 4), density=0.5, seed=1), 1)(conv(inputs))  # pointwise
    sequence = keras.layers.Reshape((25, 4))(h)
    h = sl.SparseConv1D(sl.patterns.random((12, 2), density=0.5, seed=2), 3, padding="causal")(sequence)
    model = keras.Model(inputs, h)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    path = _export(model, tmp_path, format)
    artifact = sl.export.ExportedModel(path)
    pointwise, causal = (layer for layer in model.layers[2:] if isinstance(layer, sl.SparseKernelLayer))
    for batch in (1, 4):
        x = rng.normal(size=(batch, 9, 9, 3)).astype("float32")
        h = np.maximum(reference.conv(x, conv.to_dense(), (2, 2), "same", (1, 1), conv.bias.numpy()), 0.0)
        h = reference.conv(h, pointwise.to_dense(), (1, 1), "valid", (1, 1), pointwise.bias.numpy())
        expected = reference.conv(h.reshape(batch, 25, 4), causal.to_dense(), (1,), "causal", (1,), causal.bias.numpy())
        np.testing.assert_allclose(artifact(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format", FORMATS)
def test_an_evolved_pattern_exports_with_its_current_connections(format, tmp_path):  # noqa: A002
    """After set_pattern (RigL, SET, sparsify), the artifact pairs each value with its new connection."""
    inputs = keras.Input((12,))
    first = sl.SparseDense(sl.patterns.banded((12, 12), lower=2, upper=2), activation="relu")
    towers = sl.Towers(3, hidden_units=[4], output_units=1)
    model = keras.Model(inputs, towers(first(inputs)))
    rng = np.random.default_rng(0)
    for layer in [first, *towers.tower_layers[1:]]:
        n, m = layer.pattern.shape
        linear = np.sort(rng.choice(n * m, layer.pattern.nnz, replace=False))
        layer.set_pattern(sl.SparsityPattern.from_coo(linear // m, linear % m, shape=(n, m)),
                          values=rng.normal(size=layer.pattern.nnz))
    x = rng.normal(size=(7, 12)).astype("float32")
    want = np.maximum(reference.forward(x, first.pattern, first.values.numpy(), first.bias.numpy()), 0)
    for k, layer in enumerate(towers.tower_layers):
        want = reference.forward(want, layer.pattern, layer.values.numpy(), layer.bias.numpy())
        if k < len(towers.tower_layers) - 1:
            want = np.maximum(want, 0)
    artifact = sl.export.ExportedModel(_export(model, tmp_path, format))
    np.testing.assert_allclose(artifact(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("kernel", ["csr", "sparse_dense_matmul"])
def test_forced_kernel_without_export_form_fails_before_writing(kernel, format, tmp_path):  # noqa: A002
    model = _model(sl.SparseDense(sl.patterns.random((8, 4), density=0.5, seed=0), kernel=kernel), (8,))
    with pytest.raises(ValueError, match=f"`kernel='{kernel}'` cannot be exported to {format}.*kernel='auto'"):
        _export(model, tmp_path, format)
    assert not os.listdir(tmp_path)


def test_size_grows_with_nnz_not_with_the_dense_kernel(tmp_path):
    """2048 x 2048 at 1%: the dense kernel is 16 MiB, the artifacts hold ~42k entries."""
    pattern = sl.patterns.random((2048, 2048), density=0.01, seed=0)
    model = _model(sl.SparseDense(pattern), (2048,))
    x = np.random.default_rng(0).normal(size=(2, 2048)).astype("float32")
    for format in FORMATS:  # noqa: A001
        path = _export(model, tmp_path, format)
        assert os.path.getsize(path) < 2**20, (format, os.path.getsize(path))
        assert sl.export.check_export(model, path, x) <= 1e-5


def test_default_export_size_follows_nnz_and_the_other_layouts_are_one_block_away(tmp_path):
    """512 x 512 at 10%: by default ~26k entries stored sparse; densified() stores the 1 MiB dense kernel."""
    pattern = sl.patterns.random((512, 512), density=0.10, seed=0)
    layer = sl.SparseDense(pattern)
    model = _model(layer, (512,))
    x = np.random.default_rng(0).normal(size=(3, 512)).astype("float32")
    dense_bytes = 512 * 512 * 4
    # Bytes per entry: LiteRT a float32 value and at most an int32 index; ONNX an int64 index.
    per_entry = {"litert": 8, "onnx": 12}
    for format in FORMATS:  # noqa: A001
        with exporting(format):
            assert layer._select_kernel().name == "dense"
            with sl.export.densified():
                assert layer._select_kernel().name == "dense"
            with sl.export.gather_graph():
                assert layer._select_kernel().name == "ell"
        small = _export(model, tmp_path, format)
        assert sl.export.check_export(model, small, x) <= 1e-5
        assert os.path.getsize(small) <= per_entry[format] * pattern.nnz + 4 * 512 + 16 * 2**10, format
        for name, block in (("densified", sl.export.densified()), ("gather", sl.export.gather_graph())):
            path = os.path.join(tmp_path, name + FORMATS[format])
            with block:
                model.export(path, format=format, verbose=False)
            assert sl.export.check_export(model, path, x) <= 1e-5
            assert not sl.export.sparse_weights(path), (format, name)  # no sparse tensors in these layouts
            if name == "densified":
                assert os.path.getsize(path) >= dense_bytes
            else:  # an int32 index and a float32 value per ELL slot, plus padding
                assert os.path.getsize(path) < 16 * pattern.nnz < dense_bytes


def test_check_export_rejects_an_artifact_of_another_model(tmp_path):
    pattern = sl.patterns.random((8, 4), density=0.5, seed=0)
    exported = _model(sl.SparseDense(pattern), (8,))
    path = _export(exported, tmp_path, "onnx")
    other = _model(sl.SparseDense(pattern, bias_initializer="ones"), (8,))
    other.layers[-1].values.assign(np.ones(pattern.nnz, "float32"))
    with pytest.raises(ValueError, match="differ from the model's by up to"):
        sl.export.check_export(other, path, np.ones((2, 8), "float32"))


def test_artifact_format_names_the_path():
    assert sl.export.artifact_format("a/model.TFLITE") == "litert"
    with pytest.raises(ValueError, match=r"\.tflite \(LiteRT\) or \.onnx file. Received: path='model.keras'"):
        sl.export.artifact_format("model.keras")


# The export kernels on their own, inside a trace as in an export --------------------------


def _traced(kernel, x, values, format="onnx"):  # noqa: A002
    with exporting(format):
        return tf.function(lambda x, v: kernel(x, v))(x, values).numpy()


@settings(max_examples=12)  # each example traces a tf.function
@given(
    pattern=random_patterns(),
    name=st.sampled_from(["ell", "gather", "dense"]),
    batch=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_export_kernels_match_the_dense_reference(pattern, name, batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, pattern.shape[0])).astype("float32")
    values = rng.normal(size=pattern.nnz).astype("float32")
    got = _traced(export_kernels._EXPORT_KERNELS[name](pattern), x, values)
    np.testing.assert_allclose(got, reference.forward(x, pattern, values), rtol=1e-5, atol=1e-5)


@settings(max_examples=12)
@given(pattern=st.one_of(block_diagonal_patterns(), block_sparse_patterns()), seed=st.integers(0, 100))
def test_embedded_block_kernel_matches_the_dense_reference(pattern, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, pattern.shape[0])).astype("float32")
    values = rng.normal(size=pattern.nnz).astype("float32")
    kernel = export_kernels._export_kernel("block", pattern)
    np.testing.assert_allclose(_traced(kernel, x, values), reference.forward(x, pattern, values), rtol=1e-5, atol=1e-5)


class _Capturing(export_kernels.ExportKernel):
    name = "capturing"

    def __init__(self, pattern):
        super().__init__(pattern)
        with tf.init_scope():
            self._rows = tf.constant(pattern.rows)

    def compute(self, x, values):
        return tf.gather(x, self._rows, axis=1) @ tf.zeros([self.pattern.nnz, self.pattern.shape[1]])


class _CSRInside(export_kernels.ExportKernel):
    name = "csr-inside"

    def compute(self, x, values):
        return sl.ops.get_kernel("csr", self.pattern)(x, values)


def test_export_kernel_refuses_captured_tensors_and_unconvertible_ops():
    pattern = sl.patterns.random((6, 4), density=0.5, seed=0)
    x, values = np.ones((2, 6), "float32"), np.ones(pattern.nnz, "float32")
    with pytest.raises(ValueError, match="captured a tensor created outside the traced function"):
        _traced(_Capturing(pattern), x, values, "litert")
    with pytest.raises(ValueError, match=r"tf2onnx cannot convert: \[.*'SparseMatrixMatMul'"):
        _traced(_CSRInside(pattern), x, values, "onnx")


def test_dynamic_range_quantization_stays_within_the_documented_relative_tolerance(tmp_path):
    """docs/deploying.md: int8 weights move outputs by under 2% of their range, not within 1e-5."""
    model = _model(sl.SparseDense(sl.patterns.block_diagonal([(64, 64)] * 4)), (256,))
    model(np.zeros((1, 256), "float32"))
    path = os.path.join(tmp_path, "quantized.tflite")
    model.export(path, format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT])
    x = np.random.default_rng(0).normal(size=(7, 256)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    difference = np.abs(sl.export.ExportedModel(path)(x) - expected).max()
    assert 1e-5 < difference <= 0.02 * np.abs(expected).max()


def test_deploying_page_examples_run(tmp_path, monkeypatch):
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "deploying.md"
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.+?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 5
    namespace = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - our own docs


def test_explicit_litert_sparsity_option_is_kept_and_not_repeated(tmp_path):
    """optimizations=[EXPERIMENTAL_SPARSITY] given by hand: the same artifact as the default."""
    pattern = sl.patterns.random((256, 256), density=0.02, seed=0)
    model = _model(sl.SparseDense(pattern), (256,))
    model(np.zeros((1, 256), "float32"))
    options = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    path = os.path.join(tmp_path, "sparse.tflite")
    model.export(path, format="litert", verbose=False, optimizations=options)
    assert options == [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]  # the caller's list is not changed
    x = np.random.default_rng(0).normal(size=(7, 256)).astype("float32")
    assert sl.export.check_export(model, path, x) <= 1e-5
    assert os.path.getsize(path) == os.path.getsize(_export(model, tmp_path, "litert"))


def test_export_benchmark_quick_mode_writes_table_and_plot(tmp_path):
    """benchmarks/export.py --quick runs end to end (timings are not asserted)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "export.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": root},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "export.md").read_text().splitlines() if line.startswith("| ")]
    kernels = {(r[0].strip(), r[2].strip()): r[3].strip() for r in rows[2:]}
    assert kernels[("random 1.0%", "onnx")] == "dense"
    assert kernels[("random 1.0%", "onnx gather graph")] == "ell"
    assert kernels[("random 30.0%", "litert densified")] == "dense"
    sizes = {(r[0].strip(), r[2].strip()): float(r[7].replace(",", "")) for r in rows[2:]}
    # 256 x 256 at 30%: the default (stored sparse) is smaller than the densified artifact.
    assert sizes[("random 30.0%", "onnx")] < sizes[("random 30.0%", "onnx densified")]
    assert {kernels[("banded +-16", "onnx")], kernels[("block diagonal 32 x (8x8)", "litert")]} == {"banded", "block"}
    assert (tmp_path / "export.png").stat().st_size > 0


# What lands in the artifact: sparse encodings, sparse kernels, size ------------------------


def _litert_sparse_tensors(path):
    """(dense shape, block shape, op reading it) of every LiteRT tensor with a sparsity field, read from the schema."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    op_names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    subgraph = model.subgraphs[0]
    reader = {}
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        for index in op.inputs:
            reader[int(index)] = op_names[max(code.builtinCode, code.deprecatedBuiltinCode)]
    found = []
    for index, tensor in enumerate(subgraph.tensors):
        if tensor.sparsity is not None:
            rank = len(tensor.shape)
            # Dimensions past the tensor's rank in the traversal order are the blocks' own.
            block = [1] * rank
            for k, d in enumerate(tensor.sparsity.blockMap if tensor.sparsity.blockMap is not None else []):
                block[int(d)] = int(tensor.sparsity.dimMetadata[rank + k].denseSize)
            found.append((tuple(int(d) for d in tensor.shape), tuple(block), reader.get(index)))
    return found


def _onnx_sparse_initializers(path):
    import onnx

    return {t.values.name: tuple(t.dims) for t in onnx.load(path).graph.sparse_initializer}


def _layer_type_model(kind):
    """A model of one sparse layer type at density 0.1, its input shape."""
    rng = np.random.default_rng(0)

    def random(shape):
        return sl.patterns.random(shape, density=0.1, seed=int(rng.integers(1000)))

    if kind == "dense":
        shape = (256,)
        layers = [sl.SparseDense(random((256, 192)), activation="relu"), sl.SparseDense(random((192, 64)))]
    elif kind == "towers":
        shape = (128,)
        layers = [sl.SparseDense(random((128, 256)), activation="relu"), sl.Towers(4, hidden_units=[32], output_units=2)]
    elif kind == "conv2d":
        shape = (8, 8, 16)
        layers = [sl.SparseConv2D(random((144, 96)), 3, strides=2, padding="same", activation="relu"),
                  sl.SparseConv2D(random((96, 128)), 1)]
    elif kind == "conv1d":
        shape = (12, 32)
        layers = [sl.SparseConv1D(random((96, 128)), 3, padding="causal", activation="relu"),
                  sl.SparseConv1D(random((128, 64)), 1)]
    elif kind == "embedding":
        shape = (6,)
        layers = [sl.SparseEmbedding(random((500, 32))), sl.SparseDense(random((32, 16)))]
    else:
        shape = (8, 8, 64)
        layers = [sl.SparseSeparableConv2D(random((64, 192)), 3, padding="same")]
    inputs = keras.Input(shape, dtype="int32" if kind == "embedding" else "float32")
    h = inputs
    for layer in layers:
        h = layer(h)
    model = keras.Model(inputs, h)
    for variable in model.weights:  # outputs of order 1, so that atol=1e-5 is a float32 tolerance
        variable.assign(0.2 * rng.normal(size=variable.shape).astype("float32"))
    return model, shape


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("kind", ["dense", "towers", "conv2d", "conv1d", "separable", "embedding"])
def test_every_sparse_layer_type_exports_exactly_with_sparse_storage(kind, format, tmp_path):  # noqa: A002
    model, shape = _layer_type_model(kind)
    path = _export(model, tmp_path, format)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 500, size=(3, *shape)).astype("int32") if kind == "embedding" else (
        rng.normal(size=(3, *shape)).astype("float32"))
    assert sl.export.check_export(model, path, x) <= 1e-5
    layers = sl.sparse_layers(model)
    with exporting(format):
        # The kernels whose dense form the converter stores sparse: products and an embedding's table.
        scattered = [layer for layer in layers if layer._select_kernel().name in ("dense", "table_lookup")]
    assert scattered
    stored = sl.export.sparse_weights(path)
    # Each scattered layer's kernel is stored sparse, in the runtime's layout
    # (FULLY_CONNECTED (units, rows), CONV_2D (filters, *window, channels), ...):
    # its entries are the pattern's.
    assert sorted(w["entries"] for w in stored) == sorted(layer.pattern.nnz for layer in scattered)
    assert sorted(int(np.prod(w["shape"])) for w in stored) == sorted(
        layer.pattern.shape[0] * layer.pattern.shape[1] for layer in scattered)
    if kind == "embedding":  # the table is expanded at load, then gathered from
        table = [w for w in stored if w["shape"] == scattered[0].pattern.shape]
        assert [w["used_by"] for w in table] == [{"litert": "GATHER", "onnx": "Gather"}[format]]
    if format == "litert":
        assert [(w["shape"], w["block"]) for w in stored] == [(s, b) for s, b, _ in _litert_sparse_tensors(path)]
    else:
        initializers = _onnx_sparse_initializers(path)
        assert {w["name"]: w["shape"] for w in stored if w["encoding"] == "sparse_initializer"} == initializers
    # Size follows the entries: LiteRT a float32 value and at most an int32 index
    # each, ONNX an int64 index; other weights (biases, depthwise kernels,
    # Towers' block-diagonal layers) dense. The densified artifact holds every
    # zero too: the default saves at least half of their bytes.
    entries = sum(layer.pattern.nnz for layer in scattered)
    zeros = sum(layer.pattern.shape[0] * layer.pattern.shape[1] for layer in scattered) - entries
    other = sum(int(np.prod(w.shape)) for w in model.weights) - entries
    per_entry = {"litert": 8, "onnx": 12}[format]
    assert os.path.getsize(path) <= per_entry * entries + 4 * other + 16 * 2**10
    densified = os.path.join(tmp_path, "densified" + FORMATS[format])
    with sl.export.densified():
        model.export(densified, format=format, verbose=False)
    assert os.path.getsize(path) < os.path.getsize(densified) - 0.5 * 4 * zeros


def _mlp(block, density=0.1):
    inputs = keras.Input((256,))
    h = keras.layers.Dense(128, activation="relu")(inputs)
    dense = keras.Model(inputs, keras.layers.Dense(64)(h))
    return sl.sparsify(dense, density=density, block=block, seed=0)


@pytest.mark.parametrize(
    "block, kernel_block, read_by",
    [((4, 1), (1, 4), "FULLY_CONNECTED"), ((16, 1), (1, 4), "FULLY_CONNECTED"), ((1, 4), (1, 1), "DENSIFY"),
     (None, (1, 1), "DENSIFY")],
)
def test_litert_multiplies_1x4_blocks_sparse_and_densifies_other_patterns(block, kernel_block, read_by, tmp_path):
    """4 consecutive inputs of one unit, sparsify's block=(4, 1), are FULLY_CONNECTED's 1x4 blocks."""
    model = _mlp(block)
    path = _export(model, tmp_path, "litert")
    x = np.random.default_rng(0).normal(size=(5, 256)).astype("float32")
    assert sl.export.check_export(model, path, x) <= 1e-5
    stored = _litert_sparse_tensors(path)
    assert sorted(s for s, _, _ in stored) == [(64, 128), (128, 256)]
    assert {(b, r) for _, b, r in stored} == {(kernel_block, read_by)}


def test_scattered_tiles_export_as_the_stored_kernel_and_block_diagonals_keep_their_blocks():
    # sparsify(block=(16, 1)) at 5% trains with the block kernel; at export its
    # tiles share rows, so the kernel stored sparse replaces the gather-heavy block
    # graph, which only gather_graph() keeps. A block diagonal keeps its batched matmul.
    tiles = sl.sparse_layers(_mlp((16, 1), density=0.05))[0]
    diagonal = sl.SparseDense(sl.patterns.block_diagonal([(16, 16)] * 8))
    diagonal.build((None, 128))
    assert tiles.kernel_name == diagonal.kernel_name == "block"
    for format in FORMATS:  # noqa: A001
        with exporting(format):
            assert (tiles._select_kernel().name, diagonal._select_kernel().name) == ("dense", "block")
            with sl.export.gather_graph():
                assert (tiles._select_kernel().name, diagonal._select_kernel().name) == ("block", "block")


def test_dynamic_range_quantized_export_stores_weights_dense_and_says_why(tmp_path):
    """TFLite's int8 1x16 sparse FULLY_CONNECTED is wrong in dynamic range mode: the default leaves it out."""
    model = _mlp((16, 1), density=0.1)
    model(np.zeros((1, 256), "float32"))
    x = np.random.default_rng(0).normal(size=(7, 256)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    path = os.path.join(tmp_path, "int8.tflite")
    with pytest.warns(UserWarning, match="int8 weights are stored dense"):
        model.export(path, format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT])
    assert not _litert_sparse_tensors(path)
    assert np.abs(sl.export.ExportedModel(path)(x) - expected).max() <= 0.02 * np.abs(expected).max()
    both = os.path.join(tmp_path, "int8-sparse.tflite")
    with pytest.warns(UserWarning, match="returns wrong outputs"):
        model.export(both, format="litert", verbose=False,
                     optimizations=[tf.lite.Optimize.DEFAULT, tf.lite.Optimize.EXPERIMENTAL_SPARSITY])
    assert {b for _, b, _ in _litert_sparse_tensors(both)} == {(1, 16)}
    # What the warning is about: outputs off by more than the outputs' own range.
    assert np.abs(sl.export.ExportedModel(both)(x) - expected).max() > np.abs(expected).max()


def test_full_integer_export_stores_1x16_tiles_sparse_when_asked_and_dense_by_default(tmp_path):
    """int8 with a representative dataset: FULLY_CONNECTED reads 1x16 tiles sparse, with the dense int8 model's outputs."""
    model = _mlp((16, 1), density=0.1)
    x = np.random.default_rng(0).normal(size=(16, 256)).astype("float32")
    model(x)

    def representative():
        for row in x:
            yield [row[None]]

    paths = {name: os.path.join(tmp_path, f"{name}.tflite") for name in ("default", "sparse", "densified")}
    with pytest.warns(UserWarning, match="stored dense"):
        model.export(paths["default"], format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT],
                     representative_dataset=representative)
    with pytest.warns(UserWarning, match="1x16 tiles"):
        model.export(paths["sparse"], format="litert", verbose=False, representative_dataset=representative,
                     optimizations=[tf.lite.Optimize.DEFAULT, tf.lite.Optimize.EXPERIMENTAL_SPARSITY])
    with sl.export.densified(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(paths["densified"], format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT],
                     representative_dataset=representative)
    assert not _litert_sparse_tensors(paths["default"])
    stored = sl.export.sparse_weights(paths["sparse"])
    assert sorted(w["shape"] for w in stored) == [(64, 128), (128, 256)]
    assert {(w["block"], w["read_by"]) for w in stored} == {((1, 16), "FULLY_CONNECTED")}
    assert os.path.getsize(paths["sparse"]) < 0.5 * os.path.getsize(paths["densified"])
    # The dense int8 model's outputs, up to the rounding of a few int8 output steps
    # (the sparse kernel rounds some of them the other way), and Keras' within quantization error.
    outputs = {name: sl.export.ExportedModel(path)(x) for name, path in paths.items()}
    step = 2 * np.abs(outputs["densified"]).max() / 255
    np.testing.assert_allclose(outputs["sparse"], outputs["densified"], atol=3 * step)
    assert np.mean(outputs["sparse"] == outputs["densified"]) > 0.9
    expected = keras.ops.convert_to_numpy(model(x))
    assert np.abs(outputs["sparse"] - expected).max() <= 0.05 * np.abs(expected).max()


def _graph_ops(path):
    """The operator types of an artifact's main graph, in order."""
    if path.endswith(".onnx"):
        import onnx

        return [node.op_type for node in onnx.load(path).graph.node]
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = [model.operatorCodes[op.opcodeIndex] for op in model.subgraphs[0].operators]
    return [names[max(code.builtinCode, code.deprecatedBuiltinCode)] for code in codes]


@pytest.mark.parametrize("format", FORMATS)
def test_sparse_convolutions_export_as_convolutions_with_sparse_kernels(format, tmp_path):  # noqa: A002
    """A MobileNet-style block: the runtime convolves (CONV_2D, Conv) with the kernel stored sparse."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.ZeroPadding2D(1)(inputs)
    stem = sl.SparseConv2D(sl.patterns.random((27, 16), density=0.3, seed=0), 3, strides=2, activation="relu")
    h = keras.layers.DepthwiseConv2D(3, padding="same")(stem(h))
    pointwise = sl.SparseConv2D(sl.patterns.random((16, 32), density=0.2, seed=1), 1, activation="relu")
    separable = sl.SparseSeparableConv2D(sl.patterns.random((32, 24), density=0.2, seed=2), 3, padding="same")
    h = keras.layers.GlobalAveragePooling2D(keepdims=True)(separable(pointwise(h)))
    model = keras.Model(inputs, h)
    for variable in model.weights:
        variable.assign(0.3 * rng.normal(size=variable.shape).astype("float32"))
    path = _export(model, tmp_path, format)
    ops = _graph_ops(path)
    stored = sl.export.sparse_weights(path)
    if format == "litert":
        assert "FULLY_CONNECTED" not in ops and "CONV_2D" in ops, ops
        # Each kernel expanded once at load, then convolved: the sparse-weight CONV_2D XNNPACK looks for.
        assert sorted(w["used_by"] for w in stored) == ["CONV_2D"] * 3, stored
    else:
        assert "MatMul" not in ops and ops.count("Conv") >= 3, ops
        assert sorted(w["used_by"] for w in stored) == ["Conv"] * 3, stored
    layers = (stem, pointwise, separable)
    assert sorted(w["entries"] for w in stored) == sorted(layer.pattern.nnz for layer in layers)
    # Size follows the entries: at most 12 bytes each (ONNX's int64 index), the other weights dense.
    entries = sum(layer.pattern.nnz for layer in layers)
    other = sum(int(np.prod(w.shape)) for w in model.weights) - entries
    assert os.path.getsize(path) <= 12 * entries + 4 * other + 16 * 2**10
    artifact = sl.export.ExportedModel(path)
    depthwise = model.layers[3]
    for batch in (1, 3):
        x = rng.normal(size=(batch, 16, 16, 3)).astype("float32")
        want = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
        want = np.maximum(reference.conv(want, stem.to_dense(), (2, 2), "valid", (1, 1), stem.bias.numpy()), 0)
        dw = depthwise.kernel.numpy()  # (3, 3, 16, 1): one filter per channel
        want = np.stack([reference.conv(want[..., c:c + 1], dw[:, :, c:c + 1], (1, 1), "same", (1, 1))[..., 0]
                         for c in range(16)], axis=-1) + depthwise.bias.numpy()
        want = np.maximum(reference.conv(want, pointwise.to_dense(), (1, 1), "valid", (1, 1), pointwise.bias.numpy()), 0)
        sdw = separable.depthwise_kernel.numpy()
        want = np.stack([reference.conv(want[..., c:c + 1], sdw[:, :, c:c + 1], (1, 1), "same", (1, 1))[..., 0]
                         for c in range(32)], axis=-1)
        want = reference.conv(want, separable.to_dense(), (1, 1), "valid", (1, 1), separable.bias.numpy())
        np.testing.assert_allclose(artifact(x), want.mean(axis=(1, 2), keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "csr"])
def test_saved_model_serves_small_batches_with_sparse_dense_matmul_and_large_ones_with_the_kernel(kernel, tmp_path):
    # TF Serving runs one request at a time: with kernel="auto", batches up to
    # SERVING_SMALL_BATCH rows read each entry once (sparse_dense_matmul), larger
    # ones run the layer's kernel (here TF's CSR ops). A forced kernel is kept.
    from sparselayers.ops.serving import SERVING_SMALL_BATCH

    pattern = sl.patterns.random((64, 48), density=0.1, seed=0)
    layer = sl.SparseDense(pattern, kernel=kernel)
    model = _model(layer, (64,))
    model(np.zeros((1, 64), "float32"))
    path = str(tmp_path / "served")
    model.export(path, verbose=False)
    served = tf.saved_model.load(path)
    weights = reference.dense_kernel(pattern, layer.values.numpy())
    rng = np.random.default_rng(0)
    for batch in (1, SERVING_SMALL_BATCH, SERVING_SMALL_BATCH + 1, 33):
        x = rng.normal(size=(batch, 64)).astype("float32")
        expected = x.astype(np.float64) @ weights + layer.bias.numpy()
        np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    graph = saved.meta_graphs[0].graph_def
    types = {node.op for function in graph.library.function for node in function.node_def}
    assert "SparseMatrixMatMul" in types
    assert ("SparseTensorDenseMatMul" in types) == (kernel == "auto")


def test_a_table_read_twice_and_as_tied_weights_is_expanded_once_for_every_reader(tmp_path):
    # One SparseEmbedding on two inputs (two GATHERs of one table), and the table
    # read again as a product's weights: every reader gets the expanded table.
    rng = np.random.default_rng(0)
    a, b = keras.Input((3,), dtype="int32"), keras.Input((3,), dtype="int32")
    embedding = sl.SparseEmbedding(sl.patterns.random((300, 8), density=0.1, seed=0))
    h = embedding(a) + embedding(b)
    model = keras.Model([a, b], h)
    ids = [rng.integers(0, 300, size=(2, 3)).astype("int32") for _ in range(2)]
    expected = keras.ops.convert_to_numpy(model(ids))
    path = os.path.join(tmp_path, "shared.tflite")
    model.export(path, format="litert", verbose=False)
    stored = sl.export.sparse_weights(path)
    assert [(w["shape"], w["read_by"], w["entries"]) for w in stored] == [((300, 8), "DENSIFY", embedding.pattern.nnz)]
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner()
    names = sorted(runner.get_input_details())
    out = next(iter(runner(**{name: x for name, x in zip(names, ids)}).values()))
    np.testing.assert_allclose(out, expected, atol=1e-6)

    from sparselayers.ops.sparse_storage import sparse_gather_tables
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    # A FULLY_CONNECTED reading the gathered table as its weights (tied weights), built by hand.
    table = np.zeros((40, 8), "float32")
    table[::3, ::2] = rng.normal(size=table[::3, ::2].shape)
    ids_in = keras.Input((2,), dtype="int32")
    gathered = keras.layers.Embedding(40, 8, weights=[table])(ids_in)
    tied = keras.Model(ids_in, gathered)
    dense_path = os.path.join(tmp_path, "tied.tflite")
    tied.export(dense_path, format="litert", verbose=False)
    model_t = flatbuffer_utils.read_model_from_bytearray(bytearray(open(dense_path, "rb").read()))
    graph = model_t.subgraphs[0]
    gather = next(op for op in graph.operators
                  if model_t.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.GATHER)
    table_index = int(gather.inputs[0])
    # A second reader of the table: the graph's output becomes table + gather's rows via a broadcast ADD.
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    code.version = 1
    model_t.operatorCodes.append(code)
    out_t = schema.TensorT()
    out_t.shape, out_t.type, out_t.buffer, out_t.name = [40, 8], schema.TensorType.FLOAT32, 0, b"table_twice"
    graph.tensors.append(out_t)
    add = schema.OperatorT()
    add.opcodeIndex, add.inputs, add.outputs = len(model_t.operatorCodes) - 1, [table_index, table_index], [len(graph.tensors) - 1]
    add.builtinOptionsType, add.builtinOptions = schema.BuiltinOptions.AddOptions, schema.AddOptionsT()
    graph.operators.append(add)
    graph.outputs = [*graph.outputs, len(graph.tensors) - 1]
    dense_bytes = bytes(flatbuffer_utils.convert_object_to_bytearray(model_t))
    sparse_bytes = sparse_gather_tables(dense_bytes)
    assert len(sparse_bytes) < len(dense_bytes)
    results = []
    for content in (dense_bytes, sparse_bytes):
        interpreter = Interpreter(model_content=content)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.array([[0, 3]], "int32"))
        interpreter.invoke()
        results.append([interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()])
    for dense_out, sparse_out in zip(*results):
        np.testing.assert_array_equal(sparse_out, dense_out)
    assert any(np.array_equal(r, 2 * table) for r in results[1])


def test_a_table_too_large_to_fold_exports_as_the_padded_lookup():
    pattern = sl.patterns.random((1 << 20, 128), density=0.001, seed=0)
    assert not sl.ops.choose.fits_dense(pattern)
    layer = sl.SparseEmbedding(pattern)
    layer.build()
    for format in FORMATS:  # noqa: A001
        with exporting(format):
            assert layer._select_kernel().name == "padded_lookup"


def test_float16_quantization_stores_sparse_weights_without_a_warning(tmp_path):
    model = _mlp(None, density=0.1)
    x = np.random.default_rng(0).normal(size=(5, 256)).astype("float32")
    model(x)
    path = os.path.join(tmp_path, "f16.tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sparselayers warning: float16 weights are stored sparse too
        model.export(path, format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT],
                     target_spec={"supported_types": [tf.float16]})
    stored = sl.export.sparse_weights(path)
    assert sorted(w["shape"] for w in stored) == [(64, 128), (128, 256)]
    expected = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(sl.export.ExportedModel(path)(x), expected, atol=2e-3 * np.abs(expected).max())


def test_saved_model_serving_reads_one_int64_index_constant_in_both_branches():
    from sparselayers.ops.serving import SmallBatchServing

    pattern = sl.patterns.random((64, 48), density=0.1, seed=0)
    kernel = sl.ops.get_kernel("csr_gather", pattern)  # its values gradient shares the indices
    serving = SmallBatchServing(kernel)
    assert serving._indices.dtype == tf.int64
    assert serving.kernel._indices is serving._indices
    assert all(t is serving._indices for t in serving.kernel._sampled.tensors if tuple(t.shape) == (pattern.nnz, 2))
    assert kernel._indices.dtype == tf.int32  # the training kernel is untouched
    values = np.random.default_rng(0).normal(size=pattern.nnz).astype("float32")
    for batch in (1, 9):
        x = np.random.default_rng(batch).normal(size=(batch, 64)).astype("float32")
        np.testing.assert_allclose(serving(x, values), x.astype(np.float64) @ reference.dense_kernel(pattern, values),
                                   rtol=1e-5, atol=1e-5)
