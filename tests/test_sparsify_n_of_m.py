"""`sl.sparsify(model, n_of_m=(n, m))` against a per-group NumPy reference (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl


def reference_n_of_m(scores, candidates, n, m):
    """Mask of the kept entries, group by group in Python: in each column, each
    run of ``m`` rows keeps its ``n`` best candidates; equal scores: the
    earlier row first."""
    scores = np.asarray(scores, np.float64)
    rows, units = scores.shape
    keep = np.zeros((rows, units), bool)
    for j in range(units):
        for start in range(0, rows, m):
            group = [i for i in range(start, start + m) if candidates[i, j]]
            for i in sorted(group, key=lambda i: (-scores[i, j], i))[:n]:
                keep[i, j] = True
    return keep


def one_dense(shape, seed=0, ties=False):
    model = keras.Sequential([keras.Input((shape[0],)), keras.layers.Dense(shape[1], name="d")])
    rng = np.random.default_rng(seed)
    if ties:  # few distinct magnitudes, both signs: many exact ties
        kernel = rng.integers(-2, 3, size=shape) * 0.5
    else:
        kernel = rng.normal(size=shape)
    model.get_layer("d").kernel.assign(kernel.astype("float32"))
    model.get_layer("d").bias.assign(rng.normal(size=shape[1]).astype("float32"))
    return model


def kept(layer):
    return layer.pattern.to_dense() != 0


@st.composite
def cases(draw):
    m = draw(st.integers(1, 6))
    shape = (m * draw(st.integers(1, 4)), draw(st.integers(1, 6)))
    return shape, draw(st.integers(1, m)), m, draw(st.integers(0, 2**16)), draw(st.booleans())


@settings(max_examples=20, deadline=None)
@given(cases())
def test_dense_layer_keeps_the_n_largest_of_each_group(case):
    shape, n, m, seed, ties = case
    model = one_dense(shape, seed, ties)
    kernel = model.get_layer("d").kernel.numpy()
    bias = model.get_layer("d").bias.numpy()
    layer = sl.sparsify(model, n_of_m=(n, m)).get_layer("d")
    keep = reference_n_of_m(np.abs(kernel), np.ones(shape, bool), n, m)
    np.testing.assert_array_equal(kept(layer), keep)
    np.testing.assert_array_equal(layer.to_dense(), np.where(keep, kernel, 0))
    x = np.random.default_rng(seed).normal(size=(3, shape[0]))
    expected = x @ np.where(keep, kernel, 0).astype(np.float64) + bias
    np.testing.assert_allclose(np.asarray(layer(x.astype("float32")), np.float64), expected, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_earlier_input_of_the_group():
    model = one_dense((4, 2))
    model.get_layer("d").kernel.assign(np.array([[1, -2], [-1, 2], [1, 2], [2, -2]], "float32"))
    mask = kept(sl.sparsify(model, n_of_m=(2, 4)).get_layer("d"))
    # Column 0: the 2, then the first of the three 1s; column 1: the first two 2s.
    np.testing.assert_array_equal(mask, [[1, 1], [0, 1], [0, 0], [1, 0]])


@given(cases(), st.floats(0.1, 1.0))
@settings(max_examples=12, deadline=None)
def test_a_sparse_layer_keeps_at_most_n_of_its_current_entries_per_group(case, density):
    shape, n, m, seed, ties = case
    once = sl.sparsify(one_dense(shape, seed, ties), density=density)
    before = once.get_layer("d")
    current = before.to_dense()
    after = sl.sparsify(once, n_of_m=(n, m)).get_layer("d")
    keep = reference_n_of_m(np.abs(current), kept(before), n, m)
    np.testing.assert_array_equal(kept(after), keep)
    np.testing.assert_array_equal(after.to_dense(), np.where(keep, current, 0))


def test_snip_and_random_rank_within_the_groups():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(3, name="b")])
    model.compile(loss="mse")
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(16, 12)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
    w0, w1 = (tf.constant(layer.kernel.numpy()) for layer in model.layers)
    with tf.GradientTape() as tape:
        tape.watch([w0, w1])
        out = (x @ w0 + model.layers[0].bias.numpy()) @ w1 + model.layers[1].bias.numpy()
        loss = tf.reduce_mean(tf.square(out - y))
    grads = tape.gradient(loss, [w0, w1])
    snip = sl.sparsify(model, n_of_m=(1, 4), criterion="snip", data=(x, y))
    for w, g, layer in zip((w0, w1), grads, snip.layers):
        score = np.abs(w.numpy().astype(np.float64) * g.numpy())
        np.testing.assert_array_equal(kept(layer), reference_n_of_m(score, np.ones(score.shape, bool), 1, 4))
    a = sl.sparsify(model, n_of_m=(2, 4), criterion="random", seed=7)
    b = sl.sparsify(model, n_of_m=(2, 4), criterion="random", seed=7)
    c = sl.sparsify(model, n_of_m=(2, 4), criterion="random", seed=8)
    for dense, la, lb, lc in zip(model.layers, a.layers, b.layers, c.layers):
        assert la.pattern == lb.pattern and la.pattern != lc.pattern
        rows, units = la.pattern.shape
        counts = kept(la).reshape(rows // 4, 4, units).sum(axis=1)
        np.testing.assert_array_equal(counts, np.full(counts.shape, 2))
        kernel = dense.kernel.numpy()
        np.testing.assert_array_equal(la.to_dense(), np.where(kept(la), kernel, 0))
    first = model.layers[0].kernel.numpy()
    magnitude = reference_n_of_m(np.abs(first), np.ones(first.shape, bool), 2, 4)
    assert not np.array_equal(kept(a.layers[0]), magnitude)


def test_convolutions_group_the_flattened_window_and_channels():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 4)),
        keras.layers.Conv2D(5, 3, name="conv"),  # rows 3 * 3 * 4 = 36
        keras.layers.Flatten(),
        keras.layers.Dense(2, name="head"),  # rows 4 * 4 * 5 = 80
    ])
    sparse = sl.sparsify(model, n_of_m=(2, 4))
    for name in ("conv", "head"):
        kernel = model.get_layer(name).kernel.numpy()
        view = kernel.reshape(-1, kernel.shape[-1])
        keep = reference_n_of_m(np.abs(view), np.ones(view.shape, bool), 2, 4)
        np.testing.assert_array_equal(kept(sparse.get_layer(name)), keep)
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 4)).astype("float32")
    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    for name in ("conv", "head"):
        kernel = model.get_layer(name).kernel.numpy()
        view = kernel.reshape(-1, kernel.shape[-1])
        mask = reference_n_of_m(np.abs(view), np.ones(view.shape, bool), 2, 4).reshape(kernel.shape)
        pruned.get_layer(name).kernel.assign(np.where(mask, kernel, 0))
    np.testing.assert_allclose(sparse(x), pruned(x), rtol=1e-5, atol=1e-5)


def test_unit_names_are_kept():
    pattern = sl.SparsityPattern.from_dense(np.ones((4, 2))).with_names(["w", "x", "y", "z"], ["a", "b"])
    model = keras.Sequential([keras.Input((4,)), sl.SparseDense(pattern, name="named")])
    layer = sl.sparsify(model, n_of_m=(1, 2)).get_layer("named")
    assert layer.pattern.input_names == ("w", "x", "y", "z") and layer.pattern.output_names == ("a", "b")
    assert layer.pattern.nnz == 4


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({}, ValueError, r"Give exactly one of `density` and `n_of_m`. Received: density=None, n_of_m=None"),
        ({"density": 0.5, "n_of_m": (2, 4)}, ValueError, r"Received: density=0.5, n_of_m=\(2, 4\)"),
        ({"n_of_m": (5, 4)}, ValueError, r"`n_of_m` must be a pair \(n, m\) of integers with 1 <= n <= m. Received: n_of_m=\(5, 4\)"),
        ({"n_of_m": (0, 4)}, ValueError, r"Received: n_of_m=\(0, 4\)"),
        ({"n_of_m": (2, 0)}, ValueError, r"Received: n_of_m=\(2, 0\)"),
        ({"n_of_m": (1.5, 4)}, TypeError, r"`n_of_m` must be a pair \(n, m\) of integers.*Received: n_of_m=\(1.5, 4\)"),
        ({"n_of_m": (True, 4)}, TypeError, r"Received: n_of_m=\(True, 4\)"),
        ({"n_of_m": "2:4"}, TypeError, r"Received: n_of_m='2:4'"),
        ({"n_of_m": (2, 4, 8)}, TypeError, r"Received: n_of_m=\(2, 4, 8\)"),
        ({"n_of_m": 2}, TypeError, r"Received: n_of_m=2"),
        ({"n_of_m": (2, 4), "distribution": "erk"}, ValueError,
         r"`n_of_m` keeps n of every m inputs in every layer.*Received: n_of_m=\(2, 4\), distribution='erk'"),
        ({"n_of_m": (2, 4), "block": (2, 2)}, ValueError, r"Received: n_of_m=\(2, 4\), block=\(2, 2\)"),
        ({"n_of_m": (2, 3)}, ValueError,
         r"`n_of_m=\(2, 3\)` groups 3 consecutive inputs, but 3 does not divide the 8 inputs \(rows\) of Dense 'd'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, text):
    with pytest.raises(error, match=text):
        sl.sparsify(one_dense((8, 3)), **kwargs)


def test_a_convolution_whose_rows_m_does_not_divide_is_named():
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, name="rgb")])  # rows 27
    with pytest.raises(ValueError, match=r"does not divide the 27 inputs \(rows\) of Conv2D 'rgb'.*`layers=`"):
        sl.sparsify(model, n_of_m=(2, 4))
