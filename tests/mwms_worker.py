"""One process of the multi-worker tests (tests/test_multi_worker.py): ``python mwms_worker.py MODE [ARGS]``.

MODE ``single`` trains without a strategy (the reference); ``cluster`` is a
worker of the loopback cluster its ``TF_CONFIG`` names; ``resume BACKUP_DIR
DIE_AT_EPOCH`` is a worker that trains RigL with ``BackupAndRestore`` and, if
it is worker 1 and ``DIE_AT_EPOCH`` > 0, dies at the start of that epoch.
Prints one JSON line.
"""

import json
import logging
import sys


def sparse_model(keras, sl):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32,))
    h = sl.SparseDense(sl.patterns.block_diagonal([(8, 8)] * 4), activation="tanh")(inputs)
    h = sl.SparseDense(sl.patterns.random((32, 16), density=0.2, seed=0), kernel="csr")(h)
    model = keras.Model(inputs, sl.Towers(4, hidden_units=[3])(h))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model


def dense_model(keras, sl):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def state(model, sl):
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "patterns": [layer.pattern.linear.tolist() for layer in sl.callbacks.sparse_dense_layers(model)],
    }


def resume(backup, die_at_epoch, x, y, strategy, tf, keras, sl):
    """Worker 1 dies at the start of epoch ``die_at_epoch`` (0: nobody dies); the others wait."""
    import os
    import time

    task = strategy.cluster_resolver.task_id

    death = os.path.join(backup, "death")

    class Die(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if task == 1 and epoch == die_at_epoch:
                with open(death, "w") as file:
                    file.write(repr(time.time()))
                os._exit(17)  # as a lost machine: no cleanup, no message to the peers

    with strategy.scope():
        model = sparse_model(keras, sl)
    rigl = sl.callbacks.RigL(update_freq=2, drop_fraction=0.3, end_step=14, seed=0)
    # One backup directory per worker: Keras 3 writes it from every worker.
    restore = keras.callbacks.BackupAndRestore(os.path.join(backup, f"worker{task}"))
    try:
        model.fit(x, y, batch_size=64, epochs=4, shuffle=False, verbose=0, callbacks=[restore, rigl, Die()])
    except tf.errors.OpError as error:  # the survivor of a lost peer
        with open(death) as file:
            waited = time.time() - float(file.read())
        print(json.dumps({"error": type(error).__name__, "waited": waited, "message": error.message[:300]}))
        sys.exit(1)
    return {"rigl": {**state(model, sl), "updates": rigl.updates}}


def custom_loop(x, y, strategy, callback, tf, keras, sl):
    """Four epochs of a custom loop (global batch 64) that drives ``callback`` with after_step."""
    with strategy.scope():
        model = sparse_model(keras, sl)
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)
    callback.attach(model, optimizer=optimizer)
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(64))

    def make_step():
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(keras.losses.mean_squared_error(yb, model(xb, training=True))) / 64.0
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return loss

        return tf.function(lambda xb, yb: strategy.reduce("SUM", strategy.run(replica_step, args=(xb, yb)), axis=None))

    step = make_step()
    for _ in range(4):
        for xb, yb in dataset:
            step(xb, yb)
            if callback.after_step(batch=(xb, yb)):
                step = make_step()  # the pattern changed: trace again
    return {**state(model, sl), "updates": callback.updates, "step": callback.step}


class RecordingRows:
    """An array that notes which rows are read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.rows = array, array.shape, array.dtype, set()

    def __getitem__(self, rows):
        self.rows.update(range(*rows.indices(self.shape[0])))
        return self.array[rows]


def from_files(x, y, strategy, keras, sl):
    """fit from an .npy memmap (x) and an HDF5 file (y) through sl.distribute.data.sharded_batches."""
    import os
    import tempfile

    import h5py
    import numpy as np
    from sparselayers.distribute.data import sharded_batches

    folder = tempfile.mkdtemp()
    np.save(os.path.join(folder, "x.npy"), x)
    with h5py.File(os.path.join(folder, "y.h5"), "w") as file:
        file["y"] = y
    inputs = RecordingRows(np.load(os.path.join(folder, "x.npy"), mmap_mode="r"))
    with h5py.File(os.path.join(folder, "y.h5"), "r") as file:
        dataset = sharded_batches(inputs, file["y"], global_batch_size=64, strategy=strategy)
        with strategy.scope():
            model = sparse_model(keras, sl)
        history = model.fit(dataset, epochs=4, verbose=0)
    return {**state(model, sl), "loss": history.history["loss"], "rows": sorted(inputs.rows)}


def main(mode, *args):
    import numpy as np
    import tensorflow as tf
    import keras
    import sparselayers as sl

    records = []
    handler = logging.Handler()
    # The compiled kernels' one-time build messages depend on which process
    # needed the library first: not part of what these runs announce.
    handler.emit = lambda record: None if record.name.startswith("sparselayers.compiled") else records.append(record)
    logging.getLogger("sparselayers").addHandler(handler)
    if mode == "single":
        strategy = tf.distribute.get_strategy()
    else:
        # A collective that waits longer for a peer raises DeadlineExceededError.
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32)).astype("float32")
    y = (np.tanh(x[:, :4]) + 0.1 * rng.normal(size=(256, 4))).astype("float32")
    if mode == "resume":
        print(json.dumps(resume(args[0], int(args[1]), x, y, strategy, tf, keras, sl)))
        return
    result = {}
    runs = {
        "dense": (dense_model, None),
        "sparse": (sparse_model, None),
        "rigl": (sparse_model, sl.callbacks.RigL(update_freq=2, drop_fraction=0.3, end_step=14, seed=0)),
        "set": (sparse_model, sl.callbacks.SET(update_freq=2, drop_fraction=0.3, end_step=14)),  # seed=None
    }
    for name, (build, callback) in runs.items():
        with strategy.scope():
            model = build(keras, sl)
        history = model.fit(x, y, batch_size=64, epochs=4, shuffle=False, verbose=0,
                            callbacks=[callback] if callback else [])
        result[name] = {**state(model, sl), "loss": history.history["loss"]}
        if callback is not None:
            result[name]["updates"] = callback.updates
    for name, callback in {
        "loop rigl": sl.callbacks.RigL(update_freq=2, drop_fraction=0.3, end_step=14, seed=0),
        "loop set": sl.callbacks.SET(update_freq=2, drop_fraction=0.3, end_step=14),  # seed=None
    }.items():
        result[name] = custom_loop(x, y, strategy, callback, tf, keras, sl)
    if mode == "cluster":
        result["pipeline"] = from_files(x, y, strategy, keras, sl)
    result["announcements"] = [r.getMessage() for r in records]
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
