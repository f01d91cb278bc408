"""Sparse inputs stay sparse: SparseDense on tf.SparseTensor / scipy sparse data, against NumPy float64."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import scipy.sparse
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl
from tests import reference
from tests.strategies import random_patterns

# A pattern each kernel family accepts: block and banded need their structure.
KERNEL_PATTERNS = {
    "block": lambda: sl.patterns.block_diagonal([(4, 3), (5, 2), (3, 3)]),
    "banded": lambda: sl.patterns.banded((12, 8), lower=2, upper=1),
}


def _pattern_for(kernel):
    return KERNEL_PATTERNS.get(kernel, lambda: sl.patterns.random((12, 8), density=0.3, seed=3))()


def _sparse_batch(batch, dim, density, seed, dtype):
    x = scipy.sparse.random(batch, dim, density=density, random_state=seed, format="coo", dtype=np.float64)
    tensor = tf.sparse.reorder(
        tf.SparseTensor(np.stack([x.row, x.col], axis=1).astype(np.int64), x.data.astype(dtype), x.shape)
    )
    return x.toarray(), tensor


def _usable_kernels():
    names = []
    for name in sorted(sl.ops.KERNELS):
        try:
            sl.SparseDense(_pattern_for(name), kernel=name).build((None, 12))
        except (ValueError, RuntimeError, ImportError):
            continue  # e.g. the compiled kernel without a compiler here
        names.append(name)
    return names


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel", _usable_kernels())
def test_sparse_input_equals_the_dense_reference(kernel, dtype, traced):
    pattern = _pattern_for(kernel)
    layer = sl.SparseDense(pattern, kernel=kernel, dtype=dtype, bias_initializer="random_normal")
    dense_x, x = _sparse_batch(6, pattern.shape[0], 0.3, seed=7, dtype=dtype)
    upstream = np.random.default_rng(1).normal(size=(6, pattern.shape[1]))
    layer.build((None, pattern.shape[0]))

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x.values)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.constant(upstream, y.dtype))
        d_x, d_values = tape.gradient(loss, [x.values, layer.values])
        return y, tf.convert_to_tensor(d_x), tf.convert_to_tensor(d_values)

    y, d_x, d_values = (tf.function(run) if traced else run)(x)
    values, bias = layer.values.numpy(), layer.bias.numpy()
    want_dx, want_dvalues, _ = reference.gradients(dense_x, pattern, values, upstream)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    assert y.dtype == dtype
    np.testing.assert_allclose(y.numpy(), reference.forward(dense_x, pattern, values, bias), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(d_values.numpy(), want_dvalues, rtol=rtol, atol=rtol)
    rows, cols = x.indices.numpy().T
    np.testing.assert_allclose(d_x.numpy(), want_dx[rows, cols], rtol=rtol, atol=rtol)


@settings(max_examples=15, deadline=None)
@given(pattern=random_patterns(max_dim=20), batch=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_sparse_input_property(pattern, batch, seed):
    layer = sl.SparseDense(pattern, dtype="float64", use_bias=False)
    layer.build((None, pattern.shape[0]))
    dense_x, x = _sparse_batch(batch, pattern.shape[0], 0.4, seed, "float64")
    np.testing.assert_allclose(
        layer(x).numpy(), reference.forward(dense_x, pattern, layer.values.numpy()), rtol=1e-12, atol=1e-12
    )


def test_integer_sparse_inputs_run_in_the_compute_dtype():
    pattern = sl.patterns.random((10, 4), density=0.5, seed=0)
    layer = sl.SparseDense(pattern, use_bias=False)
    x = tf.SparseTensor([[0, 1], [1, 9]], tf.constant([2, 1], tf.int8), [2, 10])
    y = layer(x)
    assert y.dtype == tf.float32
    dense = np.zeros((2, 10)); dense[0, 1], dense[1, 9] = 2, 1  # noqa: E702
    np.testing.assert_allclose(y.numpy(), reference.forward(dense, pattern, layer.values.numpy()), rtol=1e-6)


def test_scipy_sparse_data_through_fit_and_predict_as_keras_does():
    pattern = sl.patterns.random((40, 6), fan_in=5, seed=2)
    x = scipy.sparse.random(32, 40, density=0.1, random_state=3, format="csr", dtype=np.float32)
    y = np.random.default_rng(0).normal(size=(32, 1)).astype("float32")
    inputs = keras.Input((40,), sparse=True)
    model = keras.Model(inputs, keras.layers.Dense(1)(sl.SparseDense(pattern, activation="relu")(inputs)))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    np.testing.assert_allclose(model.predict(x, verbose=0), model.predict(x.toarray(), verbose=0), rtol=1e-5, atol=1e-6)


def test_towers_take_sparse_inputs():
    towers = sl.Towers(3, hidden_units=(4,), output_units=2, dtype="float64")
    dense_x, x = _sparse_batch(5, 9, 0.3, seed=4, dtype="float64")
    np.testing.assert_allclose(towers(x).numpy(), towers(dense_x).numpy(), rtol=1e-12, atol=1e-12)


def test_a_sparse_input_must_be_two_dimensional():
    layer = sl.SparseDense(sl.patterns.random((4, 2), density=0.5, seed=0))
    layer.build((None, 4))
    x = tf.SparseTensor([[0, 0, 1]], [1.0], [1, 2, 4])
    with pytest.raises(ValueError, match="sparse input must be 2-D"):
        layer(x)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's sparselayers

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, scipy.sparse, keras
    import sparselayers as sl
    which, features, units, fan_in, batch, per_row = sys.argv[1], *map(int, sys.argv[2:])
    rng = np.random.default_rng(0)
    rows = 3 * batch
    x = scipy.sparse.csr_matrix(
        (np.ones(rows * per_row, "float32"),
         rng.integers(0, features, rows * per_row), np.arange(0, rows * per_row + 1, per_row)),
        shape=(rows, features))
    y = rng.normal(size=(rows, 1)).astype("float32")
    if which == "sparselayers":
        hidden = sl.SparseDense(sl.patterns.random((features, units), fan_in=fan_in, seed=0), activation="relu")
    else:
        hidden = keras.layers.Dense(units, activation="relu")
    inputs = keras.Input((features,), sparse=True)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden(inputs)))
    model.compile("adam", "mse")
    from tests import peak_memory
    before = peak_memory.start()  # the live size, not the peak of building the data
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    print(json.dumps({"grown_kib": peak_memory.growth_kib(before)}))
    """
)


def _peak_growth(which, *sizes):
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, which, *map(str, sizes)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["grown_kib"]


def test_fit_on_sparse_input_needs_no_more_memory_than_keras_dense():
    # The case: 200,000 features, 50 nonzeros per row, batch 2048, Adam.
    # Keras Dense holds a 200,000 x 64 kernel (and Adam's two copies);
    # SparseDense holds 128,000 entries, so densifying a batch (2048 x 200,000
    # floats, 1.6 GB) is what would make it lose.
    sizes = (200_000, 64, 2_000, 2_048, 50)
    ours = _peak_growth("sparselayers", *sizes)
    keras_dense = _peak_growth("keras", *sizes)
    assert ours <= keras_dense, (ours, keras_dense)


def _seven_input_layer():
    layer = sl.SparseDense(sl.patterns.random((7, 3), density=0.5, seed=0), dtype="float64")
    layer.build((None, 7))
    return layer


# (indices, dense_shape, what the message names): each index outside (batch, input_dim).
OUT_OF_RANGE = [
    ([[0, 1], [-1, 0]], [2, 7], r"inputs.indices\[1\] = \[-1, 0\]"),
    ([[2, 0]], [2, 7], r"inputs.indices\[0\] = \[2, 0\]"),
    ([[0, 7]], [2, 7], r"inputs.indices\[0\] = \[0, 7\]"),
    ([[1, 3], [0, -1]], [2, 7], r"inputs.indices\[1\] = \[0, -1\]"),
]


@pytest.mark.parametrize("indices, dense_shape, received", OUT_OF_RANGE)
def test_an_index_outside_the_input_names_the_input(indices, dense_shape, received):
    x = tf.SparseTensor(indices, [1.0] * len(indices), dense_shape)
    with pytest.raises(ValueError, match=r"`inputs` must be a SparseTensor whose indices lie in \[0, dense_shape\)"):
        _seven_input_layer()(x)
    with pytest.raises(ValueError, match=received + r" with dense_shape=\[2, 7\]"):
        _seven_input_layer()(x)


@pytest.mark.parametrize(
    "indices, dense_shape",
    [(indices, shape) for indices, shape, _ in OUT_OF_RANGE] + [([[0, 1]], [2, 5])],  # last: 5 columns for 7 inputs
)
def test_inside_tf_function_an_index_outside_the_input_fails_clearly(indices, dense_shape):
    layer = _seven_input_layer()
    traced = tf.function(layer, input_signature=[tf.SparseTensorSpec([None, None], tf.float64)])
    x = tf.SparseTensor(indices, tf.ones(len(indices), tf.float64), dense_shape)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`inputs` must be a SparseTensor whose indices lie in"):
        traced(x)
    good = tf.SparseTensor([[1, 6], [0, 0]], tf.constant([2.0, 3.0], tf.float64), [2, 7])
    dense = np.zeros((2, 7))
    dense[1, 6], dense[0, 0] = 2.0, 3.0
    want = reference.forward(dense, layer.pattern, layer.values.numpy(), layer.bias.numpy())
    np.testing.assert_allclose(traced(good).numpy(), want, rtol=1e-12)  # unordered indices are fine


def test_repeated_indices_add_up():
    layer = _seven_input_layer()
    indices = np.array([[0, 2], [1, 4], [0, 2], [0, 2], [1, 0]])
    values = np.array([1.5, -2.0, 0.25, 4.0, 3.0])
    x = tf.SparseTensor(indices, values, [2, 7])
    dense = np.zeros((2, 7))
    np.add.at(dense, tuple(indices.T), values)  # the rule scipy.sparse and tf.sparse.sparse_dense_matmul follow
    want = reference.forward(dense, layer.pattern, layer.values.numpy(), layer.bias.numpy())
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-12)
