import os

import keras
import numpy as np
import pytest
import scipy.sparse
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from tests import reference
from tests.strategies import any_patterns, inputs_for


def built_layer(pattern, **kwargs):
    layer = sl.SparseDense(pattern, bias_initializer="random_normal", **kwargs)
    layer.build((None, pattern.shape[0]))
    return layer


@given(pattern=any_patterns, batch=st.integers(1, 4))
def test_forward_and_gradients_match_dense_reference(pattern, batch):
    layer = built_layer(pattern)
    x = tf.constant(inputs_for(pattern, batch))
    upstream = np.random.default_rng(5).normal(size=(batch, pattern.shape[1]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * upstream.astype("float32"))
    d_x, d_values, d_bias = tape.gradient(loss, [x, layer.values, layer.bias])
    values, bias = layer.values.numpy(), layer.bias.numpy()
    np.testing.assert_allclose(y.numpy(), reference.forward(x.numpy(), pattern, values, bias), rtol=1e-4, atol=1e-4)
    ref_dx, ref_dv, ref_db = reference.gradients(x.numpy(), pattern, values, upstream)
    np.testing.assert_allclose(d_x.numpy(), ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tf.convert_to_tensor(d_values).numpy(), ref_dv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_bias.numpy(), ref_db, rtol=1e-4, atol=1e-4)
    assert layer.trainable_weights == [layer.values, layer.bias]


@pytest.mark.parametrize("kernel", sorted(sl.ops.KERNELS))
def test_every_forced_kernel_gives_the_same_layer_output(kernel):
    pattern = sl.patterns.banded((24, 18), lower=2, upper=4)
    layer = built_layer(pattern, kernel=kernel, activation="tanh")
    x = inputs_for(pattern, 5)
    expected = np.tanh(reference.forward(x, pattern, layer.values.numpy(), layer.bias.numpy()))
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    # A compiled kernel whose ops do not take this band (compiled_block) names the twin that computed.
    ran = sl.ops.get_kernel(kernel, pattern).resolved().name
    assert layer.kernel_name == ran
    assert ran == kernel or ran == sl.ops.compiled.pure_tf_kernel(kernel, pattern)


def test_inputs_of_higher_rank():
    pattern = sl.patterns.random((6, 5), density=0.5, seed=0)
    layer = built_layer(pattern)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 6)).astype("float32")
    y = layer(x)
    assert y.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(y.numpy(), reference.forward(x, pattern, layer.values.numpy(), layer.bias.numpy()),
                               rtol=1e-4, atol=1e-5)
    assert layer.compute_output_shape((None, 3, 4, 6)) == (None, 3, 4, 5)


def test_empty_pattern_outputs_the_bias():
    pattern = sl.SparsityPattern.from_coo([], [], (4, 3))
    layer = built_layer(pattern)
    y = layer(np.ones((2, 4), "float32"))
    np.testing.assert_allclose(y.numpy(), np.tile(layer.bias.numpy(), (2, 1)))
    assert layer.count_params() == 3


def test_pattern_may_be_scipy_or_mask():
    mask = np.array([[1, 0], [1, 1], [0, 1]])
    assert sl.SparseDense(mask).pattern == sl.SparseDense(scipy.sparse.csc_matrix(mask)).pattern
    assert sl.SparseDense(mask).pattern == sl.SparsityPattern.from_dense(mask)


def test_from_scipy_takes_pattern_and_values():
    m = scipy.sparse.random_array((30, 20), density=0.2, random_state=0, format="csc")
    layer = sl.SparseDense.from_scipy(m, use_bias=False)
    np.testing.assert_allclose(layer.to_dense(), m.toarray(), rtol=1e-6)
    x = inputs_for(layer.pattern)
    np.testing.assert_allclose(layer(x).numpy(), x @ m.toarray(), rtol=1e-4, atol=1e-5)
    assert abs(layer.to_scipy() - m).max() < 1e-6


def test_default_initializer_matches_dense_output_scale():
    x = np.random.default_rng(0).normal(size=(512, 1000)).astype("float32")
    sparse = sl.SparseDense(sl.patterns.random((1000, 1000), density=0.01, seed=0))
    dense = keras.layers.Dense(1000)
    ratio = float(np.std(sparse(x)) / np.std(dense(x)))
    assert 0.8 < ratio < 1.25, ratio
    # Keras' own initializer on the 1-D values would shrink the output ~10x.
    naive = sl.SparseDense(sl.patterns.random((1000, 1000), density=0.01, seed=0),
                           values_initializer="glorot_uniform")
    assert float(np.std(naive(x)) / np.std(dense(x))) < 0.2


def test_initializer_variance_uses_each_entrys_fans():
    p = sl.patterns.block_diagonal([(50, 10), (10, 50)])
    values = sl.initializers.SparseVarianceScaling(mode="fan_in", distribution="untruncated_normal", seed=0)(
        (p.nnz,), pattern=p).numpy()
    first = values[(p.rows < 50)]  # fan_in 50
    second = values[(p.rows >= 50)]  # fan_in 10
    assert abs(np.var(first) - 1 / 50) < 0.2 / 50
    assert abs(np.var(second) - 1 / 10) < 0.2 / 10


@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
def test_initializer_variances_match_dense_fans(mode):
    p = sl.patterns.random((30, 20), density=0.2, seed=3)
    dense = p.to_dense().astype(np.float64)
    fan_in = dense.sum(axis=0)[p.cols]  # inputs of each entry's output
    fan_out = dense.sum(axis=1)[p.rows]  # outputs of each entry's input
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    variances = sl.initializers.SparseVarianceScaling(scale=2.0, mode=mode).variances(p)
    assert variances.dtype == np.float32  # 4 bytes per entry at build, not 8
    np.testing.assert_allclose(variances, 2.0 / np.maximum(fan, 1.0), rtol=1e-6)


def test_keras_initializers_still_work():
    layer = built_layer(sl.patterns.dense((3, 2)), values_initializer="ones")
    np.testing.assert_array_equal(layer.values.numpy(), np.ones(6))
    layer = built_layer(sl.patterns.dense((3, 2)), values_initializer=keras.initializers.Constant(0.5))
    np.testing.assert_array_equal(layer.values.numpy(), np.full(6, 0.5))


def test_integer_inputs_are_cast_like_dense():
    layer = built_layer(sl.patterns.dense((3, 2)))
    x = np.array([[1, 2, 3]], dtype="int32")
    np.testing.assert_allclose(layer(x).numpy(), layer(x.astype("float32")).numpy())


def test_sparse_tensor_inputs_equal_the_densified_input():
    pattern = sl.patterns.random((6, 4), density=0.5, seed=0)
    layer = built_layer(pattern)
    dense = np.array([[0, 1.5, 0, 0, 2, 0], [0, 0, 0, -1, 0, 0]], "float32")
    sparse = tf.sparse.from_dense(dense)
    np.testing.assert_allclose(layer(sparse).numpy(), layer(dense).numpy())


def test_block_diagonal_model_learns_block_diagonal_target():
    pattern = sl.patterns.block_diagonal([(4, 3)] * 4)
    rng = np.random.default_rng(0)
    target = pattern.to_dense(rng.normal(size=pattern.nnz))
    x = rng.normal(size=(2048, pattern.shape[0])).astype("float32")
    y = (x @ target + 0.5).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((pattern.shape[0],)), sl.SparseDense(pattern)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(x, y, epochs=30, batch_size=256, verbose=0)
    layer = model.layers[0]
    assert history.history["loss"][-1] < 1e-3 * history.history["loss"][0]
    learned = layer.to_dense()
    np.testing.assert_allclose(learned, target, atol=0.02)
    np.testing.assert_allclose(layer.bias.numpy(), 0.5, atol=0.02)
    outside = pattern.to_dense() == 0
    assert np.all(learned[outside] == 0)
    assert model.count_params() == pattern.nnz + pattern.shape[1]


def test_config_round_trip():
    layer = sl.SparseDense(sl.patterns.banded((10, 8), lower=1, upper=2), activation="relu",
                           values_regularizer="l2", kernel="csr", name="sd")
    clone = sl.SparseDense.from_config(layer.get_config())
    assert clone.pattern == layer.pattern and clone.kernel_name == "csr"
    assert clone.get_config() == layer.get_config()


def test_keras_file_round_trip_needs_no_custom_objects(tmp_path):
    pattern = sl.patterns.random((40, 30), density=0.2, seed=0)
    inputs = keras.Input((40,))
    model = keras.Model(inputs, sl.SparseDense(pattern, activation="tanh")(inputs))
    x = inputs_for(pattern, 8)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.layers[-1].pattern == pattern


def test_large_pattern_file_size_grows_with_nnz(tmp_path):
    pattern = sl.patterns.random((4000, 2500), density=0.1, seed=0)  # 1,000,000 entries
    inputs = keras.Input((4000,))
    model = keras.Model(inputs, sl.SparseDense(pattern, kernel="csr")(inputs))
    path = str(tmp_path / "big.keras")
    model.save(path)
    size = os.path.getsize(path)
    assert size < 4 * pattern.nnz + 2 * 4 * pattern.nnz  # float32 values + compressed pattern
    assert size < 4 * 4000 * 2500 / 2  # far below a dense float32 kernel
    loaded = keras.models.load_model(path)
    assert loaded.layers[-1].pattern == pattern
    np.testing.assert_array_equal(loaded.layers[-1].values.numpy(), model.layers[-1].values.numpy())


def test_loading_values_that_disagree_with_the_pattern_fails(tmp_path):
    small = keras.Sequential([keras.Input((5,)), sl.SparseDense(sl.patterns.banded((5, 5), lower=1), name="s")])
    path = str(tmp_path / "w.weights.h5")
    small.save_weights(path)
    other = keras.Sequential([keras.Input((5,)), sl.SparseDense(sl.patterns.banded((5, 5), upper=1), name="s")])
    other_ok = keras.Sequential([keras.Input((5,)), sl.SparseDense(sl.patterns.banded((5, 5), lower=2), name="s")])
    other.load_weights(path)  # same nnz: the saved pattern replaces the layer's
    assert other.layers[0].pattern == small.layers[0].pattern
    with pytest.raises(ValueError, match="nnz"):
        other_ok.load_weights(path)


def test_supports_jit_is_truthful_and_jit_compile_true_still_trains():
    pattern = sl.patterns.random((200, 10), density=0.01, seed=0)
    assert sl.SparseDense(sl.patterns.block_diagonal([(16, 16)] * 2)).supports_jit
    layer = sl.SparseDense(pattern)
    assert layer.kernel_name == sl.ops.compiled.accelerated("csr", pattern)  # compiled_csr where built
    assert layer.jit_kernel_name == "dense" and layer.supports_jit
    assert not sl.SparseDense(pattern, kernel="csr").supports_jit
    assert not sl.SparseDense(pattern, kernel="sparse_dense_matmul").supports_jit
    x = inputs_for(pattern, 64)
    y = np.random.default_rng(0).normal(size=(64, 10)).astype("float32")
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((200,)), sl.SparseDense(pattern)])
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
        assert model.jit_compile == jit
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
        results.append(model.layers[0].values.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


BAD_LAYER_ARGS = [
    (dict(pattern="block"), TypeError, "pattern"),
    (dict(pattern=np.ones(3)), ValueError, "2-D"),
    (dict(pattern=sl.patterns.dense((2, 2)), kernel="fastest"), ValueError, "Received: kernel='fastest'"),
    (dict(pattern=sl.patterns.dense((2, 2)), use_bias="yes"), TypeError, "use_bias"),
    (dict(pattern=sl.patterns.random((9, 9), density=0.3, seed=0), kernel="banded"), ValueError, "banded"),
    (dict(pattern=sl.SparsityPattern.from_coo([0], [0], (100_000, 100_000)), kernel="csr_dense_grad"),
     ValueError, "Received: kernel='csr_dense_grad'"),
    (dict(pattern=sl.SparsityPattern.from_coo([0], [0], (100_000, 100_000)), kernel="dense"),
     ValueError, "37.3 GiB"),
    (dict(pattern=sl.patterns.dense((2, 2)), activation="nope"), ValueError, "nope"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_LAYER_ARGS)
def test_bad_layer_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        sl.SparseDense(**kwargs)


def test_wrong_input_dimension_names_both_numbers():
    layer = sl.SparseDense(sl.patterns.dense((8, 2)))
    with pytest.raises(ValueError, match=r"8.*Received: input_shape=\(None, 5\)"):
        layer.build((None, 5))
    with pytest.raises(ValueError, match="8"):
        keras.Sequential([keras.Input((5,)), sl.SparseDense(sl.patterns.dense((8, 2)))])


def test_string_inputs_are_refused():
    layer = built_layer(sl.patterns.dense((2, 2)))
    with pytest.raises((TypeError, ValueError)):
        layer(tf.constant([["a", "b"]]))


def test_pickle_and_clone_model_round_trip():
    import pickle

    pattern = sl.patterns.random((12, 7), density=0.3, seed=0)
    inputs = keras.Input((12,))
    model = keras.Model(inputs, sl.SparseDense(pattern, activation="relu")(inputs))
    x = inputs_for(pattern, 4)
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    clone = keras.models.clone_model(model)
    assert clone.layers[-1].pattern == pattern
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("make", [
    lambda: sl.SparseDense(sl.patterns.random((6, 5), density=0.5, seed=0), name="sparse"),
    lambda: sl.Towers(5, hidden_units=[], output_units=1, name="sparse"),
])
def test_masks_pass_through_like_dense(make):
    """Masking -> SparseDense -> LSTM skips padded steps exactly as Masking -> Dense -> LSTM."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 6)).astype("float32")
    x[0, 4:] = 0.0  # padded steps
    x[2, 2:] = 0.0

    def model(layer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((7, 6))
        hidden = layer(keras.layers.Masking(0.0)(inputs))
        return keras.Model(inputs, keras.layers.LSTM(4, name="lstm")(hidden))

    sparse = model(make())
    layer = sparse.get_layer("sparse")
    kernel = (layer.to_dense() if isinstance(layer, sl.SparseDense) else layer.tower_layers[0].to_dense())
    bias = (layer.bias if isinstance(layer, sl.SparseDense) else layer.tower_layers[0].bias).numpy()
    dense = model(keras.layers.Dense(5, name="sparse"))
    dense.get_layer("sparse").set_weights([kernel, bias])
    dense.get_layer("lstm").set_weights(sparse.get_layer("lstm").get_weights())
    np.testing.assert_allclose(sparse.predict(x, verbose=0), dense.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    unmasked = keras.Model(sparse.inputs, sparse.get_layer("lstm")(layer(sparse.inputs[0])))
    assert np.abs(unmasked.predict(x, verbose=0) - sparse.predict(x, verbose=0)).max() > 1e-3


def test_an_unbuilt_layer_traces_its_build_inside_get_concrete_function():
    # As keras.layers.Dense does: the initializer keeps no seed state that
    # tf.function would need to lift out of the trace.
    pattern = sl.patterns.banded((10, 6), lower=2, upper=1)
    layer = sl.SparseDense(pattern)
    concrete = tf.function(lambda t: layer(t)).get_concrete_function(tf.TensorSpec((None, 10)))
    x = np.random.default_rng(0).normal(size=(3, 10)).astype("float32")
    want = reference.forward(x, pattern, layer.values.numpy(), layer.bias.numpy())
    np.testing.assert_allclose(concrete(tf.constant(x)).numpy(), want, rtol=1e-5, atol=1e-5)


def test_unseeded_initializers_give_each_layer_its_own_values():
    initializer = sl.initializers.SparseGlorotUniform()
    pattern = sl.patterns.random((8, 8), density=0.5, seed=0)
    a, b = (sl.SparseDense(pattern, values_initializer=initializer) for _ in range(2))
    for layer in (a, b):
        layer.build((None, 8))
    assert not np.array_equal(a.values.numpy(), b.values.numpy())
    seeded = sl.initializers.SparseGlorotUniform(seed=3)
    np.testing.assert_array_equal(seeded((pattern.nnz,), pattern=pattern), seeded((pattern.nnz,), pattern=pattern))


@pytest.mark.parametrize("module", ["sparse_kernel", "sparse_dense", "sparse_conv"])
def test_the_layers_import_no_feature_module(module):
    # Arrows point down: autotune and knowledge reach the layers through sparselayers.seams.
    import ast
    import importlib
    import inspect

    tree = ast.parse(inspect.getsource(importlib.import_module(f"sparselayers.{module}")))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    features = ("sparselayers.autotune", "sparselayers.knowledge", "sparselayers.pruning", "sparselayers.callbacks")
    assert not [name for name in imported if name.startswith(features)]
    assert any(name.startswith("sparselayers.") for name in imported)  # the check sees the imports


def test_to_frame_goes_through_the_seam():
    pytest.importorskip("pandas")
    pattern = sl.SparsityPattern.from_edges(["rs1", "rs2", "rs2"], ["A", "A", "B"])
    layer = sl.SparseDense(pattern, use_bias=False)
    layer.build((None, 2))
    layer.values.assign([0.5, -1.0, 2.0])
    frame = layer.to_frame()
    dense = reference.dense_kernel(pattern, layer.values.numpy())
    for row in frame.itertuples():
        i, j = pattern.input_names.index(row.input), pattern.output_names.index(row.output)
        assert row.weight == dense[i, j]
    assert len(frame) == pattern.nnz
