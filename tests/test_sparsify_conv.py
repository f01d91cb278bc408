"""The toolkit across convolutions: sparsify, ERK, strip_pruning, RigL and SET on CNNs, against float64 references."""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
from tests import reference

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 10, 3)).astype("float32")
Y = RNG.normal(size=(32, 2)).astype("float32")


def dense_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((10, 3)),
        keras.layers.Conv1D(6, 3, padding="same", activation="relu", name="c1"),
        keras.layers.Conv1D(4, 2, strides=2, name="c2"),
        keras.layers.Flatten(),
        keras.layers.Dense(2, name="head"),
    ])


def numpy_forward(kernels, biases, x):
    """The dense CNN in float64 with the given kernels (Keras layout)."""
    h = np.maximum(reference.conv(x, kernels["c1"], (1,), "same", (1,), biases["c1"]), 0.0)
    h = reference.conv(h, kernels["c2"], (2,), "valid", (1,), biases["c2"])
    return h.reshape(len(x), -1) @ kernels["head"] + biases["head"]


def test_density_one_is_exact_and_every_kernel_becomes_sparse():
    model = dense_cnn()
    sparse = sl.sparsify(model, density=1.0)
    assert [type(layer).__name__ for layer in sparse.layers] == ["SparseConv1D", "SparseConv1D", "Flatten", "SparseDense"]
    np.testing.assert_array_equal(sparse(X), model(X))
    conv = sparse.get_layer("c2")
    assert (conv.kernel_size, conv.strides, conv.padding) == ((2,), (2,), "valid")


def test_magnitude_pruning_keeps_the_largest_entries_of_each_flattened_kernel():
    model = dense_cnn()
    sparse = sl.sparsify(model, density=0.3)
    kernels, biases = {}, {}
    for name in ("c1", "c2", "head"):
        kernel = model.get_layer(name).kernel.numpy().astype(np.float64)
        flat = kernel.reshape(-1)
        k = round(0.3 * flat.size)
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        pruned = np.zeros_like(flat)
        pruned[keep] = flat[keep]
        kernels[name] = pruned.reshape(kernel.shape)
        biases[name] = model.get_layer(name).bias.numpy()
        np.testing.assert_array_equal(sparse.get_layer(name).to_dense(), kernels[name].astype(np.float32))
    np.testing.assert_allclose(sparse(X), numpy_forward(kernels, biases, X), rtol=1e-5, atol=1e-5)


def test_erk_uses_rigls_kernel_term_for_convolutions():
    model = dense_cnn()
    sparse = sl.sparsify(model, density=0.3, distribution="erk")
    shapes = [tuple(model.get_layer(n).kernel.shape) for n in ("c1", "c2", "head")]
    sizes = np.array([math.prod(s) for s in shapes], np.float64)
    raw = np.array([sum(s) / math.prod(s) for s in shapes])
    full = np.zeros(3, bool)
    while True:  # RigL's loop: the layer of the largest raw density becomes full
        scale = (0.3 * sizes.sum() - sizes[full].sum()) / (raw[~full] * sizes[~full]).sum()
        if (raw[~full] * scale).max() <= 1:
            break
        full |= ~full & (raw == raw[~full].max())
    expected = [round(float(d) * n) for d, n in zip(np.where(full, 1.0, raw * scale), sizes)]
    assert [sparse.get_layer(n).pattern.nnz for n in ("c1", "c2", "head")] == expected


def test_blocks_keep_whole_tiles_of_the_flattened_kernel():
    model = dense_cnn()
    sparse = sl.sparsify(model, density=0.5, block=(3, 2), layers=["c1"])
    mask = sparse.get_layer("c1").pattern.to_dense() != 0  # (9, 6): tiles of 3 x 2
    tiles = mask.reshape(3, 3, 3, 2).transpose(0, 2, 1, 3).reshape(9, 6)
    assert set(map(tuple, tiles)) <= {(True,) * 6, (False,) * 6}


def test_layers_left_dense_are_named_once_and_refused_by_name(caplog):
    model = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.DepthwiseConv2D(3, name="depthwise"),
        keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.Conv2DTranspose(2, 3, name="up"),
    ])
    with caplog.at_level(logging.WARNING, logger="sparselayers"):
        sparse = sl.sparsify(model, density=0.5)
    lines = [r.getMessage() for r in caplog.records if "leaves these layers dense" in r.getMessage()]
    assert len(lines) == 1 and "'depthwise' (DepthwiseConv2D)" in lines[0] and "'up' (Conv2DTranspose)" in lines[0]
    assert isinstance(sparse.get_layer("conv"), sl.SparseConv2D)
    with pytest.raises(ValueError, match=r"converts \(Conv1D, Conv2D, Dense.*'depthwise' \(DepthwiseConv2D\)"):
        sl.sparsify(model, density=0.5, layers=["depthwise"])


def test_channels_first_and_grouped_convolutions_are_refused_by_name():
    grouped = keras.Sequential([keras.Input((8, 4)), keras.layers.Conv1D(4, 3, groups=2, name="g")])
    with pytest.raises(ValueError, match=r"Conv1D 'g', which cannot become sparse: it has groups=2"):
        sl.sparsify(grouped, density=0.5)


def test_strip_pruning_drops_the_zeros_of_a_sparse_cnn_with_equal_outputs():
    sparse = sl.sparsify(dense_cnn(), density=1.0)
    layer = sparse.get_layer("c1")
    values = layer.values.numpy()
    values[::3] = 0.0
    layer.values.assign(values)
    stripped = sl.strip_pruning(sparse)
    assert stripped.get_layer("c1").pattern.nnz == np.count_nonzero(values)
    np.testing.assert_array_equal(stripped.get_layer("c1").to_dense(), layer.to_dense())
    np.testing.assert_array_equal(stripped(X), sparse(X))


class Snapshot(keras.callbacks.Callback):
    """Pattern, values and bias of every sparse layer at the end of every batch."""

    def __init__(self):
        super().__init__()
        self.records = []

    def on_train_batch_end(self, batch, logs=None):
        self.records.append({
            layer.name: (layer.pattern, layer.values.numpy().copy(), layer.bias.numpy().copy())
            for layer in sl.sparse_layers(self.model)
        })


def keras_kernel_gradients(record, x, y):
    """float64 dL/dkernel (mse) of the dense CNN holding the snapshot's kernels, each as its 2-D view."""
    model = dense_cnn()
    twin = keras.Sequential([keras.Input((10, 3))] + [
        type(layer).from_config({**layer.get_config(), "dtype": "float64"}) for layer in model.layers
    ])
    for name, (pattern, values, bias) in record.items():
        layer = twin.get_layer(name)
        layer.kernel.assign(reference.dense_kernel(pattern, values).reshape(layer.kernel.shape))
        layer.bias.assign(bias)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((twin(x.astype(np.float64)) - y.astype(np.float64)) ** 2)
    kernels = [twin.get_layer(name).kernel for name in record]
    return {name: g.numpy().reshape(-1, g.shape[-1]) for name, g in zip(record, tape.gradient(loss, kernels))}


def test_rigl_grows_the_top_dense_gradients_of_convolution_kernels():
    model = sl.sparsify(dense_cnn(), density=0.4)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = Snapshot()
    rigl = sl.callbacks.RigL(update_freq=2, drop_fraction=0.5, end_step=3, seed=0)
    model.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[before, rigl])
    old = before.records[1]
    new = {layer.name: layer.pattern for layer in sl.sparse_layers(model)}
    gradients = keras_kernel_gradients(old, X[16:], Y[16:])
    for name, (pattern, values, _) in old.items():
        n = round(0.5 * (1 + math.cos(math.pi * 2 / 3)) / 2 * pattern.nnz)
        kept = np.sort(pattern.linear[np.lexsort((np.arange(pattern.nnz), np.abs(values)))[n:]])
        assert new[name].nnz == pattern.nnz and np.isin(kept, new[name].linear).all()
        grown = np.setdiff1d(new[name].linear, kept)
        scores = np.abs(gradients[name]).ravel()
        scores[kept] = -1.0
        np.testing.assert_allclose(np.sort(scores[grown]), np.sort(scores)[-n:], rtol=1e-4)


def test_set_with_constant_fan_in_keeps_every_filters_fan_in():
    model = sl.sparsify(dense_cnn(), density=0.4, layers=["c1", "c2"])
    fan_in = [np.bincount(layer.pattern.indices[:, 1], minlength=layer.units) for layer in sl.sparse_layers(model)]
    model.compile(optimizer="sgd", loss="mse")
    callback = sl.callbacks.SET(update_freq=1, drop_fraction=0.3, end_step=2, seed=0, constant_fan_in=True)
    patterns = [layer.pattern for layer in sl.sparse_layers(model)]
    model.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    for layer, counts, pattern in zip(sl.sparse_layers(model), fan_in, patterns):
        np.testing.assert_array_equal(np.bincount(layer.pattern.indices[:, 1], minlength=layer.units), counts)
        assert layer.pattern != pattern
    kernels = {layer.name: layer.to_dense().astype(np.float64) for layer in sl.sparse_layers(model)}
    kernels["head"] = model.get_layer("head").kernel.numpy().astype(np.float64)
    biases = {name: model.get_layer(name).bias.numpy() for name in ("c1", "c2", "head")}
    np.testing.assert_allclose(model(X), numpy_forward(kernels, biases, X), rtol=1e-5, atol=1e-5)


def test_gradual_pruning_prunes_convolutions_on_its_schedule_and_strip_compacts_them():
    model = sl.sparsify(dense_cnn(), density=1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    pruning = sl.callbacks.GradualPruning(0.25, begin_step=0, end_step=4, frequency=2)
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[pruning])
    assert sum(isinstance(layer, sl.SparseConv1D) for layer in sl.sparse_layers(model)) == 2
    assert [u["step"] for u in pruning.updates] == [0, 2, 4]
    for update in pruning.updates:  # Zhu & Gupta's cubic schedule from the full start
        density = 0.25 + 0.75 * (1 - update["step"] / 4) ** 3
        for layer in sl.sparse_layers(model):
            assert update["layers"][layer.path] == round(density * math.prod(layer.kernel_shape()))
    for layer in sl.sparse_layers(model):
        assert np.count_nonzero(layer.values.numpy()) == round(0.25 * math.prod(layer.kernel_shape()))
    stripped = sl.strip_pruning(model)
    kernels = {layer.name: layer.to_dense().astype(np.float64) for layer in sl.sparse_layers(stripped)}
    biases = {layer.name: layer.bias.numpy() for layer in sl.sparse_layers(stripped)}
    for name in ("c1", "c2", "head"):
        assert stripped.get_layer(name).pattern.nnz == round(0.25 * kernels[name].size)
        np.testing.assert_array_equal(kernels[name], model.get_layer(name).to_dense())
    np.testing.assert_allclose(stripped(X), model(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stripped(X), numpy_forward(kernels, biases, X), rtol=1e-5, atol=1e-5)
