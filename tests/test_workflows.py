"""Workflows with an evolving pattern: every Keras and TensorFlow way to copy, save and load a model.

One registry of layers (``SETUPS``: a SparseDense per kernel family,
Towers, and a SparseConv2D) and one of pattern changers (``CHANGERS``: RigL, SET, ``sl.sparsify``,
``set_pattern``, and GradualPruning, which changes no pattern but prunes
within it). A module-scoped fixture changes each layer's pattern once
and trains it briefly under two ``ModelCheckpoint`` callbacks; each test is
one workflow. Every workflow must either give the float64 NumPy reference
of the current connections and values, or raise a ValueError naming the
remedy: never a wrong answer without an error. ``RAISES`` lists the
workflows that must raise, so that a change of outcome fails too.
docs/workflows.md is the table of these outcomes.
"""

from __future__ import annotations

import types
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
from tests import reference

INPUT_DIM = 12
UNITS = 8


def _random(density, seed, kernel):
    return lambda: sl.SparseDense(sl.patterns.random((INPUT_DIM, UNITS), density=density, seed=seed), kernel=kernel)


SETUPS = {
    "block": lambda: sl.SparseDense(sl.patterns.block_diagonal([(4, 2), (4, 2), (4, 4)]), kernel="block"),
    "banded": lambda: sl.SparseDense(sl.patterns.banded((INPUT_DIM, UNITS), lower=3, upper=2), kernel="banded"),
    "csr": _random(0.3, 0, "csr"),
    "dense": _random(0.4, 1, "dense"),
    "gather": _random(0.3, 2, "gather"),
    "towers": lambda: sl.Towers(3, hidden_units=[4], output_units=2),
    # A 2x2 convolution over a 2x2x3 image: x.reshape(12) @ W on the pattern's (12, units) view.
    "conv2d": lambda: keras.Sequential([
        keras.layers.Reshape((2, 2, 3)),
        sl.SparseConv2D(sl.patterns.random((INPUT_DIM, UNITS), density=0.3, seed=3), 2),
        keras.layers.Flatten(),
    ]),
}


def _set_pattern(model):
    """A new pattern of the same nnz for every layer that has room, values kept in order."""
    for k, layer in enumerate(sl.sparse_layers(model)):
        n, m = layer.pattern.shape
        if layer.pattern.nnz in (0, n * m):
            continue
        linear = np.sort(np.random.default_rng(100 + k).choice(n * m, layer.pattern.nnz, replace=False))
        layer.set_pattern(sl.SparsityPattern.from_coo(linear // m, linear % m, shape=(n, m)))
    return model


def _sparsify(model):
    # The lowest density of any setup above, so every layer loses entries.
    return sl.sparsify(model, density=0.15)


CHANGERS = {
    "rigl": lambda: sl.callbacks.RigL(update_freq=1, drop_fraction=0.5, seed=0),
    "set": lambda: sl.callbacks.SET(update_freq=1, drop_fraction=0.5, seed=0),
    "sparsify": _sparsify,
    "set_pattern": _set_pattern,
    # Below every setup's density, so every layer loses entries.
    "gradual": lambda: sl.callbacks.GradualPruning(0.1, end_step=4, frequency=1),
}
#: Callbacks that change the pattern during fit.
CALLBACK_CHANGERS = ("rigl", "set", "gradual")
#: sparsify and GradualPruning reach Dense and SparseDense layers, not the layers inside Towers.
CASES = [(setup, changer) for setup in SETUPS for changer in CHANGERS
         if (setup, changer) not in (("towers", "sparsify"), ("towers", "gradual"))]
#: Workflows that must raise ValueError naming the remedy. sparsify changes
#: nnz, so the values no longer fit a model rebuilt from the original config.
RAISES = {(workflow, setup, "sparsify") for workflow in ("weights", "weights_optimizer", "checkpoint",
                                                        "model_checkpoint_weights") for setup in SETUPS}
#: SavedModel export takes seconds: run for one kernel family and Towers.
SAVED_MODEL_SETUPS = ("csr", "towers", "conv2d")


def _chain(layer):
    """The sparse layers of ``layer`` in call order: Towers' tower layers, nested models' layers."""
    if hasattr(layer, "tower_layers"):
        return list(layer.tower_layers)
    if isinstance(layer, sl.SparseKernelLayer):
        return [layer]
    return [inner for outer in getattr(layer, "layers", []) for inner in _chain(outer)]


def snapshot(model):
    """The model's sparse layers in call order, as ``reference.chain`` takes them (numbers copied now)."""
    layers = _chain(model)
    return [
        (layer.pattern, layer.values.numpy().copy(), None if layer.bias is None else layer.bias.numpy().copy(),
         keras.activations.serialize(layer.activation))
        for layer in layers
    ]


class EpochSnapshots(keras.callbacks.Callback):
    """The model at the end of every epoch, and the logged loss."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((logs["loss"], snapshot(self.model)))


def compiled(model):
    # Eager: tracing after every pattern update would cost more than these tiny steps.
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True)
    return model


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def evolved(request, tmp_path_factory):
    """A model whose pattern ``changer`` changed, trained 3 epochs under ModelCheckpoint."""
    setup, changer = request.param
    folder = tmp_path_factory.mktemp(f"{setup}-{changer}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, INPUT_DIM)).astype("float32")
    keras.utils.set_random_seed(0)
    model = compiled(keras.Sequential([keras.Input((INPUT_DIM,)), SETUPS[setup]()]))
    y = rng.normal(size=(16, model.output_shape[-1])).astype("float32")
    initial_config = model.get_config()
    before = [layer.pattern for layer in sl.sparse_layers(model)]
    callbacks = []
    if changer in CALLBACK_CHANGERS:
        callbacks.append(CHANGERS[changer]())
    else:
        model = CHANGERS[changer](model)
    best, weights = str(folder / "best.keras"), str(folder / "last.weights.h5")
    snapshots = EpochSnapshots()
    callbacks += [
        keras.callbacks.ModelCheckpoint(best, monitor="loss", save_best_only=True),
        keras.callbacks.ModelCheckpoint(weights, save_weights_only=True),
        snapshots,
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no room to evolve")  # Towers' dense first layer
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=callbacks)
    after = [layer.pattern for layer in sl.sparse_layers(model)]
    stripped = None
    if changer == "gradual":
        # A kept value of exactly 0: only the pruning mask tells it from a pruned entry.
        layer = sl.sparse_layers(model)[0]
        values = layer.values.numpy()
        values[np.flatnonzero(values)[0]] = 0.0
        layer.values.assign(values)
        stripped = [layer.pattern for layer in sl.sparse_layers(sl.strip_pruning(model))]
        assert [p.nnz for p in stripped] != [p.nnz for p in after], "GradualPruning pruned nothing"
        assert sum(np.count_nonzero(layer.values.numpy()) for layer in sl.sparse_layers(model)) < sum(p.nnz for p in stripped)
    else:
        assert after != before, "the changer changed no pattern"
    losses = [loss for loss, _ in snapshots.epochs]
    return types.SimpleNamespace(
        setup=setup, changer=changer, model=model, x=x, folder=folder, initial_config=initial_config,
        best=best, best_snapshot=snapshots.epochs[losses.index(min(losses))][1],
        weights=weights, last_snapshot=snapshots.epochs[-1][1], stripped=stripped,
    )


def check(evolved, workflow, load, expected=None):
    """``load()``'s output is the reference of ``expected`` (default: the model now), or a ValueError with a remedy."""
    expected = snapshot(evolved.model) if expected is None else expected
    if (workflow, evolved.setup, evolved.changer) in RAISES:
        with pytest.raises(ValueError, match=r"Build the layer with the saved pattern \(for example from the model's config\)"):
            load()
        return
    got = np.asarray(load())
    np.testing.assert_allclose(got, reference.chain(evolved.x, expected), rtol=1e-5, atol=1e-5)


def check_pruning_mask(evolved, loaded):
    """After GradualPruning, ``loaded`` carries the pruning mask: strip_pruning drops exactly the pruned entries."""
    if evolved.stripped is not None:
        assert [layer.pattern for layer in sl.sparse_layers(sl.strip_pruning(loaded))] == evolved.stripped


def initial_model(evolved):
    """A model rebuilt from the config the model had before its pattern changed."""
    return keras.Sequential.from_config(evolved.initial_config)


def test_clone_model_and_set_weights(evolved):
    def load():
        clone = keras.models.clone_model(evolved.model)
        clone.set_weights(evolved.model.get_weights())
        return clone.predict(evolved.x, verbose=0)

    check(evolved, "clone", load)


def test_get_weights_into_a_model_rebuilt_from_get_config(evolved):
    def load():
        rebuilt = keras.Sequential.from_config(evolved.model.get_config())
        rebuilt.set_weights(evolved.model.get_weights())
        return rebuilt(evolved.x)

    check(evolved, "config", load)


def test_keras_file(evolved):
    path = evolved.folder / "m.keras"
    evolved.model.save(path)

    def load():
        loaded = keras.models.load_model(path)
        check_pruning_mask(evolved, loaded)
        return loaded.predict(evolved.x, verbose=0)

    check(evolved, "keras", load)


def test_legacy_h5_file(evolved):
    path = evolved.folder / "m.h5"
    evolved.model.save(path)
    # compile=False: Keras cannot restore the "mse" loss from an h5 file.
    check(evolved, "h5", lambda: keras.models.load_model(path, compile=False)(evolved.x))


def test_weights_file_into_the_original_architecture(evolved):
    path = evolved.folder / "m.weights.h5"
    evolved.model.save_weights(path)

    def load():
        fresh = initial_model(evolved)
        fresh.load_weights(path)
        check_pruning_mask(evolved, fresh)
        return fresh(evolved.x)

    check(evolved, "weights", load)


def test_weights_file_with_a_built_optimizer(evolved):
    path = evolved.folder / "m.weights.h5"
    evolved.model.save_weights(path)
    fresh = compiled(initial_model(evolved))
    fresh.train_on_batch(evolved.x[:2], np.zeros((2, fresh.output_shape[-1]), "float32"))  # builds the optimizer

    def load():
        fresh.load_weights(path)
        check_pruning_mask(evolved, fresh)
        return fresh(evolved.x)

    check(evolved, "weights_optimizer", load)
    if ("weights_optimizer", evolved.setup, evolved.changer) not in RAISES:
        # The optimizer's slots follow the pattern they were saved with.
        for mine, theirs in zip(fresh.optimizer.variables, evolved.model.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_tf_train_checkpoint(evolved):
    path = tf.train.Checkpoint(model=evolved.model).write(str(evolved.folder / "ckpt"))

    def load():
        fresh = initial_model(evolved)
        tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
        check_pruning_mask(evolved, fresh)
        return fresh(evolved.x)

    check(evolved, "checkpoint", load)


def test_saved_model(evolved):
    if evolved.setup not in SAVED_MODEL_SETUPS:
        pytest.skip("SavedModel runs for " + ", ".join(SAVED_MODEL_SETUPS))
    path = str(evolved.folder / "saved_model")
    tf.saved_model.save(evolved.model, path)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    check(evolved, "saved_model", lambda: next(iter(serve(tf.constant(evolved.x)).values())))


def test_model_checkpoint_save_best_only(evolved):
    check(evolved, "model_checkpoint_best",
          lambda: keras.models.load_model(evolved.best).predict(evolved.x, verbose=0), evolved.best_snapshot)


def test_model_checkpoint_save_weights_only(evolved):
    def load():
        fresh = initial_model(evolved)
        fresh.load_weights(evolved.weights)
        return fresh(evolved.x)

    check(evolved, "model_checkpoint_weights", load, evolved.last_snapshot)
