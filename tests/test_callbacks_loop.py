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
