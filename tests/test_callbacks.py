"""RigL and SET callbacks against NumPy float64 references of each update."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.callbacks import random_positions, top_gradient_positions
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 12)).astype("float32")
Y = RNG.normal(size=(64, 3)).astype("float32")
BATCH = 16  # 4 steps per epoch


def build(optimizer=None, **compile_kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    h = sl.SparseDense(sl.patterns.random((12, 10), density=0.3, seed=1), activation="tanh", name="hidden")(inputs)
    outputs = sl.SparseDense(sl.patterns.random((10, 3), density=0.4, seed=2), name="out")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.05), loss="mse", **compile_kwargs)
    return model


def fit(model, callback, epochs=2, **kwargs):
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback], **kwargs)
    return model


def patterns_of(model):
    return [layer.pattern for layer in sl.callbacks.sparse_dense_layers(model)]


class Snapshot(keras.callbacks.Callback):
    """Values, Adam moments and patterns of both layers at the end of every batch."""

    def __init__(self):
        super().__init__()
        self.records = []

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        record = {}
        for name in ("hidden", "out"):
            layer = self.model.get_layer(name)
            index = optimizer._get_variable_index(layer.values)
            record[name] = {
                "pattern": layer.pattern,
                "values": layer.values.numpy().copy(),
                "bias": layer.bias.numpy().copy(),
                "m": optimizer._momentums[index].numpy().copy(),
                "v": optimizer._velocities[index].numpy().copy(),
            }
        self.records.append(record)


def reference_dense_gradients(before, x, y):
    """float64 dL/dW of both layers for mse on ``(x, y)``, from the snapshot's weights."""
    w1 = reference.dense_kernel(before["hidden"]["pattern"], before["hidden"]["values"])
    w2 = reference.dense_kernel(before["out"]["pattern"], before["out"]["values"])
    x, y = x.astype(np.float64), y.astype(np.float64)
    h = np.tanh(x @ w1 + before["hidden"]["bias"])
    out = h @ w2 + before["out"]["bias"]
    d_out = 2.0 * (out - y) / out.size
    d_hidden = (d_out @ w2.T) * (1.0 - h**2)
    return {"hidden": x.T @ d_hidden, "out": h.T @ d_out}


def check_entries_follow(old, new, name):
    """Kept entries keep value and moments at their new index; new entries are 0."""
    old_linear, new_linear = old["pattern"].linear, new["pattern"].linear
    was_there = np.isin(new_linear, old_linear)
    old_index = np.searchsorted(old_linear, new_linear[was_there])
    for key in ("values", "m", "v"):
        np.testing.assert_array_equal(new[key][was_there], old[key][old_index], err_msg=f"{name} {key}")
        np.testing.assert_array_equal(new[key][~was_there], 0.0, err_msg=f"{name} {key}")
    return was_there


# Arguments -------------------------------------------------------------------


@pytest.mark.parametrize("callback", [sl.callbacks.RigL, sl.callbacks.SET])
@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"update_freq": 0}, ValueError, "`update_freq` must be >= 1. Received: update_freq=0"),
        ({"update_freq": 2.5}, TypeError, "`update_freq` must be an integer"),
        ({"drop_fraction": 1.0}, ValueError, "`drop_fraction` must be in [0, 1). Received: drop_fraction=1.0"),
        ({"drop_fraction": -0.1}, ValueError, "`drop_fraction` must be in [0, 1)"),
        ({"drop_fraction": "0.3"}, TypeError, "`drop_fraction` must be a number"),
        ({"end_step": 0}, ValueError, "`end_step` must be >= 1"),
        ({"layers": "hidden"}, TypeError, "`layers` must be a list of layer names"),
        ({"seed": -1}, ValueError, "`seed` must be >= 0"),
    ],
)
def test_bad_arguments_raise_at_construction(callback, kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        callback(**{"update_freq": 1, "drop_fraction": 0.3, **kwargs})


def test_bad_models_raise_at_the_start_of_fit():
    dense = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3)])
    dense.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="needs a model with a sparse layer"):
        fit(dense, sl.callbacks.SET(1, 0.3))
    with pytest.raises(ValueError, match=r"`layers` must name sparse layers.*\['nope'\] not found"):
        fit(build(), sl.callbacks.RigL(1, 0.3, layers=["hidden", "nope"]))
    steps_unknown = tf.data.Dataset.from_generator(
        lambda: iter([(X[:16], Y[:16])]), output_signature=(tf.TensorSpec((None, 12)), tf.TensorSpec((None, 3)))
    )
    with pytest.raises(ValueError, match="`end_step` is needed"):
        build().fit(steps_unknown, verbose=0, callbacks=[sl.callbacks.SET(1, 0.3)])


def test_full_layers_are_left_with_a_warning_and_named_ones_raise():
    inputs = keras.Input((6,))
    full = sl.SparseDense(sl.patterns.dense((6, 4)), name="full")(inputs)
    model = keras.Model(inputs, sl.SparseDense(sl.patterns.banded((4, 3)), name="band")(full))
    model.compile(optimizer="adam", loss="mse")
    x, y = X[:, :6], Y
    with pytest.warns(UserWarning, match="layer 'full' has nnz=24 of 24 positions, no room to evolve"):
        model.fit(x, y, batch_size=16, verbose=0, callbacks=[sl.callbacks.SET(1, 0.5, seed=0)])
    assert model.get_layer("full").pattern == sl.patterns.dense((6, 4))
    assert model.get_layer("band").pattern != sl.patterns.banded((4, 3))
    with pytest.raises(ValueError, match="`layers` must name layers that can evolve"):
        model.fit(x, y, verbose=0, callbacks=[sl.callbacks.SET(1, 0.5, layers=["full"])])


# Schedule --------------------------------------------------------------------


def test_cosine_schedule_and_update_steps_match_numpy():
    callback = sl.callbacks.SET(update_freq=3, drop_fraction=0.4, seed=0)
    fit(build(), callback, epochs=4)  # 16 steps: end_step = 12, updates at 3, 6, 9
    assert [u["step"] for u in callback.updates] == [3, 3, 6, 6, 9, 9]
    for update in callback.updates:
        t = update["step"]
        expected = 0.4 * (1 + np.cos(np.pi * t / 12)) / 2
        assert update["drop_fraction"] == pytest.approx(expected, abs=1e-12)
        nnz = {"hidden": 36, "out": 12}[update["layer"]]
        assert update["dropped"] == round(expected * nnz)
    assert [callback.drop_fraction_at(t) for t in (0, 12, 13)] == [pytest.approx(0.4), 0.0, 0.0]


# The update ------------------------------------------------------------------


def test_rigl_update_matches_a_float64_reference():
    before, after = Snapshot(), Snapshot()
    # Tiles of 7 gradient entries: the running top-n crosses many tiles.
    rigl = sl.callbacks.RigL(update_freq=2, drop_fraction=0.5, end_step=8, seed=0, tile_elements=7)
    build().fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[before, rigl, after])
    assert {u["step"] for u in rigl.updates} == {2, 4, 6}
    for step in (2, 4, 6):
        old, new = before.records[step - 1], after.records[step - 1]
        batch = slice((step - 1) % 4 * BATCH, ((step - 1) % 4 + 1) * BATCH)
        gradients = reference_dense_gradients(old, X[batch], Y[batch])
        for name in ("hidden", "out"):
            pattern, values = old[name]["pattern"], old[name]["values"]
            new_linear = new[name]["pattern"].linear
            assert new[name]["pattern"].nnz == pattern.nnz and np.all(np.diff(new_linear) > 0)
            n = round(0.5 * (1 + math.cos(math.pi * step / 8)) / 2 * pattern.nnz)
            # Kept: all but the n smallest |values| (ties: earlier entry dropped first).
            kept = np.sort(pattern.linear[np.lexsort((np.arange(pattern.nnz), np.abs(values)))[n:]])
            assert np.isin(kept, new_linear).all()
            grown = np.setdiff1d(new_linear, kept)
            assert grown.size == n
            scores = np.abs(gradients[name]).ravel()
            scores[kept] = -1.0
            np.testing.assert_allclose(np.sort(scores[grown]), np.sort(scores)[-n:], rtol=1e-4)
            was_there = check_entries_follow(old[name], new[name], name)
            assert (~was_there).sum() > 0 or step == 6  # the early updates move connections


@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    tile_elements=st.integers(1, 40),
    data=st.data(),
)
def test_top_gradient_positions_against_numpy(shape, batch, seed, tile_elements, data):
    rng = np.random.default_rng(seed)
    # Small integers: float32 products are exact, so ties are real ties.
    x = rng.integers(-2, 3, size=(batch, shape[0])).astype("float32")
    dy = rng.integers(-2, 3, size=(batch, shape[1])).astype("float32")
    total = shape[0] * shape[1]
    kept = np.sort(rng.choice(total, size=data.draw(st.integers(0, total)), replace=False))
    n = data.draw(st.integers(1, total))
    got = top_gradient_positions(tf.constant(x), tf.constant(dy), kept, n, tile_elements)
    scores = np.abs(x.astype(np.float64).T @ dy.astype(np.float64)).ravel()
    free = np.setdiff1d(np.arange(total), kept)
    free = free[scores[free] > 0]
    expected = np.sort(free[np.lexsort((free, -scores[free]))[:n]])
    np.testing.assert_array_equal(got, expected)


@given(
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_positions_are_distinct_and_outside_taken(shape, seed, data):
    total = shape[0] * shape[1]
    rng = np.random.default_rng(seed)
    taken = np.sort(rng.choice(total, size=data.draw(st.integers(0, total - 1)), replace=False))
    n = data.draw(st.integers(1, total - taken.size))
    got = random_positions(shape, taken, n, np.random.default_rng(seed))
    assert got.size == n and np.all(np.diff(got) > 0)
    assert got.min() >= 0 and got.max() < total and not np.isin(got, taken).any()


def test_random_positions_are_uniform_over_free_positions():
    taken = np.array([0, 3, 4, 9])
    rng = np.random.default_rng(0)
    draws = np.concatenate([random_positions((3, 4), taken, 2, rng) for _ in range(4000)])
    counts = np.bincount(draws, minlength=12)
    free = np.setdiff1d(np.arange(12), taken)
    assert counts[taken].sum() == 0
    expected = 4000 * 2 / free.size
    chi2 = ((counts[free] - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def test_set_update_and_seed():
    before, after = Snapshot(), Snapshot()
    callback = sl.callbacks.SET(update_freq=2, drop_fraction=0.5, end_step=6, seed=3)
    model = build()
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[before, callback, after])
    for step in (2, 4):
        old, new = before.records[step - 1], after.records[step - 1]
        for name in ("hidden", "out"):
            pattern, values = old[name]["pattern"], old[name]["values"]
            n = round(0.5 * (1 + math.cos(math.pi * step / 6)) / 2 * pattern.nnz)
            kept = np.sort(pattern.linear[np.lexsort((np.arange(pattern.nnz), np.abs(values)))[n:]])
            assert np.isin(kept, new[name]["pattern"].linear).all()
            assert new[name]["pattern"].nnz == pattern.nnz
            check_entries_follow(old[name], new[name], name)
    same = fit(build(), sl.callbacks.SET(update_freq=2, drop_fraction=0.5, end_step=6, seed=3))
    other = fit(build(), sl.callbacks.SET(update_freq=2, drop_fraction=0.5, end_step=6, seed=4))
    assert patterns_of(same) == patterns_of(model)
    assert patterns_of(other) != patterns_of(model)


def test_towers_and_nested_models_evolve():
    nested = sl.SparseDense(sl.patterns.random((8, 8), density=0.3, seed=0))
    inner = keras.Sequential([keras.Input((8,)), nested], name="inner")
    inputs = keras.Input((12,))
    first = sl.SparseDense(sl.patterns.random((12, 8), density=0.3, seed=0))
    model = keras.Model(inputs, sl.Towers(3, hidden_units=[4], output_units=1, name="towers")(inner(first(inputs))))
    model.compile(optimizer="adam", loss="mse")
    start = patterns_of(model)
    with pytest.warns(UserWarning, match="tower_layer_0"):  # Towers' first layer is dense
        fit(model, sl.callbacks.RigL(update_freq=2, drop_fraction=0.5, seed=0), epochs=1)  # one update
    changed = {layer.path: layer.pattern != p for layer, p in zip(sl.callbacks.sparse_dense_layers(model), start)}
    assert len(changed) == 4
    assert [path for path, moved in changed.items() if not moved] == ["towers/tower_layer_0"]


# Run modes, distribution, saving ---------------------------------------------


@pytest.mark.parametrize(
    "callback, modes",
    [
        (sl.callbacks.RigL, [{"run_eagerly": True}, {}, {"jit_compile": True}, {"steps_per_execution": 2}]),
        # SET never touches the train function: eager against XLA suffices.
        (sl.callbacks.SET, [{"run_eagerly": True}, {"jit_compile": True}]),
    ],
)
def test_eager_compiled_jit_and_steps_per_execution_evolve_alike(callback, modes):
    results = []
    for compile_kwargs in modes:
        model = fit(build(**compile_kwargs), callback(update_freq=2, drop_fraction=0.5, end_step=8, seed=0))
        results.append((patterns_of(model), model.get_weights()))
    for patterns, weights in results[1:]:
        assert patterns == results[0][0]
        for a, b in zip(weights, results[0][1]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert results[0][0] != patterns_of(build())


@pytest.mark.parametrize("callback", [sl.callbacks.RigL, sl.callbacks.SET])
def test_checkpoint_written_mid_training_continues_identically(callback, tmp_path):
    def make_callback():
        return callback(update_freq=2, drop_fraction=0.5, end_step=20, seed=0)

    whole = fit(build(), make_callback(), epochs=3)  # updates at steps 2, 4, 6, 8 | 10, 12
    first_half = fit(build(), make_callback(), epochs=2)
    path = tf.train.Checkpoint(model=first_half, optimizer=first_half.optimizer).write(str(tmp_path / "ckpt"))
    resumed = build()
    assert patterns_of(resumed) != patterns_of(first_half)
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(path).assert_consumed()
    assert patterns_of(resumed) == patterns_of(first_half)
    resumed_callback = make_callback()
    fit(resumed, resumed_callback, epochs=3, initial_epoch=2)
    assert {u["step"] for u in resumed_callback.updates if u["new"]} == {10, 12}
    assert patterns_of(resumed) == patterns_of(whole)
    for a, b in zip(resumed.get_weights(), whole.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_evolved_pattern_saves_and_loads(tmp_path):
    model = fit(build(), sl.callbacks.RigL(update_freq=2, drop_fraction=0.5, seed=0))
    expected = model.predict(X, verbose=0)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    fresh = build()
    assert patterns_of(fresh) != patterns_of(model)
    fresh.load_weights(tmp_path / "m.weights.h5")
    for other in (loaded, fresh):
        assert patterns_of(other) == patterns_of(model)
        np.testing.assert_allclose(other.predict(X, verbose=0), expected, atol=1e-6)


MIRRORED = textwrap.dedent(
    """
    import json
    import numpy as np, tensorflow as tf, keras
    import sparselayers as sl

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 12)).astype("float32")
    y = rng.normal(size=(128, 3)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,))
        h = sl.SparseDense(sl.patterns.random((12, 10), density=0.3, seed=1), activation="tanh")(inputs)
        model = keras.Model(inputs, sl.SparseDense(sl.patterns.random((10, 3), density=0.4, seed=2))(h))
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
        return model

    def run(model, callback):
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
        return [l.pattern.fingerprint for l in sl.callbacks.sparse_dense_layers(model)]

    out = {}
    for name in ("RigL", "SET"):
        make = lambda: getattr(sl.callbacks, name)(update_freq=2, drop_fraction=0.5, end_step=10, seed=0)
        single = build()
        single_patterns = run(single, make())
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            mirrored = build()
        mirrored_patterns = run(mirrored, make())
        optimizer = mirrored.optimizer
        spread = 0.0
        for layer in sl.callbacks.sparse_dense_layers(mirrored):
            for variable in [layer.values] + sl.callbacks.optimizer_slots(optimizer, layer.values):
                copies = [c.numpy() for c in variable.value.values]
                assert len(copies) == 2
                spread = max(spread, float(np.abs(copies[0] - copies[1]).max()))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights()))
        start = [l.pattern.fingerprint for l in sl.callbacks.sparse_dense_layers(build())]
        out[name] = {
            "same_patterns": single_patterns == mirrored_patterns,
            "moved": single_patterns != start,
            "spread": spread, "diff": diff,
        }
    print(json.dumps(out))
    """
)


def test_mirrored_strategy_evolves_every_replica_alike():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("RigL", "SET"):
        assert result[name]["moved"], name
        assert result[name]["same_patterns"], name  # as on one device
        assert result[name]["spread"] == 0.0, name  # replicas hold identical values and optimizer slots
        assert result[name]["diff"] < 1e-4, name


@pytest.mark.parametrize(
    "optimizer, kinds",
    [
        (keras.optimizers.SGD(0.1), []),
        (keras.optimizers.SGD(0.1, momentum=0.9), ["momentum"]),
        (keras.optimizers.Adam(amsgrad=True), ["momentum", "velocity", "velocity_hat"]),
        (keras.optimizers.Adam(use_ema=True), ["average", "momentum", "velocity"]),
        (keras.optimizers.LossScaleOptimizer(keras.optimizers.RMSprop(momentum=0.5)), ["momentum", "velocity"]),
    ],
    ids=["sgd", "momentum", "amsgrad", "ema", "loss-scale"],
)
def test_optimizer_slots_are_every_per_entry_state(optimizer, kinds):
    model = build(optimizer)
    model.train_on_batch(X[:16], Y[:16])
    values = model.get_layer("hidden").values
    slots = sl.callbacks.optimizer_slots(optimizer, values)
    prefix = values.path.replace("/", "_") + "_"  # Keras' name for a variable's slots
    assert sorted(slot.path.split("/")[-1].removeprefix(prefix) for slot in slots) == kinds
    assert all(tuple(slot.shape) == (36,) for slot in slots)


def test_two_rigl_callbacks_each_see_the_batch():
    model = build()
    start = patterns_of(model)
    callbacks = [sl.callbacks.RigL(2, 0.5, end_step=4, layers=[name], seed=0) for name in ("hidden", "out")]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RigL did not see")
        model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    assert [u["layer"] for c in callbacks for u in c.updates] == ["hidden", "out"]
    assert all(a != b for a, b in zip(patterns_of(model), start))
    assert getattr(model.train_function, "__wrapped__", None) is None  # fit leaves Keras' own function


def test_rigl_completes_growth_at_random_when_few_gradients_are_nonzero():
    x = np.zeros_like(X)
    x[:, 0] = X[:, 0]  # only input 0 carries signal: dL/dW of the first layer is zero outside row 0
    before, after = Snapshot(), Snapshot()
    runs = []
    for seed in (0, 0, 1):
        rigl = sl.callbacks.RigL(update_freq=2, drop_fraction=0.5, end_step=4, layers=["hidden"], seed=seed)
        model = build()
        model.fit(x, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[before, rigl, after])
        runs.append(model.get_layer("hidden").pattern)
    old, new = before.records[1]["hidden"], after.records[1]["hidden"]
    n = round(0.5 * 36 * (1 + math.cos(math.pi * 2 / 4)) / 2)
    kept = np.sort(old["pattern"].linear[np.argsort(np.abs(old["values"]), kind="stable")[n:]])
    grown = np.setdiff1d(new["pattern"].linear, kept)
    scores = np.abs(reference_dense_gradients(before.records[1], x[BATCH : 2 * BATCH], Y[BATCH : 2 * BATCH])["hidden"])
    nonzero = np.setdiff1d(np.flatnonzero(scores.ravel() > 0), kept)
    assert 0 < nonzero.size < n == grown.size
    assert np.isin(nonzero, grown).all()
    assert runs[0] == runs[1] and runs[0] != runs[2]  # the random rest follows the seed


def test_rigl_sees_every_tower_layer_before_any_update():
    """Towers fuses its block layers; while RigL records, each layer is called on its own."""
    import tensorflow as tf

    from sparselayers.callbacks.dynamic import _recording
    from sparselayers.ops.context import observing_layers

    towers = sl.Towers(3, hidden_units=[4, 2], output_units=1)
    model = keras.Sequential([keras.Input((5,)), towers])
    x = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    fused = model(x).numpy()
    with tf.GradientTape() as tape, _recording(towers.tower_layers, tape) as calls, observing_layers():
        observed = model(x).numpy()
    assert all(len(calls[id(layer)]) == 1 for layer in towers.tower_layers)
    np.testing.assert_allclose(observed, fused, rtol=1e-5, atol=1e-6)
