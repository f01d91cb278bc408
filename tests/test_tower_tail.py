"""Towers' block layers on the fused compiled ops (sparselayers.ops.tower_tail)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
from sparselayers.ops import tower_tail
from sparselayers.ops.compiled import build
from tests.test_towers import towers_reference


CONFIGS = {
    "16 x 16 to 1, relu": dict(n_towers=6, hidden_units=[16, 16], output_units=1),
    # widths {lanes, lanes, 1}: the forward op's register-resident path (8 doubles a vector)
    "8 x 8 to 1, relu": dict(n_towers=5, hidden_units=[8, 8], output_units=1),
    "8 x 8 to 1, linear, no bias": dict(n_towers=3, hidden_units=[8, 8], output_units=1, activation="linear",
                                        use_bias=False),
    "odd widths, no bias": dict(n_towers=5, hidden_units=[3, 5], output_units=2, use_bias=False),
    "one hidden layer, linear": dict(n_towers=4, hidden_units=[4], output_units=3, activation="linear"),
    "three hidden layers, sigmoid outputs": dict(
        n_towers=3, hidden_units=[16, 4, 16], output_units=1, output_activation="sigmoid"
    ),
}


def _towers(config, input_dim=7, seed=0):
    towers = sl.Towers(**CONFIGS[config], dtype="float64")
    towers.build((None, input_dim))
    rng = np.random.default_rng(seed)
    for layer in towers.tower_layers:
        layer.values.assign(rng.normal(size=layer.pattern.nnz))
        if layer.bias is not None:
            layer.bias.assign(rng.normal(size=layer.units))
    return towers


def _run(towers, x, upstream):
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = towers(x)
        loss = tf.reduce_sum(y * upstream)
    return y.numpy(), [g.numpy() for g in tape.gradient(loss, [x, *towers.trainable_variables])]


def _fused_ops(towers, x):
    graph = tf.function(towers).get_concrete_function(tf.constant(x)).graph
    return {op.type for op in graph.get_operations() if op.type.startswith("SparselayersTower")}


def test_float32_fused_forward_equals_the_float64_reference(built):
    # 16 floats a vector: Towers(n, [16, 16]) takes the forward op's register-resident path in float32.
    towers = sl.Towers(9, hidden_units=[16, 16], dtype="float32")
    towers.build((None, 7))
    rng = np.random.default_rng(2)
    for layer in towers.tower_layers:
        layer.values.assign(rng.normal(size=layer.pattern.nnz).astype("float32"))
        layer.bias.assign(rng.normal(size=layer.units).astype("float32"))
    x = rng.normal(size=(19, 7)).astype("float32")
    assert _fused_ops(towers, x) == {"SparselayersTowerForward"}
    np.testing.assert_allclose(towers(x).numpy(), towers_reference(towers, x.astype(np.float64)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("batch", [0, 1, 9, 17])
def test_fused_towers_equal_the_float64_reference_and_the_unfused_gradients(built, config, batch, monkeypatch):
    towers = _towers(config)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, 7))
    upstream = rng.normal(size=(batch, towers.n_towers * towers.output_units))
    assert _fused_ops(towers, x) == {"SparselayersTowerForward"}
    y, grads = _run(towers, x, upstream)
    np.testing.assert_allclose(y, towers_reference(towers, x), rtol=1e-12, atol=1e-12)
    # The same model on the batched-matmul tower layout: plain TF autodiff.
    monkeypatch.setattr(tower_tail, "fused_available", lambda dtype: False)
    assert not _fused_ops(towers, x)
    y_tf, grads_tf = _run(towers, x, upstream)
    np.testing.assert_allclose(y, y_tf, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_tf):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_second_order_gradients_equal_the_unfused_ones(built, monkeypatch):
    # A gradient penalty: the gradient of |d loss / dx|^2 w.r.t. every variable.
    towers = _towers("16 x 16 to 1, relu")
    x = tf.constant(np.random.default_rng(2).normal(size=(5, 7)))

    def penalty_gradients():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(towers(x) ** 2)
            penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
        return [g.numpy() for g in outer.gradient(penalty, towers.trainable_variables)]

    fused = penalty_gradients()
    monkeypatch.setattr(tower_tail, "fused_available", lambda dtype: False)
    for got, want in zip(fused, penalty_gradients()):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_float32_training_matches_float64(built):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), sl.Towers(32, hidden_units=[16, 16])])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = np.random.default_rng(3).normal(size=(64, 8)).astype("float32")
    y = np.random.default_rng(4).normal(size=(64, 32)).astype("float32")
    before = towers_reference(model.layers[0], x.astype(np.float64))
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < history[0]
    after = model.predict(x, verbose=0)
    np.testing.assert_allclose(after, towers_reference(model.layers[0], x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(after, before)


@pytest.mark.parametrize(
    "config, reason",
    [
        (dict(activation="tanh"), "tanh hidden layers"),
        (dict(dtype="mixed_float16"), "float16 compute"),
    ],
)
def test_where_the_fused_ops_do_not_run(built, config, reason):
    towers = sl.Towers(4, hidden_units=[3, 3], **config)
    x = np.ones((2, 5), "float32")
    assert not _fused_ops(towers, x), reason
    np.testing.assert_allclose(
        np.asarray(towers(x), np.float64), towers_reference(towers, x.astype(np.float64)), rtol=2e-2, atol=2e-2
    )


def test_the_tower_ops_check_their_inputs(built):
    ops = build.library()
    h, none = tf.zeros((2, 8)), tf.zeros([0])
    weights, biases = [tf.zeros(4 * 2 * 3)], [none]
    attrs = dict(towers=4, widths=[2, 3], relu=True)
    ops.sparselayers_tower_forward(h, none, weights, biases, **attrs)  # consistent: runs
    bad = {
        "h must be a matrix of 8 columns": (tf.zeros((2, 7)), none, weights, biases),
        "first_bias must be empty or have one entry per column": (h, tf.zeros(3), weights, biases),
        r"weights\[0\] must have 24 entries": (h, none, [tf.zeros(23)], biases),
        r"biases\[0\] must be empty or have 12 entries": (h, none, weights, [tf.zeros(5)]),
    }
    for message, args in bad.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            ops.sparselayers_tower_forward(*args, **attrs)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy must have"):
        ops.sparselayers_tower_backward(tf.zeros((2, 5)), h, none, weights, biases, **attrs)
