"""sl.distribute.data.sharded_batches on one process: rows, files, shuffling, bad input."""

import json
import subprocess
import sys
import textwrap
import types

import h5py
import numpy as np
import pytest

from sparselayers.distribute.data import sharded_batches
from tests.cluster import ENV


def rows_of(dataset):
    return [[part.numpy() for part in batch] for batch in dataset]


def test_batches_are_the_rows_fit_would_batch_without_the_last_partial_one(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(23, 5), dtype=np.int8)  # genotypes 0/1/2
    y = rng.normal(size=(23, 2))
    np.save(tmp_path / "x.npy", x)
    with h5py.File(tmp_path / "y.h5", "w") as file:
        file["y"] = y
    with h5py.File(tmp_path / "y.h5", "r") as file:
        batches = rows_of(sharded_batches(np.load(tmp_path / "x.npy", mmap_mode="r"), file["y"], global_batch_size=4))
    assert len(batches) == 23 // 4
    for k, (xb, yb) in enumerate(batches):
        assert xb.dtype == yb.dtype == np.float32
        np.testing.assert_array_equal(xb, x[4 * k : 4 * k + 4].astype(np.float32))
        np.testing.assert_array_equal(yb, y[4 * k : 4 * k + 4].astype(np.float32))


def test_shuffle_permutes_whole_batches_each_epoch_identically_for_a_seed():
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    dataset = sharded_batches(x, global_batch_size=4, shuffle=True, seed=3)
    epochs = [[int(b.numpy()[0, 0]) // 8 for b in dataset] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(5))
    assert len({tuple(order) for order in epochs}) > 1  # a new order each epoch
    again = sharded_batches(x, global_batch_size=4, shuffle=True, seed=3)
    assert [[int(b.numpy()[0, 0]) // 8 for b in again] for _ in range(3)] == epochs


def test_fit_takes_the_dataset(tmp_path):
    import keras

    x = np.random.default_rng(1).normal(size=(64, 6)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(sharded_batches(x, x[:, :1], global_batch_size=16), epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"x": [[1.0]], "global_batch_size": 1}, TypeError, "`x` must be an array with rows"),
        ({"x": np.zeros((4, 2)), "y": np.zeros((3, 1)), "global_batch_size": 2}, ValueError, "same number of rows"),
        ({"x": np.zeros((4, 2)), "global_batch_size": 5}, ValueError, "Received: global_batch_size=5"),
        ({"x": np.zeros((4, 2)), "global_batch_size": 0}, ValueError, "global_batch_size"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, text):
    with pytest.raises(error, match=text):
        sharded_batches(**kwargs)


def test_batch_size_must_split_over_the_replicas():
    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(ValueError, match="multiple of the 2 replicas in sync. Received: global_batch_size=3"):
        sharded_batches(np.zeros((8, 2)), global_batch_size=3, strategy=two_replicas)


def test_repeat_goes_on_with_the_epochs_a_finite_dataset_gives():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    finite = sharded_batches(x, global_batch_size=4, shuffle=True, seed=5)
    endless = iter(sharded_batches(x, global_batch_size=4, shuffle=True, seed=5, repeat=True))
    for _ in range(3):
        for batch in finite:
            np.testing.assert_array_equal(next(endless).numpy(), batch.numpy())


# Two replicas on one worker (two logical CPUs: device setup is per process, so a fresh one).
_TWO_LOCAL_REPLICAS = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np, tensorflow as tf, keras
    import sparselayers as sl
    from sparselayers.distribute.data import sharded_batches

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rows, batch = map(int, sys.argv[1:])
    x = np.random.default_rng(0).normal(size=(rows, 10)).astype("float32")
    dataset = sharded_batches(x, x @ np.ones((10, 20), "float32"), global_batch_size=batch, strategy=strategy)
    seen = []
    for xb, _ in dataset:
        seen.append(np.concatenate([part.numpy() for part in strategy.experimental_local_results(xb)]).tolist())
    with strategy.scope():
        keras.utils.set_random_seed(0)
        layer = sl.SparseDense(sl.patterns.random((10, 20), density=1.0, seed=0))
        model = keras.Sequential([keras.Input((10,)), layer])
        model.compile(optimizer="sgd", loss="mse")
    steps = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda step, logs: steps.append(step))
    pruning = sl.callbacks.GradualPruning(0.1, frequency=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(dataset, epochs=1, verbose=0, callbacks=[counter, pruning])
    print(json.dumps({
        "cardinality": int(dataset.cardinality), "batches": seen, "fit_steps": len(steps),
        "warnings": [str(w.message) for w in caught if "ran out of data" in str(w.message)],
        "kept": int(np.count_nonzero(layer.values.numpy())), "size": 10 * 20,
    }))
    """
)


def test_two_local_replicas_count_each_global_batch_once():
    rows, batch = 96, 8
    done = subprocess.run(
        [sys.executable, "-c", _TWO_LOCAL_REPLICAS, str(rows), str(batch)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steps = rows // batch
    x = np.random.default_rng(0).normal(size=(rows, 10)).astype("float32")
    assert result["batches"] == [x[k * batch : (k + 1) * batch].tolist() for k in range(steps)]
    assert result["cardinality"] == steps
    assert result["fit_steps"] == steps and not result["warnings"]
    # GradualPruning's default end_step (75% of fit's steps) is reached: the final density.
    assert abs(result["kept"] - 0.1 * result["size"]) <= 1
