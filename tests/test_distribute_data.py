"""sl.distribute.data.sharded_batches on one process: rows, files, shuffling, bad input."""

import types

import h5py
import numpy as np
import pytest

from sparselayers.distribute.data import sharded_batches


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
