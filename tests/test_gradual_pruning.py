"""`sl.callbacks.GradualPruning` and `sl.strip_pruning`: schedule against the formula, exact nnz, exact outputs."""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
from sparselayers.allocation import erk_densities
from tests.reference import forward


def formula(t, d_f, d_i, begin, end, power):
    """Zhu & Gupta's schedule, written out."""
    t = min(max(t, begin), end)
    return float(np.clip(d_f + (d_i - d_f) * (1 - (t - begin) / (end - begin)) ** power, 0, 1))


def model_of(widths, seed=0, **compile_kwargs):
    keras.utils.set_random_seed(seed)
    dense = keras.Sequential(
        [keras.Input((widths[0],))]
        + [keras.layers.Dense(w, activation="relu" if i < len(widths) - 2 else None, name=f"d{i}") for i, w in enumerate(widths[1:])]
    )
    model = sl.sparsify(dense, density=1.0)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", **compile_kwargs)
    return model


def data(n_in, n_out, n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_in)).astype("float32")
    return x, (x[:, :n_out] * 2.0 - x[:, -n_out:]).astype("float32")


def by_name(update):
    return {path.split("/")[-1]: nnz for path, nnz in update["layers"].items()}


def reference_outputs(model, x):
    """Float64 forward pass through the layers' dense kernels (pruned entries zero)."""
    h = np.asarray(x, np.float64)
    for layer in model.layers:
        h = forward(h, layer.pattern, layer.values.numpy(), layer.bias.numpy())
        if layer.activation is keras.activations.relu:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("begin, end, frequency, power", [(0, 12, 3, 3), (2, 11, 4, 2), (5, 6, 1, 1)])
def test_logged_densities_follow_the_formula_and_nnz_is_exact(begin, end, frequency, power):
    model = model_of([10, 8, 4])
    x, y = data(10, 4)
    pruning = sl.callbacks.GradualPruning(0.2, begin_step=begin, end_step=end, frequency=frequency, power=power)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[pruning])  # 24 steps
    steps = [u["step"] for u in pruning.updates]
    expected_steps = sorted({t for t in range(begin, end + 1) if (t - begin) % frequency == 0} | {end})
    assert steps == expected_steps
    sizes = {"d0": 80, "d1": 32}
    for update in pruning.updates:
        density = formula(update["step"], 0.2, 1.0, begin, end, power)
        assert update["density"] == pytest.approx(density, abs=1e-12)
        for name, size in sizes.items():
            assert by_name(update)[name] == round(density * size)
    # Pruned entries are exactly zero after training; strip_pruning keeps exactly the rest.
    stripped = sl.strip_pruning(model)
    for name, size in sizes.items():
        assert stripped.get_layer(name).pattern.nnz == round(0.2 * size)
        assert np.count_nonzero(model.get_layer(name).values.numpy()) <= round(0.2 * size)
    np.testing.assert_allclose(stripped(x).numpy(), reference_outputs(model, x), atol=1e-5)
    np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), atol=1e-5)


def test_pruned_entries_stay_zero_through_every_step():
    model = model_of([12, 6])
    x, y = data(12, 6)
    layer = model.get_layer("d0")
    pruning = sl.callbacks.GradualPruning(0.25, begin_step=0, end_step=4, frequency=2)
    seen = []

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            mask = sl.evolution_step.pruning_mask(layer)
            seen.append(np.abs(layer.values.numpy()[~mask]).max(initial=0.0))

    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruning, Watch()])
    assert len(seen) == 12 and max(seen) == 0.0
    assert sl.evolution_step.pruning_mask(layer).sum() == round(0.25 * 72)


def test_steps_per_execution_and_jit_compile():
    for kwargs in [{"steps_per_execution": 3}, {"jit_compile": True}]:
        model = model_of([10, 4], **kwargs)
        x, y = data(10, 4)
        pruning = sl.callbacks.GradualPruning(0.3, end_step=9, frequency=3)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruning])  # 12 steps
        assert [u["step"] for u in pruning.updates] == [0, 3, 6, 9]
        layer = model.get_layer("d0")
        mask = sl.evolution_step.pruning_mask(layer)
        assert mask.sum() == 12 and not layer.values.numpy()[~mask].any()


def test_erk_and_global_distributions():
    model = model_of([30, 20, 4], seed=1)
    x, y = data(30, 4)
    erk = sl.callbacks.GradualPruning(0.1, end_step=4, frequency=2, distribution="erk")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[erk])
    final = by_name(erk.updates[-1])
    densities = erk_densities([(30, 20), (20, 4)], 0.1)
    assert final == {"d0": round(densities[0] * 600), "d1": round(densities[1] * 80)}

    model = model_of([30, 20, 4], seed=1)
    glob = sl.callbacks.GradualPruning(0.1, end_step=4, frequency=2, distribution="global")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[glob])
    assert glob.updates[-1]["nnz"] == round(0.1 * 680)
    kept = np.concatenate([sl.evolution_step.pruning_mask(model.get_layer(n)) for n in ("d0", "d1")])
    assert kept.sum() == round(0.1 * 680)


def test_a_second_fit_continues_from_the_kept_entries_and_the_stripped_model_saves_small(tmp_path):
    model = model_of([16, 16])
    x, y = data(16, 16)
    first = sl.callbacks.GradualPruning(0.5, end_step=2, frequency=1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[first])
    second = sl.callbacks.GradualPruning(0.1, end_step=14, frequency=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[second])  # steps 12..24
    # The schedule is a function of the step: d_i is the density of the stored entries (1.0), not the kept 0.5.
    assert [(u["step"], u["density"]) for u in second.updates] == [
        (t, pytest.approx(formula(t, 0.1, 1.0, 0, 14, 3))) for t in (12, 14)
    ]
    assert second.updates[0]["nnz"] == round(formula(12, 0.1, 1.0, 0, 14, 3) * 256)  # within the 128 kept
    stripped = sl.strip_pruning(model)
    assert stripped.get_layer("d0").pattern.nnz == round(0.1 * 256)
    # After fit the mask no longer constrains training: the layer is free again.
    assert model.get_layer("d0").values.constraint is None
    model.save(tmp_path / "full.keras")
    stripped.save(tmp_path / "small.keras")
    assert (tmp_path / "small.keras").stat().st_size < (tmp_path / "full.keras").stat().st_size


def test_strip_pruning_without_a_callback_drops_exact_zeros_and_keeps_names():
    pattern = sl.SparsityPattern.from_edges(["a", "b", "c", "a"], ["u", "u", "v", "v"], inputs=["a", "b", "c"])
    layer = sl.SparseDense(pattern, name="named")
    model = keras.Sequential([keras.Input((3,)), layer, keras.layers.Dense(2, name="head")])
    layer.values.assign([1.0, 0.0, 2.0, 0.0])
    stripped = sl.strip_pruning(model)
    new = stripped.get_layer("named")
    assert new.pattern.nnz == 2 and new.pattern.input_names == ("a", "b", "c")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), atol=1e-6)
    assert type(stripped.get_layer("head")) is keras.layers.Dense


@pytest.mark.parametrize(
    "args, kwargs, error, text",
    [
        ((1.5,), {}, ValueError, r"`final_density` must be a number in \[0, 1\]. Received: final_density=1.5"),
        (("0.1",), {}, ValueError, "`final_density` must be a number in"),
        ((0.1,), {"initial_density": -0.1}, ValueError, "`initial_density` must be a number in"),
        ((0.1,), {"begin_step": -1}, ValueError, "`begin_step` must be >= 0"),
        ((0.1,), {"begin_step": 5, "end_step": 5}, ValueError, "`end_step` must be > begin_step=5. Received: end_step=5"),
        ((0.1,), {"frequency": 0}, ValueError, "`frequency` must be >= 1"),
        ((0.1,), {"frequency": 2.5}, TypeError, "`frequency` must be an integer"),
        ((0.1,), {"power": 0}, ValueError, "`power` must be a number > 0. Received: power=0"),
        ((0.1,), {"distribution": "erdos"}, ValueError, "`distribution` must be one of"),
        ((0.1,), {"layers": "d0"}, TypeError, "`layers` must be a list of layer names"),
    ],
)
def test_bad_arguments_raise_at_construction(args, kwargs, error, text):
    with pytest.raises(error, match=text):
        sl.callbacks.GradualPruning(*args, **kwargs)


def test_bad_models_raise_at_the_start_of_fit():
    x, y = data(6, 2, n=16)
    dense = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    dense.compile(loss="mse")
    with pytest.raises(ValueError, match=r"needs a model with a sparse layer.*sl.sparsify\(model, density=1.0\)"):
        dense.fit(x, y, verbose=0, callbacks=[sl.callbacks.GradualPruning(0.1, end_step=2)])
    model = model_of([6, 2])
    with pytest.raises(ValueError, match=r"`layers` must name sparse layers of the model"):
        model.fit(x, y, verbose=0, callbacks=[sl.callbacks.GradualPruning(0.1, end_step=2, layers=["nope"])])
    with pytest.raises(ValueError, match=r"must be > begin_step=10"):
        model.fit(x, y, verbose=0, callbacks=[sl.callbacks.GradualPruning(0.1, begin_step=10)])


# Resumes, faults and interrupted fits: the mask and the step count are saved state ------------

SCHEDULE = dict(end_step=24, frequency=8)  # updates at 0, 8, 16, 24


def trained_values(model):
    return [w.numpy().copy() for w in model.weights]


def kept_masks(model):
    """Each layer's kept entries, as strip_pruning leaves them (pattern positions)."""
    return [layer.pattern.linear.tolist() for layer in sl.strip_pruning(model).layers]


def save(model, how, folder):
    """Writes ``model`` (optimizer state included) as ``how``; returns what ``load`` reads."""
    if how == "keras":
        model.save(folder / "m.keras")
        return folder / "m.keras"
    if how == "weights":
        model.save_weights(folder / "m.weights.h5")
        return folder / "m.weights.h5"
    return tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(folder / "ckpt"))


def load(how, path):
    if how == "keras":
        return keras.models.load_model(path)
    fresh = model_of([16, 8], seed=5)  # other initial values: all must come from the file
    fresh.optimizer.build(fresh.trainable_variables)
    if how == "weights":
        fresh.load_weights(path)
    else:
        tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).read(path).assert_existing_objects_matched()
    return fresh


@pytest.mark.parametrize("how", ["keras", "weights", "checkpoint"])
def test_a_run_saved_between_two_updates_resumes_exactly(how, tmp_path):
    x, y = data(16, 8, n=80)  # 10 steps per epoch
    fit = dict(batch_size=8, verbose=0, shuffle=False)
    whole = model_of([16, 8])
    whole_pruning = sl.callbacks.GradualPruning(0.2, **SCHEDULE)
    whole.fit(x, y, epochs=3, callbacks=[whole_pruning], **fit)

    model = model_of([16, 8])
    model.fit(x, y, epochs=1, callbacks=[sl.callbacks.GradualPruning(0.2, **SCHEDULE)], **fit)
    path = save(model, how, tmp_path)  # at step 10, between the updates at 8 and 16

    # strip_pruning after a load drops exactly the pruned entries, even a kept value of exactly 0.
    copy = load(how, path)
    layer = copy.get_layer("d0")
    kept = np.flatnonzero(layer.values.numpy())
    assert kept.size == round(formula(8, 0.2, 1.0, 0, 24, 3) * 128)
    layer.values.assign(np.where(np.arange(128) == kept[0], 0.0, layer.values.numpy()))
    assert sl.strip_pruning(copy).get_layer("d0").pattern.linear.tolist() == layer.pattern.linear[kept].tolist()

    loaded = load(how, path)
    resumed = sl.callbacks.GradualPruning(0.2, **SCHEDULE)
    loaded.fit(x, y, epochs=3, initial_epoch=1, callbacks=[resumed], **fit)
    assert [(u["step"], u["nnz"]) for u in resumed.updates if u["step"] > 10] == [
        (u["step"], u["nnz"]) for u in whole_pruning.updates if u["step"] > 10
    ] != []
    assert kept_masks(loaded) == kept_masks(whole)
    for ours, theirs in zip(trained_values(loaded), trained_values(whole)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_steps_per_execution_counts_the_steps_that_ran():
    model = model_of([10, 4], steps_per_execution=4)
    x, y = data(10, 4, n=80)
    pruning = sl.callbacks.GradualPruning(0.3, end_step=48, frequency=5)
    model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[pruning])  # 10 steps per epoch
    assert pruning.step == 50
    # Executions end after steps 4, 8, 10 of each epoch; each runs the last update due within it.
    ends = [10 * epoch + end for epoch in range(5) for end in (4, 8, 10)]
    due = lambda t: t <= 48 and (t % 5 == 0 or t == 48)  # noqa: E731
    expected = [0] + [max(t for t in range(a + 1, b + 1) if due(t)) for a, b in zip([0] + ends, ends)
                      if any(due(t) for t in range(a + 1, b + 1))]
    assert [u["step"] for u in pruning.updates] == expected
    assert [u["density"] for u in pruning.updates] == pytest.approx([formula(t, 0.3, 1.0, 0, 48, 3) for t in expected])


class Crash(keras.callbacks.Callback):
    """Raises at the start of training step ``at`` (counted from 1)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise RuntimeError("crash")


class Stop(keras.callbacks.Callback):
    """Ends fit cleanly after training step ``at``."""

    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            self.model.stop_training = True


def test_a_fit_ended_by_an_exception_leaves_the_layers_as_a_clean_end_does():
    x, y = data(12, 6)
    fit = dict(batch_size=8, verbose=0, shuffle=False)
    models = {}
    for end in ("crash", "stop"):
        model = models[end] = model_of([12, 6])
        pruning = sl.callbacks.GradualPruning(0.25, end_step=4, frequency=2)
        ender = Crash(at=6) if end == "crash" else Stop(at=5)
        try:
            model.fit(x, y, epochs=1, callbacks=[pruning, ender], **fit)
        except RuntimeError:
            pass
        assert pruning.step == 5
    crashed, stopped = models["crash"], models["stop"]
    assert np.count_nonzero(crashed.get_layer("d0").values.numpy()) == round(formula(4, 0.25, 1.0, 0, 4, 3) * 72)
    for model in models.values():  # a plain fit: the pruned entries train again, as after any fit
        model.fit(x, y, epochs=1, **fit)
        model.train_on_batch(x[:8], y[:8])
    assert crashed.get_layer("d0").values.constraint is None
    assert np.count_nonzero(crashed.get_layer("d0").values.numpy()) == 72
    for ours, theirs in zip(trained_values(crashed), trained_values(stopped)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # A later GradualPruning fit leaves the layer's own constraint behind, not a stale mask.
    again = model_of([12, 6])
    with pytest.raises(RuntimeError, match="crash"):
        again.fit(x, y, epochs=1, callbacks=[sl.callbacks.GradualPruning(0.25, end_step=4, frequency=2), Crash(at=6)], **fit)
    before = again.get_layer("d0").values.numpy()
    again.train_on_batch(x[:8], y[:8])  # a step outside the fit: no mask
    assert again.get_layer("d0").values.constraint is None
    assert np.count_nonzero(again.get_layer("d0").values.numpy()) > np.count_nonzero(before)
    again.fit(x, y, epochs=1, callbacks=[sl.callbacks.GradualPruning(0.25, end_step=20, frequency=2)], **fit)
    assert again.get_layer("d0").values.constraint is None


def test_restoring_early_stopping_raises_at_the_start_of_fit():
    # It would restore an earlier epoch's values, nonzero where the final mask has pruned.
    model = model_of([6, 2])
    x, y = data(6, 2, n=16)
    stopping = keras.callbacks.EarlyStopping(monitor="loss", restore_best_weights=True)
    with pytest.raises(ValueError, match=r"GradualPruning cannot run with EarlyStopping\(restore_best_weights=True\)"):
        model.fit(x, y, verbose=0, callbacks=[stopping, sl.callbacks.GradualPruning(0.5, end_step=2)])


def test_a_pruning_mask_of_the_wrong_size_in_a_file_raises(tmp_path):
    model = model_of([12, 6])
    x, y = data(12, 6, n=16)
    model.fit(x, y, batch_size=8, verbose=0, callbacks=[sl.callbacks.GradualPruning(0.25, end_step=1)])
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r+") as f:
        keys = []
        f.visit(lambda name: keys.append(name) if name.endswith("/pruning_mask") else None)
        (key,) = keys
        assert f[key].shape == (9,)  # one bit per entry: 72 entries
        del f[key]
        f.create_dataset(key, data=[255] * 8, dtype="uint8")
    with pytest.raises(ValueError, match=r"Corrupt pruning mask in the weights file: 8 bytes for layer 'd0', whose pattern has nnz=72 \(9 bytes\)"):
        model_of([12, 6]).load_weights(path)
