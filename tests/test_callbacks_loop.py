"""RigL and SET driven from a custom training loop, and resumed runs, against fit's uninterrupted run."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
from tests.test_callbacks import BATCH, X, Y, build, fit, patterns_of

CALLBACKS = {"SET": sl.callbacks.SET, "RigL": sl.callbacks.RigL}
SCHEDULE = dict(update_freq=2, drop_fraction=0.5, end_step=7, seed=0)


def make_train_step(model):
    """The user's own step: fit's train_step (mean squared error, the model's optimizer), traced."""

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.mean_squared_error(y, model(x, training=True)))
        model.optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return train_step


def batches(epochs=2):
    for _ in range(epochs):
        for start in range(0, len(X), BATCH):
            yield X[start : start + BATCH], Y[start : start + BATCH]


@pytest.mark.parametrize("name", CALLBACKS)
def test_custom_loop_makes_fits_updates(name):
    reference = CALLBACKS[name](**SCHEDULE)
    fitted = fit(build(), reference)

    model = build()
    callback = CALLBACKS[name](**SCHEDULE)
    callback.attach(model)
    train_step = make_train_step(model)
    returned = []
    for x, y in batches():
        train_step(x, y)
        records = callback.after_step(batch=(x, y))
        if records:
            train_step = make_train_step(model)  # the old trace holds the old pattern
        returned += records
    assert callback.step == 8 == reference._step
    assert returned == callback.updates
    assert [(u["step"], u["layer"], u["dropped"], u["new"]) for u in callback.updates] == [
        (u["step"], u["layer"], u["dropped"], u["new"]) for u in reference.updates
    ]
    assert any(u["new"] for u in callback.updates)
    assert patterns_of(model) == patterns_of(fitted)
    for ours, theirs in zip(model.get_weights(), fitted.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_stale_train_step_raises_after_an_update():
    model = build()
    callback = sl.callbacks.SET(**SCHEDULE)
    callback.attach(model)
    train_step = make_train_step(model)
    data = batches()
    for _ in range(2):
        x, y = next(data)
        train_step(x, y)
        records = callback.after_step()
    assert records and records[0]["step"] == 2
    with pytest.raises(tf.errors.InvalidArgumentError, match="changed after this function was traced"):
        train_step(x, y)


def test_attach_and_after_step_check_their_input():
    model = build()
    with pytest.raises(ValueError, match="end_step"):
        sl.callbacks.SET(update_freq=2).attach(model)
    with pytest.raises(TypeError, match="`model` must be a Keras model"):
        sl.callbacks.SET(**SCHEDULE).attach("model")
    uncompiled = keras.Sequential([keras.Input((12,)), sl.SparseDense(sl.patterns.random((12, 3), density=0.3, seed=0))])
    with pytest.raises(ValueError, match="optimizer=None"):
        sl.callbacks.SET(**SCHEDULE).attach(uncompiled)
    with pytest.raises(ValueError, match="attach"):
        sl.callbacks.SET(**SCHEDULE).after_step()
    uncompiled.compile(loss="mse")
    rigl = sl.callbacks.RigL(**SCHEDULE)
    rigl.attach(uncompiled, optimizer=keras.optimizers.SGD())
    assert rigl.after_step() == []
    with pytest.raises(ValueError, match="batch=None"):
        rigl.after_step()


def test_rigl_attach_needs_the_compiled_loss():
    model = keras.Sequential([keras.Input((12,)), sl.SparseDense(sl.patterns.random((12, 3), density=0.3, seed=0))])
    with pytest.raises(ValueError, match=r"model.compile\(optimizer, loss=...\)"):
        sl.callbacks.RigL(**SCHEDULE).attach(model, optimizer=keras.optimizers.SGD())


# Resumed runs: the callbacks' own step count -----------------------------------

RESUME = dict(update_freq=2, drop_fraction=0.5, end_step=14, seed=0)


def update_steps(callback):
    return [(u["step"], u["layer"], u["drop_fraction"]) for u in callback.updates]


def uninterrupted_updates(model, after, total, schedule=RESUME):
    """The updates an uninterrupted run makes after step ``after`` of ``total``, from the formulas."""
    end, f = schedule["end_step"], schedule["drop_fraction"]
    steps = [t for t in range(after + 1, min(total, end - 1) + 1) if t % schedule["update_freq"] == 0]
    paths = [layer.path for layer in sl.callbacks.sparse_dense_layers(model)]
    return [(t, path, pytest.approx(f * (1 + np.cos(np.pi * t / end)) / 2)) for t in steps for path in paths]


@pytest.fixture
def mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy("float32")


def check_resume(optimizer):
    model = build(optimizer())
    fit(model, sl.callbacks.SET(**RESUME), epochs=2)
    assert int(model.optimizer.iterations) != 8  # the optimizer's count is not the step count
    resumed = sl.callbacks.SET(**RESUME)
    fit(model, resumed, epochs=4, initial_epoch=2)
    assert update_steps(resumed) == uninterrupted_updates(model, 8, 16) != []
    assert resumed.step == 16


def test_schedule_resumes_under_gradient_accumulation():
    check_resume(lambda: keras.optimizers.Adam(0.05, gradient_accumulation_steps=4))


def test_schedule_resumes_when_loss_scaling_skips_steps(mixed_float16):
    # Scaled by 2**40, float16 gradients overflow: the LossScaleOptimizer skips steps.
    check_resume(lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05), initial_scale=2.0**40))


@pytest.mark.parametrize("name", CALLBACKS)
def test_schedule_resumes_from_weights_without_optimizer_state(name, tmp_path):
    saving = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.weights.h5"), save_weights_only=True)
    first = build()
    first.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[CALLBACKS[name](**RESUME), saving])
    fresh = build()
    fresh.load_weights(tmp_path / "m.weights.h5")  # an unbuilt Adam: iterations stays 0
    assert int(fresh.optimizer.iterations) == 0
    assert patterns_of(fresh) == patterns_of(first)
    resumed = CALLBACKS[name](**RESUME)
    fit(fresh, resumed, epochs=4, initial_epoch=2)
    assert update_steps(resumed) == uninterrupted_updates(fresh, 8, 16) != []


def test_a_model_trained_without_the_callback_starts_at_zero_and_warns():
    model = build()
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    callback = sl.callbacks.SET(**RESUME)
    with pytest.warns(UserWarning, match="starts its schedule at step 0.*optimizer has run 4 steps"):
        fit(model, callback, epochs=1)
    assert [u[0] for u in update_steps(callback)][::2] == [2, 4]


def test_steps_per_execution_counts_the_steps_that_ran():
    model = build(steps_per_execution=4)
    callback = sl.callbacks.SET(update_freq=7, drop_fraction=0.5, end_step=100, seed=0)
    # batch_size=7: 10 steps per epoch, the last execution of each runs 2 steps, not 4.
    model.fit(X, Y, batch_size=7, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    ran = 2 * -(-len(X) // 7)  # 20 steps ran; Keras reports 24
    assert sorted({u["step"] for u in callback.updates}) == list(range(7, ran + 1, 7))
    assert callback.step == ran


# Faults: BackupAndRestore with an evolving pattern ------------------------------


class Crash(keras.callbacks.Callback):
    """Raises at the start of training step ``at`` (counted from 1), as a lost process would."""

    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise RuntimeError("crash")


@pytest.mark.parametrize("name, jit_compile", [("SET", False), ("RigL", True)])
def test_backup_and_restore_resumes_exactly_after_a_crash_mid_epoch(name, jit_compile, tmp_path):
    schedule = dict(RESUME, update_freq=3)  # updates at 3, 6 | 9, 12: few XLA compilations
    whole = fit(build(jit_compile=jit_compile), CALLBACKS[name](**schedule), epochs=4)
    model = build(jit_compile=jit_compile)

    def run(*extra):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        callback = CALLBACKS[name](**schedule)
        # RigL before the backup: the callback must read the step after the restore.
        model.fit(X, Y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=[callback, backup, *extra])
        return callback

    with pytest.raises(RuntimeError, match="crash"):
        run(Crash(at=11))  # in epoch 3, after the backup of epoch 2 and an update at step 9
    resumed = run()
    assert update_steps(resumed) == uninterrupted_updates(model, 8, 16, schedule) != []
    assert patterns_of(model) == patterns_of(whole)
    for ours, theirs in zip(model.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.isfinite(model.evaluate(X, Y, verbose=0))


@pytest.mark.parametrize("name", CALLBACKS)
def test_restoring_early_stopping_raises_at_the_start_of_fit(name):
    model = build()
    before = [w.copy() for w in model.get_weights()]
    stopping = keras.callbacks.EarlyStopping(monitor="loss", patience=1, restore_best_weights=True)
    with pytest.raises(ValueError, match=r"restore_best_weights=True.*ModelCheckpoint\(path, save_best_only=True\)"):
        model.fit(X, Y, batch_size=BATCH, epochs=4, verbose=0, callbacks=[stopping, CALLBACKS[name](**RESUME)])
    for ours, theirs in zip(model.get_weights(), before):  # nothing trained
        np.testing.assert_array_equal(ours, theirs)
    # Without the restore, EarlyStopping still stops the run.
    callback = CALLBACKS[name](**RESUME)
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[keras.callbacks.EarlyStopping("loss"), callback])
    assert callback.step == 4


def build_family(family):
    """A small model of one kernel family (every SparseDense forced to ``family``), or of Towers."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    if family == "towers":
        outputs = keras.layers.Dense(3)(sl.Towers(3, hidden_units=[4], output_units=2)(inputs))
    else:
        h = sl.SparseDense(sl.patterns.random((12, 10), density=0.3, seed=1), activation="tanh", kernel=family)(inputs)
        outputs = sl.SparseDense(sl.patterns.random((10, 3), density=0.4, seed=2), kernel=family)(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


@pytest.mark.filterwarnings("ignore:.*no room to evolve")  # Towers' first layer connects every input
@pytest.mark.parametrize("family", ["block", "csr", "dense", "gather", "towers"])
def test_backup_and_restore_resumes_every_kernel_family_exactly(family, tmp_path):
    # The workflow matrix's BackupAndRestore row for each kernel family and Towers (SET, graph mode):
    # a crash mid-epoch, then fit again, ends as the uninterrupted run.
    schedule = dict(RESUME, update_freq=3)
    whole = build_family(family)
    whole.fit(X, Y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=[sl.callbacks.SET(**schedule)])
    model = build_family(family)
    assert patterns_of(whole) != patterns_of(model), "SET changed no pattern"

    def run(*extra):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        model.fit(X, Y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
                  callbacks=[sl.callbacks.SET(**schedule), backup, *extra])

    with pytest.raises(RuntimeError, match="crash"):
        run(Crash(at=11))
    run()
    assert patterns_of(model) == patterns_of(whole)
    for ours, theirs in zip(model.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# GradualPruning: the mask and the step count travel with the layers ---------------------------

PRUNING = dict(end_step=14, frequency=3)  # updates at 0, 3, 6 | 9, 12, 14


def pruning_log(callback, after):
    return [(u["step"], u["nnz"], u["layers"]) for u in callback.updates if u["step"] > after]


@pytest.mark.parametrize("order", ["pruning first", "backup first"])
def test_backup_and_restore_resumes_gradual_pruning_exactly(order, tmp_path):
    whole = build()
    whole_pruning = sl.callbacks.GradualPruning(0.1, **PRUNING)
    fit(whole, whole_pruning, epochs=4)
    model = build()

    def run(*extra):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        pruning = sl.callbacks.GradualPruning(0.1, **PRUNING)
        callbacks = [pruning, backup] if order == "pruning first" else [backup, pruning]
        model.fit(X, Y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=[*callbacks, *extra])
        return pruning

    with pytest.raises(RuntimeError, match="crash"):
        run(Crash(at=11))  # in epoch 3: after the backup at step 8 and the update at step 9
    resumed = run()
    assert pruning_log(resumed, 8) == pruning_log(whole_pruning, 8) != []
    assert resumed.step == 16
    for ours, theirs in zip(model.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert [layer.pattern.nnz for layer in sl.strip_pruning(model).layers[1:]] == list(whole_pruning.updates[-1]["layers"].values())
