"""SparseEinsumDense and SparseMultiHeadAttention against Keras' EinsumDense/MultiHeadAttention and NumPy's einsum (float64)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.sparse_einsum import kernel_axes

#: (equation, output_shape given the sizes, bias_axes, input shape): the forms Keras takes, transposed kernels too.
EQUATIONS = [
    ("ab,bc->ac", lambda n: (n["c"],), "c", ("a", "b")),
    ("ab,cb->ac", lambda n: (n["c"],), "c", ("a", "b")),
    ("abc,cde->abde", lambda n: (None, n["d"], n["e"]), "de", ("a", "b", "c")),
    ("abc,cde->abde", lambda n: (None, n["d"], n["e"]), "e", ("a", "b", "c")),
    ("abcd,cde->abe", lambda n: (None, n["e"]), "e", ("a", "b", "c", "d")),
    ("abc,dc->adb", lambda n: (n["d"], None), None, ("a", "b", "c")),
    ("abc,ecd->abde", lambda n: (None, n["d"], n["e"]), "ed", ("a", "b", "c")),
    ("...b,bc->...c", lambda n: (n["c"],), "c", ("a", "x", "b")),
    ("ab...,bc->ac...", lambda n: (n["c"], None), "c", ("a", "b", "x")),
]


def _pair(equation, output_shape, bias_axes, input_shape, density, seed):
    """A float64 SparseEinsumDense with random values and bias, and the EinsumDense holding its scattered kernel."""
    rng = np.random.default_rng(seed)
    twin = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes, activation="tanh", dtype="float64")
    twin.build(input_shape)
    view = sl.SparseEinsumDense.dense_kernel_view(twin.kernel.numpy(), twin)
    pattern = sl.SparsityPattern.from_dense(rng.random(view.shape) < density)
    layer = sl.SparseEinsumDense(pattern, equation, output_shape, bias_axes=bias_axes, activation="tanh", dtype="float64")
    layer.build(input_shape)
    layer.values.assign(rng.normal(size=pattern.nnz))
    twin.kernel.assign(layer.to_dense())
    if bias_axes is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape))
        twin.bias.assign(layer.bias.numpy())
    return layer, twin


@st.composite
def einsum_cases(draw):
    equation, output_shape, bias_axes, axes = draw(st.sampled_from(EQUATIONS))
    sizes = {axis: draw(st.integers(1, 4)) for axis in "bcdex"}
    sizes["a"] = draw(st.integers(0, 3))  # the batch, empty too
    return equation, output_shape(sizes), bias_axes, tuple(sizes[axis] for axis in axes), draw(
        st.sampled_from([0.0, 0.3, 1.0])
    ), draw(st.integers(0, 2**16))


@settings(max_examples=12)
@given(einsum_cases())
def test_einsum_equals_keras_and_numpy_in_outputs_and_gradients(case):
    equation, output_shape, bias_axes, input_shape, density, seed = case
    layer, twin = _pair(equation, output_shape, bias_axes, input_shape, density, seed)
    rng = np.random.default_rng(seed + 1)
    x = tf.constant(rng.normal(size=input_shape))
    kernel = layer.to_dense()
    bias = 0.0 if bias_axes is None else layer.bias.numpy()
    reference = np.tanh(np.einsum(equation, x.numpy(), kernel) + bias)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y, y_keras = layer(x), twin(x)
        upstream = tf.constant(rng.normal(size=y.shape))
        loss, loss_keras = tf.reduce_sum(y * upstream), tf.reduce_sum(y_keras * upstream)
    np.testing.assert_allclose(y, reference, atol=1e-12)
    np.testing.assert_allclose(y, y_keras, atol=1e-12)
    np.testing.assert_allclose(tape.gradient(loss, x), tape.gradient(loss_keras, x), atol=1e-12)
    dense_gradient = sl.SparseEinsumDense.dense_kernel_view(tape.gradient(loss_keras, twin.kernel).numpy(), twin)
    values_gradient = tf.convert_to_tensor(tape.gradient(loss, layer.values)).numpy()
    np.testing.assert_allclose(values_gradient, dense_gradient[layer.pattern.rows, layer.pattern.cols], atol=1e-12)
    if bias_axes is not None:
        np.testing.assert_allclose(tape.gradient(loss, layer.bias), tape.gradient(loss_keras, twin.bias), atol=1e-12)


def test_view_groups_contracted_axes_against_output_axes_in_kernel_order():
    kernel = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # "abc,ecd->abde": c contracted, e and d out
    twin = keras.layers.EinsumDense("abc,ecd->abde", (None, 4, 2))
    np.testing.assert_array_equal(sl.SparseEinsumDense.dense_kernel_view(kernel, twin), kernel.transpose(1, 0, 2).reshape(3, 8))
    assert kernel_axes("abc,ecd->abde") == ([1], [0, 2])


def test_config_round_trip_and_keras_file(tmp_path):
    layer, _ = _pair("abc,cde->abde", (None, 2, 3), "de", (2, 4, 5), 0.4, 0)
    inputs = keras.Input((4, 5), dtype="float64")
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "einsum.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    np.testing.assert_array_equal(loaded(x), model(x))
    assert loaded.layers[1].pattern == layer.pattern


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("ab,bc", (3,)), r"`equation` must read .* Received: equation='ab,bc'"),
        (("abc,bcd->abd", (3, 3)), r"kernel axis in the output that the input also has \('b'"),
        (("abc,cd->ad", (3,)), r"must not sum an input axis away \('b'"),
        (("ab,bc->ac", (3,), None, "a"), r"`bias_axes` must be None or output axes of the kernel \('c'.*Received: bias_axes='a'"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        sl.SparseEinsumDense(sl.patterns.dense((4, 3)), *arguments)


def test_pattern_of_the_wrong_view_is_named_at_build():
    layer = sl.SparseEinsumDense(sl.patterns.dense((4, 3)), "abc,cde->abde", (None, 2, 3))
    with pytest.raises(ValueError, match=r"2-D view, \(contracted 4, output 6\).*Received: pattern with shape \(4, 3\)"):
        layer.build((1, 2, 4))
    with pytest.raises(TypeError, match="numeric inputs. Received: inputs of dtype string"):
        sl.SparseEinsumDense(sl.patterns.dense((4, 3)), "ab,bc->ac", (3,))(tf.constant([["a"] * 4]))


# MultiHeadAttention ---------------------------------------------------------------


def _attention_pair(patterns, **options):
    """A float64 SparseMultiHeadAttention with random weights, and Keras' MultiHeadAttention holding its kernels."""
    sparse = sl.SparseMultiHeadAttention(2, 3, patterns=patterns, dtype="float64", **options)
    dense = keras.layers.MultiHeadAttention(2, 3, dtype="float64", **options)
    query, value = np.zeros((1, 5, 4)), np.zeros((1, 7, 6))
    sparse(query, value), dense(query, value)
    rng = np.random.default_rng(0)
    for variable in sparse.weights:
        variable.assign(rng.normal(size=variable.shape))
    for key, layer in sparse.kernel_sublayers(sparse).items():
        twin = sparse.kernel_sublayers(dense)[key]
        twin.kernel.assign(layer.to_dense() if isinstance(layer, sl.SparseKernelLayer) else layer.kernel.numpy())
        if twin.bias is not None:
            twin.bias.assign(layer.bias.numpy())
    return sparse, dense


@pytest.mark.parametrize("options", [{}, {"use_bias": False, "use_gate": True, "output_shape": 3}])
def test_attention_equals_keras_in_outputs_and_gradients(options):
    patterns = {
        "query": sl.patterns.random((4, 6), density=0.5, seed=1),
        "value": sl.patterns.random((6, 6), density=0.5, seed=2),
        "output": sl.patterns.random((6, options.get("output_shape", 4)), density=0.5, seed=3),
    }  # key stays dense
    if options.get("use_gate"):
        patterns["gate"] = sl.patterns.random((4, 6), density=0.5, seed=4)
    sparse, dense = _attention_pair(patterns, **options)
    assert sorted(layer.name for layer in sl.sparse_layers(sparse)) == sorted(
        {"query": "query", "value": "value", "output": "attention_output", "gate": "gate"}[k] for k in patterns
    )
    rng = np.random.default_rng(1)
    query, value = tf.constant(rng.normal(size=(2, 5, 4))), tf.constant(rng.normal(size=(2, 7, 6)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([query, value])
        y, y_keras = sparse(query, value), dense(query, value)
        upstream = tf.constant(rng.normal(size=y.shape))
        loss, loss_keras = tf.reduce_sum(y * upstream), tf.reduce_sum(y_keras * upstream)
    np.testing.assert_allclose(y, y_keras, atol=1e-12)
    for a, b in zip(tape.gradient(loss, [query, value]), tape.gradient(loss_keras, [query, value])):
        np.testing.assert_allclose(a, b, atol=1e-12)
    for key, layer in sparse.kernel_sublayers(sparse).items():
        if isinstance(layer, sl.SparseKernelLayer):
            twin = sparse.kernel_sublayers(dense)[key]
            view = sl.SparseEinsumDense.dense_kernel_view(tape.gradient(loss_keras, twin.kernel).numpy(), twin)
            got = tf.convert_to_tensor(tape.gradient(loss, layer.values)).numpy()
            np.testing.assert_allclose(got, view[layer.pattern.rows, layer.pattern.cols], atol=1e-12)


def test_attention_names_a_bad_projection_key():
    with pytest.raises(ValueError, match=r"projections among .* Received: patterns with keys \['keys'\]"):
        sl.SparseMultiHeadAttention(2, 3, patterns={"keys": sl.patterns.dense((4, 6))})
