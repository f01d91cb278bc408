"""SparseEmbedding against Keras' Embedding and a NumPy table (float64); a sparsified transformer block end to end."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.callbacks.dynamic import input_gradient_tile
from tests import reference
from sparselayers.ops.lookup import one_hot


def _pair(pattern, mask_zero=False, seed=0):
    rng = np.random.default_rng(seed)
    layer = sl.SparseEmbedding(pattern, mask_zero=mask_zero, dtype="float64")
    layer.build(None)
    layer.values.assign(rng.normal(size=pattern.nnz))
    twin = keras.layers.Embedding(*pattern.shape, mask_zero=mask_zero, dtype="float64")
    twin.build(None)
    twin.embeddings.assign(layer.to_dense())
    return layer, twin


@settings(max_examples=15)
@given(
    st.integers(1, 30),
    st.integers(1, 6),
    st.sampled_from([0.0, 0.2, 1.0]),
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_lookup_equals_keras_and_numpy_in_outputs_and_gradients(vocab, dim, density, ids_shape, jit, seed):
    rng = np.random.default_rng(seed)
    pattern = sl.SparsityPattern.from_dense(rng.random((vocab, dim)) < density)
    layer, twin = _pair(pattern, seed=seed)
    ids = rng.integers(0, vocab, size=ids_shape)
    table = pattern.to_dense(layer.values.numpy())
    upstream = tf.constant(rng.normal(size=(*ids_shape, dim)))

    def losses(ids):
        with tf.GradientTape(persistent=True) as tape:
            y, y_keras = layer(ids), twin(ids)
            loss, loss_keras = tf.reduce_sum(y * upstream), tf.reduce_sum(y_keras * upstream)
        return y, y_keras, tape.gradient(loss, layer.values), tape.gradient(loss_keras, twin.embeddings)

    y, y_keras, grad, grad_keras = (tf.function(losses, jit_compile=True) if jit else losses)(tf.constant(ids))
    np.testing.assert_array_equal(y, table[ids])
    np.testing.assert_array_equal(y, y_keras)
    dense_gradient = np.zeros((vocab, dim))
    np.add.at(dense_gradient, ids.ravel(), upstream.numpy().reshape(-1, dim))
    np.testing.assert_allclose(tf.convert_to_tensor(grad), dense_gradient[pattern.rows, pattern.cols], atol=1e-12)
    np.testing.assert_allclose(tf.convert_to_tensor(grad_keras).numpy()[pattern.rows, pattern.cols], tf.convert_to_tensor(grad), atol=1e-12)
    assert layer.kernel_name == ("padded_lookup" if jit else "ragged_lookup")


def test_gradient_reaches_only_the_rows_looked_up_as_indexed_slices():
    layer, _ = _pair(sl.patterns.random((100, 8), density=0.3, seed=0))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(np.array([[3, 3, 7]])))
    grad = tape.gradient(loss, layer.values)
    assert isinstance(grad, tf.IndexedSlices)
    rows = layer.pattern.rows[np.unique(grad.indices.numpy())]
    assert set(rows) <= {3, 7}


def test_mask_zero_as_keras():
    layer, twin = _pair(sl.patterns.random((10, 4), density=0.5, seed=0), mask_zero=True)
    ids = np.array([[0, 3, 0], [9, 0, 1]])
    np.testing.assert_array_equal(layer.compute_mask(ids), twin.compute_mask(ids))
    inputs = keras.Input((3,), dtype="int32")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(layer(inputs)))
    reference = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(twin(inputs)))
    np.testing.assert_allclose(model(ids), reference(ids), atol=1e-12)  # the mask drops the padding from the mean
    assert _pair(sl.patterns.dense((10, 4)))[0].compute_mask(ids) is None


def test_rigl_operand_is_the_one_hot_and_its_gradient_the_dense_one():
    ids = tf.constant([4, 1, 4, 0])
    dy = tf.constant(np.random.default_rng(0).normal(size=(4, 3)))
    x = one_hot(ids, 6, tf.float64)
    dense = np.eye(6)[ids.numpy()]
    np.testing.assert_allclose(input_gradient_tile(x, dy), dense.T @ dy.numpy(), atol=1e-12)


def test_bad_arguments_are_named():
    pattern = sl.patterns.dense((5, 2))
    with pytest.raises(TypeError, match="`mask_zero` must be a bool. Received: mask_zero='yes'"):
        sl.SparseEmbedding(pattern, mask_zero="yes")
    with pytest.raises(ValueError, match="`kernel` must be 'auto' for SparseEmbedding. Received: kernel='csr'"):
        sl.SparseEmbedding(pattern, kernel="csr")
    with pytest.raises(TypeError, match="integer ids. Received: inputs of dtype string"):
        sl.SparseEmbedding(pattern)(tf.constant(["a"]))
    with pytest.raises(tf.errors.InvalidArgumentError):
        sl.SparseEmbedding(pattern)(np.array([5]))  # out of the table, as Embedding on CPU


# A transformer block ------------------------------------------------------------

VOCAB, DIM, SEQ = 40, 16, 6


def _block(dtype="float64", ids_dtype="int32"):
    """Embedding, MultiHeadAttention with a residual and LayerNormalization, a Dense feed-forward."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((SEQ,), dtype=ids_dtype, name="ids")
    x = keras.layers.Embedding(VOCAB, DIM, name="embed", dtype=dtype)(ids)
    h = keras.layers.MultiHeadAttention(2, DIM // 2, name="mha", dtype=dtype)(x, x)
    h = keras.layers.LayerNormalization(name="norm", dtype=dtype)(h + x)
    f = keras.layers.Dense(32, activation="relu", name="ff1", dtype=dtype)(h)
    return keras.Model(ids, keras.layers.Dense(DIM, name="ff2", dtype=dtype)(f) + h)


def _ids(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ))


def _kernels(model):
    """Every dense kernel (rank >= 2) left in the model, and every sparse layer's (kept, total) entries."""
    dense = [v.path for v in model.weights if len(v.shape) >= 2 and not v.path.endswith("bias")]  # heads shape biases
    counts = [(layer.pattern.nnz, layer.pattern.shape[0] * layer.pattern.shape[1]) for layer in sl.sparse_layers(model)]
    return dense, counts


def test_transformer_block_sparsified_at_density_one_is_exact():
    model = _block()
    full = sl.sparsify(model, density=1.0)
    names = sorted(layer.name for layer in sl.sparse_layers(full))
    assert names == ["attention_output", "embed", "ff1", "ff2", "key", "query", "value"]
    ids = _ids()
    np.testing.assert_allclose(full(ids), model(ids), atol=1e-12)
    assert _kernels(full)[0] == []


def test_transformer_block_at_30_percent_keeps_30_percent_and_no_dense_kernel(tmp_path):
    model = _block()
    sparse = sl.sparsify(model, density=0.3)
    dense, counts = _kernels(sparse)
    assert dense == []
    for kept, total in counts:
        assert kept == round(0.3 * total)  # uniform: every kernel keeps 30% of its entries
    # Each sparse layer holds the largest 30% of its Keras kernel: the model is the dense one with the rest zeroed.
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    for layer in sl.sparse_layers(sparse):
        twin = next(l for l in reference._flatten_layers() if l.path == layer.path)
        variable = twin.embeddings if isinstance(twin, keras.layers.Embedding) else twin.kernel
        view = type(layer).dense_kernel_view(variable.numpy(), twin)
        kept = np.abs(view)[layer.pattern.rows, layer.pattern.cols]
        assert kept.min() >= np.sort(np.abs(view).ravel())[-len(kept)]
        variable.assign(layer.to_dense())
    ids = _ids()
    np.testing.assert_allclose(sparse(ids), reference(ids), atol=1e-12)
    path = tmp_path / "block.keras"
    sparse.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(ids), sparse(ids))
    again = sl.sparsify(loaded, density=0.1)
    assert [kept for kept, _ in _kernels(again)[1]] == [round(0.1 * total) for _, total in counts]
    np.testing.assert_array_equal(sl.strip_pruning(sparse)(ids), sparse(ids))


@pytest.mark.parametrize("callback", ["rigl", "set"])
def test_rigl_and_set_evolve_every_layer_of_the_block(callback):
    sparse = sl.sparsify(_block(dtype="float32"), density=0.3)
    sparse.compile(optimizer="adam", loss="mse")
    before = {layer.path: layer.pattern for layer in sl.sparse_layers(sparse)}
    make = sl.callbacks.RigL if callback == "rigl" else sl.callbacks.SET
    evolve = make(update_freq=1, drop_fraction=0.3, end_step=3, seed=0)
    y = np.random.default_rng(1).normal(size=(8, SEQ, DIM)).astype("float32")
    sparse.fit(_ids(8), y, epochs=1, batch_size=4, verbose=0, callbacks=[evolve])
    after = {layer.path: layer.pattern for layer in sl.sparse_layers(sparse)}
    assert sorted({u["layer"] for u in evolve.updates}) == sorted(before)
    for path, pattern in after.items():
        assert pattern.nnz == before[path].nnz and pattern != before[path]


def test_rigl_grows_the_embedding_where_its_dense_gradient_is_largest():
    sparse = sl.sparsify(_block(dtype="float32"), density=0.3, layers=["embed"])
    sparse.compile(optimizer="sgd", loss="mse")
    rigl = sl.callbacks.RigL(update_freq=1, drop_fraction=0.2, end_step=10, seed=0)
    rigl.attach(sparse)
    ids, y = _ids(4), np.random.default_rng(1).normal(size=(4, SEQ, DIM)).astype("float32")
    embed = sparse.get_layer("embed")
    rigl._batch = (ids, y)
    prepared = rigl._prepare([embed])
    x, dy = prepared[id(embed)]
    # The dense gradient of the table, from the ids: row i sums the output gradients of the tokens equal to i.
    expected = np.zeros((VOCAB, DIM), np.float32)
    np.add.at(expected, ids.ravel(), dy.numpy())
    np.testing.assert_allclose(input_gradient_tile(x, dy), expected, atol=1e-5)


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_transformer_block_exports_exactly(tmp_path, fmt):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    model = sl.sparsify(_block(dtype="float32", ids_dtype="float32"), density=0.3)  # artifacts take float32 inputs
    ids = _ids(3).astype("float32")
    model(ids)
    path = os.path.join(tmp_path, "block" + {"litert": ".tflite", "onnx": ".onnx"}[fmt])
    model.export(path, format=fmt, verbose=False)
    assert sl.export.check_export(model, path, ids) <= 1e-5


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_integer_ids_reach_the_artifact_as_integers(tmp_path, fmt):
    # ExportedModel and check_export give the artifact its own input dtype:
    # int32 ids stay ids (a float32 cast fails in LiteRT and onnxruntime).
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    ids = keras.Input((4,), dtype="int32")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 6, name="embedding")(ids))
    model = sl.sparsify(keras.Model(ids, keras.layers.Dense(3)(h)), density=0.2, layers=["embedding"], seed=0)
    x = np.random.default_rng(0).integers(0, 50, size=(5, 4)).astype("int32")
    model(x)
    path = os.path.join(tmp_path, "ids" + {"litert": ".tflite", "onnx": ".onnx"}[fmt])
    model.export(path, format=fmt, verbose=False)
    artifact = sl.export.ExportedModel(path)
    assert artifact.input_dtype == np.int32
    embedding = model.get_layer("embedding")
    table = reference.dense_kernel(embedding.pattern, embedding.values.numpy())
    dense = model.layers[-1]
    expected = table[x].mean(axis=1) @ dense.kernel.numpy().astype(np.float64) + dense.bias.numpy()
    np.testing.assert_allclose(artifact(x), expected, rtol=1e-5, atol=1e-5)
    assert sl.export.check_export(model, path, x) <= 1e-5
