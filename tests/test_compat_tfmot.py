"""sparselayers.compat.tfmot against TFMOT's documented behaviour (tensorflow_model_optimization is not installable on Keras 3)."""

import os
import tempfile
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
import sparselayers.compat.tfmot as tfmot
from sparselayers.compat.tfmot.prune import pruned_layers, pruning_state

K = tfmot.sparsity.keras


def tfmot_polynomial(step, initial, final, begin, end, power, frequency):
    """TFMOT's PolynomialDecay, from its docstring, in float64."""
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    should = begin <= step <= end and (step - begin) % frequency == 0
    return should, final + (initial - final) * (1 - p) ** power


@pytest.mark.parametrize("args", [(0.5, 0.8, 0, 100, 3, 10), (0.1, 0.9, 20, 70, 2, 7), (0.0, 0.5, 5, 6, 1, 1)])
def test_polynomial_decay_is_tfmots_formula(args):
    schedule = K.PolynomialDecay(*args[:4], power=args[4], frequency=args[5])
    for step in [0, 1, 5, 6, 19, 20, 27, 34, 50, 69, 70, 71, 100, 140]:
        should, sparsity = schedule(step)
        want_should, want = tfmot_polynomial(step, *args)
        assert bool(should) == want_should, step
        assert float(sparsity) == pytest.approx(want, abs=1e-6), step


def test_constant_sparsity_steps():
    schedule = K.ConstantSparsity(0.3, begin_step=4, end_step=20, frequency=4)
    for step in range(30):
        should, sparsity = schedule(step)
        assert bool(should) == (4 <= step <= 20 and step % 4 == 0)
        assert float(sparsity) == pytest.approx(0.3)
    forever = K.ConstantSparsity(0.3, begin_step=0, frequency=3)  # end_step=-1: no end
    assert bool(forever(300000)[0]) and not bool(forever(300001)[0])
    again = K.PolynomialDecay.from_config(K.PolynomialDecay(0.2, 0.6, 1, 9).get_config()["config"])
    assert float(again(5)[1]) == pytest.approx(tfmot_polynomial(5, 0.2, 0.6, 1, 9, 3, 100)[1])


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    return x, (x[:, :4] @ rng.normal(size=(4, 3))).astype("float32")


def _mlp():
    return keras.Sequential(
        [keras.Input((12,)), keras.layers.Dense(16, activation="relu", name="h"), keras.layers.Dense(3, name="out")]
    )


def _kernel_zeros(layer):
    kernel = layer.kernel.numpy()
    return np.count_nonzero(kernel == 0), kernel.size


def test_pruned_sparsity_follows_schedule_and_magnitude():
    x, y = _data()
    model = _mlp()
    schedule = K.PolynomialDecay(0.5, 0.8, begin_step=0, end_step=12, frequency=3, power=2)
    pruned = K.prune_low_magnitude(model, pruning_schedule=schedule)
    assert [type(layer).__name__ for layer in pruned.layers] == ["SparseDense", "SparseDense"]
    np.testing.assert_allclose(pruned(x), model(x), rtol=1e-5, atol=1e-5)  # same values before pruning
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[K.UpdatePruningStep()])  # 16 steps
    for layer in pruned_layers(pruned):
        steps = [step for step, _ in pruning_state(layer).history]
        assert steps == [0, 3, 6, 9, 12]
        size = layer.pattern.nnz
        for step, sparsity in pruning_state(layer).history:
            target = tfmot_polynomial(step, 0.5, 0.8, 0, 12, 2, 3)[1]
            assert sparsity == pytest.approx(1 - round(size * (1 - target)) / size)
    stripped = K.strip_pruning(pruned)
    assert [type(layer).__name__ for layer in stripped.layers] == ["Dense", "Dense"]
    np.testing.assert_allclose(stripped(x), pruned(x), rtol=1e-5, atol=1e-6)
    for layer in stripped.layers:
        zeros, size = _kernel_zeros(layer)
        assert zeros == size - round(size * 0.2)
    # The one-line upgrade: the same model as truly sparse layers.
    small = sl.strip_pruning(pruned)
    assert [layer.pattern.nnz for layer in small.layers] == [round(16 * 12 * 0.2), round(16 * 3 * 0.2)]
    np.testing.assert_allclose(small(x), stripped(x), rtol=1e-5, atol=1e-6)


def test_missing_update_pruning_step_raises_tfmots_error():
    x, y = _data(64)
    pruned = K.prune_low_magnitude(_mlp(), pruning_schedule=K.ConstantSparsity(0.5, 0, frequency=1))
    pruned.compile(optimizer="sgd", loss="mse")
    with pytest.raises(tf.errors.InvalidArgumentError, match="requires the UpdatePruningStep callback"):
        pruned.fit(x, y, verbose=0)
    pruned.fit(x, y, verbose=0, callbacks=[K.UpdatePruningStep()])  # then trains with it
    zeros, size = _kernel_zeros(K.strip_pruning(pruned).get_layer("h"))
    assert zeros == size // 2


def test_clone_function_prunes_chosen_layers():
    x, _ = _data(8)
    model = _mlp()

    def apply_pruning(layer):
        if isinstance(layer, keras.layers.Dense) and layer.name == "out":
            return K.prune_low_magnitude(layer)
        return layer

    pruned = keras.models.clone_model(model, clone_function=apply_pruning)
    assert [type(layer).__name__ for layer in pruned.layers] == ["Dense", "SparseDense"]
    assert [layer.name for layer in pruned_layers(pruned)] == ["out"]
    np.testing.assert_allclose(pruned(x), model(x), rtol=1e-5, atol=1e-6)


def _prune_once(layer_model, **params):
    """Prunes at step 0 only and returns the stripped model."""
    x = np.random.default_rng(1).normal(size=(8, *layer_model.input_shape[1:])).astype("float32")
    y = np.zeros((8, *layer_model.output_shape[1:]), "float32")
    pruned = K.prune_low_magnitude(layer_model, **params)
    pruned.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    pruned.fit(x, y, batch_size=8, verbose=0, callbacks=[K.UpdatePruningStep()])
    return K.strip_pruning(pruned)


def test_block_size_prunes_whole_blocks_by_average():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="d")])
    kernel = model.get_layer("d").kernel.numpy()
    stripped = _prune_once(model, pruning_schedule=K.ConstantSparsity(0.5, 0), block_size=(2, 3))
    kept = stripped.get_layer("d").kernel.numpy() != 0
    pooled = np.abs(kernel).reshape(4, 2, 2, 3).mean(axis=(1, 3))  # (8/2) x (6/3) blocks
    want = pooled >= np.sort(pooled, axis=None)[::-1][round(8 * 0.5) - 1]
    np.testing.assert_array_equal(kept, np.kron(want, np.ones((2, 3), bool)))


def test_sparsity_m_by_n_on_dense_and_conv():
    model = keras.Sequential([keras.Input((6, 6, 8)), keras.layers.Conv2D(4, 3, name="c"), keras.layers.Flatten(),
                              keras.layers.Dense(5, name="d")])
    kernels = {name: np.abs(model.get_layer(name).kernel.numpy()) for name in ("c", "d")}
    stripped = _prune_once(model, sparsity_m_by_n=(2, 4))
    assert type(stripped.get_layer("c")) is keras.layers.Conv2D
    for name, magnitude in kernels.items():
        kept = stripped.get_layer(name).kernel.numpy() != 0
        # TFMOT: along the input channels (axis -2), 2 zeros in every 4, the largest two kept.
        groups = np.moveaxis(magnitude, -2, -1).reshape(-1, 4)
        want = groups >= np.sort(groups, axis=1)[:, [2]]
        np.testing.assert_array_equal(np.moveaxis(kept, -2, -1).reshape(-1, 4), want)


def test_pruning_summaries_write_each_layers_sparsity(tmp_path):
    pytest.importorskip("tensorboard")
    x, y = _data(64)
    pruned = K.prune_low_magnitude(_mlp(), pruning_schedule=K.ConstantSparsity(0.75, 0, frequency=1))
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, y, batch_size=32, epochs=2, verbose=0,
               callbacks=[K.UpdatePruningStep(), K.PruningSummaries(log_dir=str(tmp_path))])
    found = {}
    for name in os.listdir(tmp_path / "train"):
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / "train" / name)):
            for value in event.summary.value:
                if value.tag.endswith("/sparsity"):
                    found.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    stripped = K.strip_pruning(pruned)
    for layer in ("h", "out"):
        zeros, size = _kernel_zeros(stripped.get_layer(layer))
        assert [step for step, _ in found[f"{layer}/sparsity"]] == [2, 4]
        assert found[f"{layer}/sparsity"][-1][1] == pytest.approx(zeros / size)


def test_tfmot_tutorial_on_digits(tmp_path):
    """TFMOT's "Pruning in Keras example" with only the import changed, on sklearn's digits."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images, labels = (digits.images / 16.0).astype("float32"), digits.target
    train_images, train_labels, test_images, test_labels = images[:1500], labels[:1500], images[1500:], labels[1500:]
    keras.utils.set_random_seed(0)

    model = keras.Sequential([
        keras.layers.InputLayer(shape=(8, 8)),
        keras.layers.Reshape(target_shape=(8, 8, 1)),
        keras.layers.Conv2D(filters=12, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(train_images, train_labels, epochs=4, validation_split=0.1, verbose=0)
    _, baseline_model_accuracy = model.evaluate(test_images, test_labels, verbose=0)
    keras_file = str(tmp_path / "baseline.h5")
    keras.models.save_model(model, keras_file, include_optimizer=False)

    prune_low_magnitude = tfmot.sparsity.keras.prune_low_magnitude
    batch_size, epochs, validation_split = 128, 2, 0.1
    num_images = train_images.shape[0] * (1 - validation_split)
    end_step = np.ceil(num_images / batch_size).astype(np.int32) * epochs
    pruning_params = {
        "pruning_schedule": tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.50, final_sparsity=0.80, begin_step=0, end_step=end_step
        )
    }
    model_for_pruning = prune_low_magnitude(model, **pruning_params)
    model_for_pruning.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              metrics=["accuracy"])
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    try:
        import tensorboard  # noqa: F401

        callbacks.append(tfmot.sparsity.keras.PruningSummaries(log_dir=str(tmp_path / "logs")))
    except ImportError:
        pass
    model_for_pruning.fit(train_images, train_labels, batch_size=batch_size, epochs=epochs,
                          validation_split=validation_split, callbacks=callbacks, verbose=0)
    _, model_for_pruning_accuracy = model_for_pruning.evaluate(test_images, test_labels, verbose=0)
    model_for_export = tfmot.sparsity.keras.strip_pruning(model_for_pruning)
    pruned_keras_file = str(tmp_path / "pruned.h5")
    keras.models.save_model(model_for_export, pruned_keras_file, include_optimizer=False)

    def get_gzipped_model_size(file):
        zipped_file = file + ".zip"
        with zipfile.ZipFile(zipped_file, "w", compression=zipfile.ZIP_DEFLATED) as f:
            f.write(file)
        return os.path.getsize(zipped_file)

    # The tutorial's count: the fraction of zeros in each kernel of the stripped model, against
    # TFMOT's schedule at the last pruning step of the 2 * 11 steps run (frequency 100: step 0 here).
    steps_run = int(np.ceil(num_images / batch_size)) * epochs
    last = max(t for t in range(steps_run) if tfmot_polynomial(t, 0.5, 0.8, 0, end_step, 3, 100)[0])
    target = tfmot_polynomial(last, 0.5, 0.8, 0, end_step, 3, 100)[1]
    counted = 0
    for layer in model_for_export.layers:
        for weight in layer.weights:
            if "kernel" in weight.name:
                zeros, size = np.count_nonzero(weight.numpy() == 0), weight.numpy().size
                assert zeros == size - round(size * (1 - target))
                counted += 1
    assert counted == 2
    assert [type(layer).__name__ for layer in model_for_export.layers] == [
        type(layer).__name__ for layer in model.layers
    ]
    assert get_gzipped_model_size(pruned_keras_file) < get_gzipped_model_size(keras_file)
    assert model_for_pruning_accuracy > 0.5 and baseline_model_accuracy > 0.5
    np.testing.assert_allclose(model_for_export.predict(test_images, verbose=0),
                               model_for_pruning.predict(test_images, verbose=0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: K.PolynomialDecay(1.0, 0.8, 0, 10), ValueError, "initial_sparsity"),
        (lambda: K.PolynomialDecay(0.5, -0.1, 0, 10), ValueError, "final_sparsity"),
        (lambda: K.PolynomialDecay(0.5, 0.8, 0, -1), ValueError, "end_step"),
        (lambda: K.PolynomialDecay(0.5, 0.8, 10, 10), ValueError, "end_step"),
        (lambda: K.PolynomialDecay(0.5, 0.8, 0, 10.5), TypeError, "end_step"),
        (lambda: K.ConstantSparsity(0.5, -1), ValueError, "begin_step"),
        (lambda: K.ConstantSparsity(0.5, 10, end_step=5), ValueError, "end_step"),
        (lambda: K.ConstantSparsity(0.5, 0, frequency=0), ValueError, "frequency"),
        (lambda: K.prune_low_magnitude("dense"), TypeError, "can only prune"),
        (lambda: K.prune_low_magnitude(_mlp(), block_size=(0, 2)), ValueError, "block_size"),
        (lambda: K.prune_low_magnitude(_mlp(), block_pooling_type="MIN"), ValueError, "block_pooling_type"),
        (lambda: K.prune_low_magnitude(_mlp(), sparsity_m_by_n=(4, 4)), ValueError, "sparsity_m_by_n"),
        (lambda: K.prune_low_magnitude(_mlp(), sparsity_m_by_n=(2, 4), block_size=(2, 2)), ValueError, "block_size"),
        (lambda: K.prune_low_magnitude(_mlp(), pruning_schedule=0.5), TypeError, "pruning_schedule"),
        (lambda: K.prune_low_magnitude(_mlp(), pruning_policy="all"), TypeError, "pruning_policy"),
        (lambda: K.prune_low_magnitude(_mlp(), input_shape=(3,)), TypeError, "input_shape"),
        (lambda: K.prune_low_magnitude(keras.layers.Dense(3)), ValueError, "built layer"),
        (
            lambda: K.prune_low_magnitude(keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(2)])),
            ValueError,
            "supported layer",
        ),
        (lambda: K.strip_pruning(3), TypeError, "to_strip|model"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "layer, shape, dtype",
    [
        (lambda: keras.layers.Embedding(20, 6), (5,), "int32"),
        (lambda: keras.layers.EinsumDense("ab,bc->ac", output_shape=7, bias_axes="c"), (9,), "float32"),
        (lambda: keras.layers.SeparableConv2D(4, 3, activation="relu"), (6, 6, 3), "float32"),
        (lambda: keras.layers.Conv1D(4, 3, padding="same"), (8, 3), "float32"),
    ],
)
def test_strip_pruning_gives_back_each_keras_type(layer, shape, dtype):
    model = keras.Sequential([keras.Input(shape, dtype=dtype), layer()])
    x = np.random.default_rng(0).integers(0, 20, (2, *shape)).astype(dtype)
    pruned = K.prune_low_magnitude(model)
    stripped = K.strip_pruning(pruned)
    assert type(stripped.layers[0]) is type(model.layers[0])
    assert stripped.layers[0].get_config() == model.layers[0].get_config()
    np.testing.assert_allclose(stripped(x), model(x), rtol=1e-6, atol=1e-6)
