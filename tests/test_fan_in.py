"""`constant_fan_in=True` on RigL and SET (SRigL): every unit keeps its fan-in; helpers against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.callbacks.fan_in import drop_within_units, random_within_units, top_gradient_within_units, unit_counts


def random_pattern(shape, seed, equal):
    if equal:
        return sl.patterns.random(shape, fan_in=max(1, shape[0] // 2), seed=seed)
    return sl.patterns.random(shape, density=0.5, seed=seed)


@given(shape=st.tuples(st.integers(1, 8), st.integers(1, 8)), seed=st.integers(0, 2**16),
       fraction=st.floats(0, 0.99), equal=st.booleans())
def test_drop_within_units_against_a_loop(shape, seed, fraction, equal):
    pattern = random_pattern(shape, seed, equal)
    rng = np.random.default_rng(seed)
    values = rng.integers(-2, 3, size=pattern.nnz).astype("float32")  # many ties
    per_unit = unit_counts(pattern, fraction)
    kept = drop_within_units(pattern, values, per_unit)
    expected = []
    for j in range(shape[1]):
        entries = [k for k in range(pattern.nnz) if pattern.cols[k] == j]
        entries.sort(key=lambda k: (abs(values[k]), k))
        assert per_unit[j] == round(fraction * len(entries))
        expected += [int(pattern.linear[k]) for k in entries[per_unit[j]:]]
    np.testing.assert_array_equal(kept, np.sort(expected))


@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9)), batch=st.integers(1, 4),
       seed=st.integers(0, 2**16), tile_elements=st.integers(1, 40), data=st.data())
def test_top_gradient_within_units_against_numpy(shape, batch, seed, tile_elements, data):
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(batch, shape[0])).astype("float32")
    dy = rng.integers(-2, 3, size=(batch, shape[1])).astype("float32")
    total = shape[0] * shape[1]
    kept = np.sort(rng.choice(total, size=data.draw(st.integers(0, total)), replace=False))
    per_unit = np.array([data.draw(st.integers(0, shape[0])) for _ in range(shape[1])])
    got = top_gradient_within_units(tf.constant(x), dy, kept, per_unit, tile_elements)
    scores = np.abs(x.astype(np.float64).T @ dy.astype(np.float64))
    expected = []
    for j in range(shape[1]):
        rows = [i for i in range(shape[0]) if i * shape[1] + j not in kept and scores[i, j] > 0]
        rows.sort(key=lambda i: (-scores[i, j], i))
        expected += [i * shape[1] + j for i in rows[: per_unit[j]]]
    np.testing.assert_array_equal(got, np.sort(expected).astype(np.int64))


@given(shape=st.tuples(st.integers(1, 12), st.integers(1, 12)), seed=st.integers(0, 2**16), data=st.data())
def test_random_within_units_draws_distinct_free_rows_per_column(shape, seed, data):
    rng = np.random.default_rng(seed)
    total = shape[0] * shape[1]
    kept = np.sort(rng.choice(total, size=data.draw(st.integers(0, total)), replace=False))
    free = shape[0] - np.bincount(kept % shape[1], minlength=shape[1])
    per_unit = np.array([data.draw(st.integers(0, int(f))) for f in free])
    got = random_within_units(shape, kept, per_unit, rng)
    assert np.all(np.diff(got) > 0) and not np.isin(got, kept).any()
    np.testing.assert_array_equal(np.bincount(got % shape[1], minlength=shape[1]), per_unit)


@pytest.mark.parametrize("callback", [sl.callbacks.RigL, sl.callbacks.SET])
@pytest.mark.parametrize("equal", [True, False])
def test_every_unit_keeps_its_fan_in_through_fit(callback, equal):
    pattern = random_pattern((24, 10), 0, equal)
    layer = sl.SparseDense(pattern, activation="relu", name="h")
    model = keras.Sequential([keras.Input((24,)), layer, keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 24)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    fan_ins = []

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            fan_ins.append(layer.pattern.fan_in.copy())

    evolve = callback(update_freq=2, drop_fraction=0.5, seed=0, constant_fan_in=True)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[evolve, Watch()])
    assert layer.pattern != pattern  # it evolved
    assert sum(u["new"] for u in evolve.updates) > 0
    for seen in fan_ins:
        np.testing.assert_array_equal(seen, pattern.fan_in)
    for update in evolve.updates:
        assert update["dropped"] == unit_counts(pattern, update["drop_fraction"]).sum()


def test_constant_fan_in_must_be_a_bool():
    for callback in (sl.callbacks.RigL, sl.callbacks.SET):
        with pytest.raises(TypeError, match="`constant_fan_in` must be a bool. Received: constant_fan_in='yes'"):
            callback(constant_fan_in="yes")
        with pytest.raises(TypeError):
            callback(100, 0.3, None, None, 0, True)  # keyword-only
