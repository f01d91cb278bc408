import keras
import numpy as np
import pytest

import sparselayers as sl
from tests import reference


def independent_mlps(towers, input_dim):
    """n_towers separate Keras MLPs given the Towers' weights, tower by tower."""
    mlps = []
    for t in range(towers.n_towers):
        layers = [keras.layers.Dense(w, activation=towers.activation) for w in towers.hidden_units]
        layers.append(keras.layers.Dense(towers.output_units, activation=towers.output_activation))
        mlp = keras.Sequential([keras.Input((input_dim,)), *layers])
        mlp.set_weights(towers.tower_weights(t))
        mlps.append(mlp)
    return mlps


@pytest.mark.parametrize(
    "n, hidden, out",
    [(5, [4, 3], 2), (3, [], 1), (1, [6], 3), (7, [2, 2, 2], 1)],
)
def test_towers_equal_independent_dense_mlps(n, hidden, out):
    input_dim = 9
    towers = sl.Towers(n, hidden_units=hidden, output_units=out, activation="tanh")
    x = np.random.default_rng(0).normal(size=(6, input_dim)).astype("float32")
    y = towers(x).numpy()
    assert y.shape == (6, n * out)
    # give biases nonzero values so they are checked too
    for layer in towers.tower_layers:
        layer.bias.assign(np.random.default_rng(1).normal(size=layer.units).astype("float32"))
    y = towers(x).numpy()
    mlps = independent_mlps(towers, input_dim)
    for t, mlp in enumerate(mlps):
        np.testing.assert_allclose(y[:, towers.output_columns(t)], mlp(x).numpy(), rtol=1e-5, atol=1e-5)
    assert towers.count_params() == sum(m.count_params() for m in mlps)


def test_output_layout():
    towers = sl.Towers(3, hidden_units=[2], output_units=2)
    np.testing.assert_array_equal(towers.output_layout(), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(towers.output_columns(2), [4, 5])
    with pytest.raises(ValueError, match="tower"):
        towers.output_columns(3)


def test_towers_save_and_load(tmp_path):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, sl.Towers(4, hidden_units=[3, 3], output_units=2)(inputs))
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    model.save(tmp_path / "towers.keras")
    loaded = keras.models.load_model(tmp_path / "towers.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.count_params() == model.count_params()


def test_towers_train():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 4)).astype("float32")
    y = np.stack([np.sin(x[:, t % 4]) * (t + 1) / 4 for t in range(6)], axis=1).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), sl.Towers(6, hidden_units=[16, 16])])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = model.fit(x, y, epochs=20, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < 0.05 * history.history["loss"][0]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_towers=0), ValueError, "n_towers"),
        (dict(n_towers=2.5), TypeError, "n_towers"),
        (dict(n_towers=2, hidden_units=32), TypeError, "hidden_units"),
        (dict(n_towers=2, hidden_units=[0]), ValueError, "hidden_units"),
        (dict(n_towers=2, output_units=0), ValueError, "output_units"),
    ],
)
def test_bad_towers_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        sl.Towers(**kwargs)


def towers_reference(towers, x):
    """The tower layers as a chain of float64 ``x @ W + b`` with their activations, in NumPy."""
    return reference.chain(x, [
        (layer.pattern, layer.values.numpy(), None if layer.bias is None else layer.bias.numpy(),
         keras.activations.serialize(layer.activation))
        for layer in towers.tower_layers
    ])


def evolved_towers_model():
    """A fitted Sequential holding Towers whose block layers SET has changed."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 6)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), sl.Towers(3, hidden_units=[4, 4], output_units=2)])
    model.compile(optimizer="adam", loss="mse")
    towers = model.layers[0]
    before = [layer.pattern for layer in towers.tower_layers]
    with pytest.warns(UserWarning, match="no room"):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[sl.callbacks.SET(update_freq=2, seed=0)])
    assert any(layer.pattern != old for layer, old in zip(towers.tower_layers, before))
    return model, x


def test_evolved_towers_clone_and_set_weights_is_exact():
    model, x = evolved_towers_model()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    want = towers_reference(model.layers[0], x)
    np.testing.assert_allclose(clone.predict(x, verbose=0), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(clone.layers[0].tower_layers, model.layers[0].tower_layers):
        assert a.pattern == b.pattern


def test_evolved_towers_legacy_h5_is_exact(tmp_path):
    model, x = evolved_towers_model()
    model.save(tmp_path / "m.h5")
    loaded = keras.models.load_model(tmp_path / "m.h5", compile=False)  # Keras cannot restore "mse" from h5
    want = towers_reference(model.layers[0], x)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, rtol=1e-5, atol=1e-5)
