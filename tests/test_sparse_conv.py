"""SparseConv1D / SparseConv2D against Keras' Conv1D / Conv2D and a float64 NumPy convolution."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from tests import reference

LAYERS = {1: (sl.SparseConv1D, keras.layers.Conv1D), 2: (sl.SparseConv2D, keras.layers.Conv2D)}


@st.composite
def conv_cases(draw):
    """Any convolution Keras accepts: sizes, strides or dilation, padding, batch 0-3, odd and tiny inputs."""
    rank = draw(st.sampled_from([1, 2]))
    kernel_size = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    if draw(st.booleans()):
        strides, dilation = tuple(draw(st.integers(1, 3)) for _ in range(rank)), (1,) * rank
    else:
        strides, dilation = (1,) * rank, tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = draw(st.sampled_from(["valid", "same", "causal"] if rank == 1 else ["valid", "same"]))
    reach = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilation)]
    spatial = tuple(draw(st.integers(r if padding == "valid" else 1, r + 6)) for r in reach)
    channels, filters = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    density = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    mask = np.random.default_rng(draw(st.integers(0, 2**16))).random((math.prod(kernel_size) * channels, filters))
    pattern = sl.SparsityPattern.from_dense(mask < density)
    batch = draw(st.integers(0, 3))
    return rank, dict(kernel_size=kernel_size, strides=strides, padding=padding, dilation_rate=dilation), pattern, (batch, *spatial, channels)


def _pair(rank, options, pattern, activation=None, **kwargs):
    """A float64 SparseConv and the Keras conv holding its scattered kernel."""
    sparse_class, keras_class = LAYERS[rank]
    layer = sparse_class(pattern, activation=activation, dtype="float64", **options, **kwargs)
    twin = keras_class(pattern.shape[1], activation=activation, dtype="float64", **options)
    return layer, twin


def _build(layer, twin, input_shape, seed=0):
    rng = np.random.default_rng(seed)
    layer.build(input_shape)
    layer.values.assign(rng.normal(size=layer.pattern.nnz))
    layer.bias.assign(rng.normal(size=layer.units))
    twin.build(input_shape)
    twin.kernel.assign(reference.dense_kernel(layer.pattern, layer.values.numpy()).reshape(layer.kernel_shape()))
    twin.bias.assign(layer.bias.numpy())


def _gradients(layer, variable, x, upstream):
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * upstream)
    return y.numpy(), tape.gradient(loss, x).numpy(), tape.gradient(loss, variable).numpy()


@given(conv_cases())
def test_outputs_and_gradients_equal_keras_in_float64(case):
    rank, options, pattern, input_shape = case
    layer, twin = _pair(rank, options, pattern)
    _build(layer, twin, input_shape)
    rng = np.random.default_rng(1)
    x = rng.normal(size=input_shape)
    expected = reference.conv(
        x, twin.kernel.numpy(), options["strides"], options["padding"], options["dilation_rate"], layer.bias.numpy()
    )
    upstream = rng.normal(size=expected.shape)
    y, dx, dvalues = _gradients(layer, layer.values, x, upstream)
    y_keras, dx_keras, dkernel = _gradients(twin, twin.kernel, x, upstream)
    assert y.shape == expected.shape == tuple(layer.compute_output_shape(input_shape))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, y_keras, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_keras, rtol=1e-12, atol=1e-12)
    view = dkernel.reshape(pattern.shape)
    np.testing.assert_allclose(dvalues, [view[i, j] for i, j in pattern.indices.tolist()], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", sorted(set(sl.ops.KERNELS) - {"banded", "block", "compiled_block"}))
@pytest.mark.parametrize("rank", [1, 2])
def test_every_kernel_computes_the_same_convolution(kernel, rank):
    options = dict(kernel_size=(3,) * rank, strides=(1,) * rank, padding="same", dilation_rate=(1,) * rank)
    pattern = sl.patterns.random((3**rank * 5, 6), density=0.3, seed=2)
    layer, twin = _pair(rank, options, pattern, activation="relu", kernel=kernel)
    input_shape = (2, *(7,) * rank, 5)
    _build(layer, twin, input_shape)
    x = np.random.default_rng(3).normal(size=input_shape)
    np.testing.assert_allclose(layer(x), twin(x), rtol=1e-12, atol=1e-12)
    assert layer.kernel_name == kernel


def test_a_pointwise_convolution_is_sparse_dense_on_the_channels():
    pattern = sl.patterns.random((8, 6), density=0.3, seed=0)
    conv = sl.SparseConv2D(pattern, 1)
    dense = sl.SparseDense(pattern)
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 8)).astype("float32")
    conv.build(x.shape)
    dense.build((None, 8))
    dense.set_weights(conv.get_weights())
    np.testing.assert_array_equal(conv(x), dense(x))
    assert conv.kernel_name == dense.kernel_name


def test_config_round_trip_and_keras_file(tmp_path):
    pattern = sl.patterns.random((2 * 3 * 3, 4), density=0.4, seed=0)
    model = keras.Sequential([
        keras.Input((6, 5, 3)),
        sl.SparseConv2D(pattern, (2, 3), strides=(1, 2), padding="same", activation="relu", name="conv"),
    ])
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype("float32")
    path = tmp_path / "conv.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded(x), model(x))
    layer = loaded.get_layer("conv")
    assert (layer.kernel_size, layer.strides, layer.padding) == ((2, 3), (1, 2), "same")
    assert layer.pattern == pattern


def test_to_dense_has_the_keras_kernel_layout():
    pattern = sl.patterns.random((3 * 2, 4), density=0.5, seed=1)
    layer = sl.SparseConv1D(pattern, 3, use_bias=False)
    layer.build((None, 9, 2))
    kernel = reference.dense_kernel(pattern, layer.values.numpy())
    np.testing.assert_array_equal(layer.to_dense(), kernel.reshape(3, 2, 4))
    assert layer.kernel_shape() == (3, 2, 4)


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(pattern=np.ones((10, 4)), kernel_size=3), r"rows.*Received: pattern with shape \(10, 4\)"),
        (dict(pattern=np.ones((9, 4)), kernel_size=2.5), r"Received: kernel_size=2.5"),
        (dict(pattern=np.ones((9, 4)), kernel_size=(3, 3)), r"Received: kernel_size=\(3, 3\)"),
        (dict(pattern=np.ones((9, 4)), kernel_size=0), r"Received: kernel_size=0"),
        (dict(pattern=np.ones((9, 4)), kernel_size=3, strides=2, dilation_rate=2), r"Received: strides"),
        (dict(pattern=np.ones((9, 4)), kernel_size=3, padding="full"), r"Received: padding='full'"),
        (dict(pattern=np.ones((9, 4)), kernel_size=3, data_format="channels_first"), r"Received: data_format='channels_first'"),
        (dict(pattern=np.ones((9, 4)), kernel_size=3, groups=3), r"Received: groups=3"),
        (dict(pattern=np.ones((9, 4)), kernel_size=3, strides="1"), r"Received: strides='1'"),
    ],
)
def test_bad_arguments_name_what_was_received(arguments, match):
    with pytest.raises(ValueError, match=match):
        sl.SparseConv1D(**arguments)


def test_causal_padding_is_one_dimensional_only():
    with pytest.raises(ValueError, match=r"Received: padding='causal'"):
        sl.SparseConv2D(np.ones((9, 4)), 3, padding="causal")


def test_input_channels_that_do_not_match_the_pattern_fail_at_build():
    layer = sl.SparseConv2D(np.ones((3 * 3 * 2, 4)), 3)
    with pytest.raises(ValueError, match=r"in_channels=2.*Received: input_shape=\(None, 8, 8, 3\)"):
        layer.build((None, 8, 8, 3))


@pytest.mark.parametrize(
    "rank, options",
    [
        (1, dict(kernel_size=3, padding="same", dilation_rate=2, depth_multiplier=2)),
        (1, dict(kernel_size=2, strides=2, padding="same")),
        (2, dict(kernel_size=(3, 2), padding="same", depth_multiplier=3)),
        (2, dict(kernel_size=3, strides=2, padding="valid")),
    ],
)
def test_separable_convolutions_equal_keras_with_a_sparse_pointwise_kernel(rank, options):
    sparse_class = {1: sl.SparseSeparableConv1D, 2: sl.SparseSeparableConv2D}[rank]
    keras_class = {1: keras.layers.SeparableConv1D, 2: keras.layers.SeparableConv2D}[rank]
    channels, filters, multiplier = 3, 5, options.get("depth_multiplier", 1)
    pattern = sl.patterns.random((channels * multiplier, filters), density=0.4, seed=0)
    layer = sparse_class(pattern, activation="relu", dtype="float64", **options)
    twin = keras_class(filters, activation="relu", dtype="float64", **options)
    input_shape = (2, *(9,) * rank, channels)
    rng = np.random.default_rng(0)
    layer.build(input_shape)
    twin.build(input_shape)
    layer.depthwise_kernel.assign(rng.normal(size=layer.depthwise_kernel.shape))
    layer.values.assign(rng.normal(size=pattern.nnz))
    layer.bias.assign(rng.normal(size=filters))
    twin.set_weights([layer.depthwise_kernel.numpy(), layer.to_dense(), layer.bias.numpy()])
    x = rng.normal(size=input_shape)
    upstream = rng.normal(size=twin(x).shape)
    y, dx, dvalues = _gradients(layer, layer.values, x, upstream)
    y_keras, dx_keras, dkernel = _gradients(twin, twin.pointwise_kernel, x, upstream)
    np.testing.assert_allclose(y, y_keras, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_keras, rtol=1e-12, atol=1e-12)
    view = dkernel.reshape(pattern.shape)
    np.testing.assert_allclose(dvalues, [view[i, j] for i, j in pattern.indices.tolist()], rtol=1e-12, atol=1e-12)
    assert layer.compute_output_shape(input_shape) == y.shape


def test_sparsify_converts_the_pointwise_kernel_of_separable_convolutions():
    model = keras.Sequential([
        keras.Input((10, 10, 3)),
        keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, padding="same", activation="relu", name="sep"),
        keras.layers.Reshape((100, 6)),
        keras.layers.SeparableConv1D(4, 3, name="sep1d"),
    ])
    x = np.random.default_rng(0).normal(size=(2, 10, 10, 3)).astype("float32")
    full = sl.sparsify(model, density=1.0)
    np.testing.assert_array_equal(full(x), model(x))
    pruned = sl.sparsify(model, density=0.5)
    layer = pruned.get_layer("sep")
    assert isinstance(layer, sl.SparseSeparableConv2D) and layer.pattern.nnz == round(0.5 * 6 * 6)
    np.testing.assert_array_equal(layer.depthwise_kernel.numpy(), model.get_layer("sep").depthwise_kernel.numpy())
    pointwise = model.get_layer("sep").pointwise_kernel.numpy().reshape(6, 6)
    kept = layer.pattern.to_dense() != 0
    assert np.abs(pointwise[kept]).min() >= np.abs(pointwise[~kept]).max()
