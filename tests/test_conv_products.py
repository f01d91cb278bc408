"""The convolution products (sparselayers/ops/conv.py): the compiled direct convolution and its patches twin.

Every case runs a ``SparseConv`` with ``kernel="auto"`` (which takes the
direct convolution below ``DIRECT_MAX_DENSITY``) against the float64 NumPy
convolution of ``tests/reference.py`` and Keras' own convolution on the
scattered kernel: outputs, input gradients, values gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
from sparselayers.callbacks.dynamic import _recording
from sparselayers.ops import conv as conv_products
from sparselayers.ops.compiled import build
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {1: (sl.SparseConv1D, keras.layers.Conv1D), 2: (sl.SparseConv2D, keras.layers.Conv2D)}


def _layers(rank, kernel_size, padding, dilation, channels, filters, dtype, density=0.2, seed=0):
    """A SparseConv (kernel="auto") and the Keras conv holding its scattered kernel, built for ``dtype``."""
    sparse_class, keras_class = LAYERS[rank]
    mask = np.random.default_rng(seed).random((int(np.prod(kernel_size)) * channels, filters)) < density
    pattern = sl.SparsityPattern.from_dense(mask)
    options = dict(kernel_size=kernel_size, padding=padding, dilation_rate=dilation, dtype=dtype)
    layer, twin = sparse_class(pattern, **options), keras_class(filters, **options)
    return layer, twin


def _assign(layer, twin, input_shape, seed=1):
    rng = np.random.default_rng(seed)
    layer.build(input_shape)
    twin.build(input_shape)
    layer.values.assign(rng.normal(size=layer.pattern.nnz))
    layer.bias.assign(rng.normal(size=layer.units))
    twin.kernel.assign(reference.dense_kernel(layer.pattern, layer.values.numpy()).reshape(layer.kernel_shape()))
    twin.bias.assign(layer.bias.numpy())


def _run(layer, variable, x, upstream, bias=False):
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.cast(upstream, y.dtype))
    out = y.numpy(), tape.gradient(loss, x).numpy(), tape.gradient(loss, variable).numpy()
    return (*out, tape.gradient(loss, layer.bias).numpy()) if bias else out


CASES = {
    "3x3 same": (2, (3, 3), "same", (1, 1), (2, 7, 6, 5)),
    "2x3 valid dilated": (2, (2, 3), "valid", (2, 1), (1, 8, 9, 3)),
    "3x3 same, many tiles and an edge": (2, (3, 3), "same", (1, 1), (3, 21, 19, 4)),
    "5 valid 1-D": (1, (5,), "valid", (1,), (3, 11, 4)),
    "3 causal dilated 1-D": (1, (3,), "causal", (2,), (2, 9, 3)),
    "3 same 1-D, long": (1, (3,), "same", (1,), (2, 700, 2)),
    "batch 1, one output": (2, (3, 3), "valid", (1, 1), (1, 3, 3, 2)),
    "batch 0": (2, (3, 3), "same", (1, 1), (0, 5, 5, 2)),
}


@pytest.fixture(params=["rule", "3 blocks"])
def blocks(request, monkeypatch):
    """The ops' source blocks as the rule picks them (one for these small layers), or three."""
    conv_products._direct_conv.cache_clear()
    if request.param == "3 blocks":
        monkeypatch.setattr(conv_products, "source_blocks", lambda source_rows, *_: min(3, source_rows))
    yield request.param
    conv_products._direct_conv.cache_clear()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-4)])
def test_the_direct_convolution_equals_the_reference(built, case, dtype, tol, blocks):
    rank, kernel_size, padding, dilation, input_shape = CASES[case]
    layer, twin = _layers(rank, kernel_size, padding, dilation, input_shape[-1], 6, dtype)
    _assign(layer, twin, input_shape)
    rng = np.random.default_rng(2)
    x = rng.normal(size=input_shape)
    expected = reference.conv(x, twin.kernel.numpy().astype(np.float64), (1,) * rank, padding, dilation,
                              layer.bias.numpy().astype(np.float64))
    upstream = rng.normal(size=expected.shape)
    y, dx, dvalues, dbias = _run(layer, layer.values, x.astype(dtype), upstream, bias=True)
    assert layer.kernel_name == "compiled_conv"
    scale = 1 + np.abs(expected).max(initial=0)
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * scale)
    # The op adds the bias and sums its gradient: upstream summed over every position.
    np.testing.assert_allclose(dbias, upstream.reshape(-1, upstream.shape[-1]).sum(0), rtol=tol,
                               atol=tol * max(1, upstream.size))
    if not x.shape[0]:  # Keras' float32 Conv2D fails on an empty batch: no gradient flows
        assert dx.shape == x.shape and not dvalues.any()
        return
    _, dx_keras, dkernel = _run(twin, twin.kernel, x.astype(dtype), upstream)
    np.testing.assert_allclose(dx, dx_keras, rtol=tol, atol=tol * scale)
    view = dkernel.reshape(layer.pattern.shape)
    rows, cols = layer.pattern.indices.T
    np.testing.assert_allclose(dvalues, view[rows, cols], rtol=tol, atol=tol * scale * max(1, x.shape[0]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_floats_are_computed_in_float32(built, dtype):
    layer, twin = _layers(2, (3, 3), "same", (1, 1), 3, 4, "float32")
    _assign(layer, twin, (2, 6, 5, 3))
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 3))
    y = conv_products.direct_conv(layer.pattern, layer._geometry(), tf.constant(x, dtype), auto=True)(
        tf.constant(x, dtype), tf.cast(layer.values, dtype))
    assert y.dtype == dtype
    np.testing.assert_allclose(tf.cast(y, tf.float32) + layer.bias, twin(x.astype("float32")), rtol=0.05, atol=0.05)


def test_second_order_gradients_equal_keras(built, blocks):
    # A gradient penalty: h = sum(u * d/dx sum(conv(x)**2)), differentiated
    # w.r.t. the weights and the input, against Keras' conv in float64.
    layer, twin = _layers(2, (3, 3), "same", (1, 1), 3, 4, "float64")
    _assign(layer, twin, (2, 5, 6, 3))
    rng = np.random.default_rng(4)
    x, u = (tf.constant(rng.normal(size=(2, 5, 6, 3))) for _ in range(2))

    def second(model, variable):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                f = tf.reduce_sum(model(x) ** 2)
            h = tf.reduce_sum(u * inner.gradient(f, x))
        return outer.gradient(h, x).numpy(), outer.gradient(h, variable).numpy(), outer.gradient(h, model.bias).numpy()

    dx, dvalues, dbias = second(layer, layer.values)
    assert layer.kernel_name == "compiled_conv"
    dx_keras, dkernel, dbias_keras = second(twin, twin.kernel)
    np.testing.assert_allclose(dx, dx_keras, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dbias, dbias_keras, rtol=1e-10, atol=1e-10)
    rows, cols = layer.pattern.indices.T
    np.testing.assert_allclose(dvalues, dkernel.reshape(layer.pattern.shape)[rows, cols], rtol=1e-10, atol=1e-10)


def test_where_the_patches_compute_instead(built):
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    cases = {
        "a forced kernel": dict(kernel="compiled_csr"),
        "strides": dict(strides=2),
        "a pattern past the density threshold": dict(pattern=sl.patterns.random((27, 4), density=0.5, seed=0)),
    }
    for label, options in cases.items():
        pattern = options.pop("pattern", sl.patterns.random((27, 4), density=0.1, seed=0))
        layer = sl.SparseConv2D(pattern, 3, padding="same", **options)
        y = layer(x)
        assert layer.kernel_name != "compiled_conv", label
        expected = reference.conv(x.astype(np.float64), layer.to_dense(), layer.strides, "same", (1, 1), layer.bias.numpy())
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4, err_msg=label)
    # XLA compiles the twin: the same numbers, and never the compiled op.
    layer = sl.SparseConv2D(sl.patterns.random((27, 4), density=0.1, seed=0), 3, padding="same")
    eager = layer(x).numpy()
    assert layer.kernel_name == "compiled_conv"
    jitted = tf.function(layer, jit_compile=True)
    np.testing.assert_allclose(jitted(x), eager, rtol=1e-5, atol=1e-5)
    graph = jitted.get_concrete_function(tf.TensorSpec(x.shape)).graph
    assert not any(op.type.startswith("Sparselayers") for op in graph.get_operations())


def test_saved_models_hold_the_twin(built, tmp_path):
    inputs = keras.Input((6, 6, 3))
    conv = sl.SparseConv2D(sl.patterns.random((27, 4), density=0.1, seed=0), 3, padding="same")
    model = keras.Model(inputs, conv(inputs))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    expected = model(x).numpy()
    assert conv.kernel_name == "compiled_conv"
    model.export(str(tmp_path / "export"), verbose=False)
    assert b"Sparselayers" not in (tmp_path / "export" / "saved_model.pb").read_bytes()
    served = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(served.serve(x), expected, rtol=1e-5, atol=1e-5)


def test_rigl_recording_sees_the_patches_and_their_gradient(built):
    # RigL's probe wraps _select_kernel: the layer then multiplies patches,
    # and patches.T @ dy is the dense gradient of the kernel's 2-D view.
    layer, twin = _layers(2, (3, 3), "same", (1, 1), 3, 4, "float64")
    _assign(layer, twin, (2, 5, 6, 3))
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, 6, 3)))
    with tf.GradientTape() as tape:
        with _recording([layer], tape) as calls:
            loss = tf.reduce_sum(layer(x) ** 2)
    (patches, y), = calls[id(layer)]
    assert patches.shape == (2 * 5 * 6, 27)
    dense_gradient = tf.matmul(patches, tape.gradient(loss, y), transpose_a=True).numpy()
    with tf.GradientTape() as tape:
        keras_loss = tf.reduce_sum(twin(x) ** 2)
    np.testing.assert_allclose(dense_gradient, tape.gradient(keras_loss, twin.kernel).numpy().reshape(27, 4),
                               rtol=1e-10, atol=1e-10)
    layer(x)
    assert layer.kernel_name == "compiled_conv"  # outside the probe: the direct convolution again


def test_the_ops_check_their_tables(built):
    ops = build.library()
    layer, _ = _layers(2, (3, 3), "same", (1, 1), 3, 4, "float32")
    layer.build((1, 5, 5, 3))
    direct = conv_products.direct_conv(layer.pattern, layer._geometry(), tf.zeros((1, 5, 5, 3)), auto=True)
    pointers, channel, shift, order = direct._pattern_tensors()[:4]
    x, values = tf.zeros((1, 5, 5, 3)), tf.zeros(layer.pattern.nnz)
    bad = {
        "index out of range": (pointers, channel + 3, shift, order),
        "shift out of range": (pointers, channel, shift + direct.reach + 1, order),
        "order out of range": (pointers, channel, shift, order + layer.pattern.nnz),
        "pointers must run": (pointers + 1, channel, shift, order),
    }
    for message, (p, c, s, o) in bad.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            ops.sparselayers_conv_forward(x, values, p, c, s, o, tf.zeros([0]), geometry=direct.attr)
    with pytest.raises(tf.errors.InvalidArgumentError, match="spatial shape"):
        ops.sparselayers_conv_forward(tf.zeros((1, 4, 5, 3)), values, pointers, channel, shift, order, tf.zeros([0]),
                                     geometry=direct.attr)
    with pytest.raises(tf.errors.InvalidArgumentError, match="bias must be empty or have one entry per filter"):
        ops.sparselayers_conv_forward(x, values, pointers, channel, shift, order, tf.zeros([3]), geometry=direct.attr)


def test_switched_off_a_convolution_computes_with_the_patches(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, sparselayers as sl
        from tests import reference
        layer = sl.SparseConv2D(sl.patterns.random((27, 4), density=0.1, seed=0), 3, padding="same", dtype="float64")
        x = np.random.default_rng(0).normal(size=(2, 6, 6, 3))
        y = layer(x).numpy()
        assert layer.kernel_name == sl.ops.choose_kernel(layer.pattern), layer.kernel_name
        expected = reference.conv(x, layer.to_dense(), (1, 1), "same", (1, 1), layer.bias.numpy())
        assert np.allclose(y, expected, atol=1e-12), "wrong convolution"
        print("fallback ok")
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", build.ENABLED_ENV: "0", "SPARSELAYERS_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fallback ok" in done.stdout
