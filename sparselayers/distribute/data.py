"""``tf.data`` input from matrices that do not fit in memory, one shard per worker.

A genotype or count matrix on disk (a NumPy ``.npy`` file opened with
``np.load(path, mmap_mode="r")``, an ``np.memmap``, an ``h5py`` dataset, or
anything with ``shape``, ``dtype`` and row slicing) is read batch by batch:
only the rows of the batches in flight are in memory. Under a
``tf.distribute`` strategy every worker reads only its own rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from sparselayers._validation import check_int


def _check_rows(name: str, array: Any) -> None:
    if not all(hasattr(array, attribute) for attribute in ("shape", "dtype", "__getitem__")) or len(array.shape) < 1:
        raise TypeError(
            f"`{name}` must be an array with rows (np.ndarray, np.memmap, h5py.Dataset). "
            f"Received: {name} of type {type(array).__name__}"
        )


def sharded_batches(
    x: Any,
    y: Any = None,
    *,
    global_batch_size: int,
    strategy: tf.distribute.Strategy | None = None,
    shuffle: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    prefetch: int = 2,
    repeat: bool = False,
) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """Batches of rows of ``x`` (and ``y``) read on demand, each worker reading its own share.

    Global batch ``k`` is rows ``[k * B, (k + 1) * B)`` with
    ``B = global_batch_size``, the batches ``model.fit(x, y, batch_size=B,
    shuffle=False)`` would make, except that the last incomplete batch is
    left out so that every worker runs the same number of steps. Under a
    strategy with ``R`` replicas, replica ``r`` (numbered across workers)
    reads rows ``[k * B + r * B / R, k * B + (r + 1) * B / R)`` of each global
    batch, and nothing else: each worker reads ``1 / workers`` of the data.
    With ``shuffle=True`` the order of the global batches is shuffled every
    epoch from ``seed``, identically on every worker (rows within a batch
    stay together: contiguous reads).

    Args:
        x: the inputs, rows first: ``np.ndarray``, ``np.memmap``,
            ``np.load(path, mmap_mode="r")``, ``h5py.Dataset``.
        y: the targets, as ``x`` with as many rows; None for inputs only.
        global_batch_size: rows per step over all replicas; a multiple of
            the strategy's ``num_replicas_in_sync``.
        strategy: the strategy ``fit`` runs under; None for the current one
            (``tf.distribute.get_strategy()``).
        shuffle: shuffle the order of the batches every epoch.
        seed: the shuffle's seed; the same on every worker.
        dtype: the dtype batches are cast to (the file's dtype is read: an
            ``int8`` genotype file moves 1 byte per entry from disk).
        prefetch: batches read ahead per replica, in a background thread.
        repeat: repeat the epochs forever (shuffled anew each epoch); pass
            ``steps_per_epoch=rows // global_batch_size`` to ``fit``. On a
            cluster this saves a cross-worker check per batch: on a finite
            dataset, every worker's iterator asks the others whether they
            still have data (an all-reduce per step).

    Returns:
        A ``tf.data.Dataset`` of ``(x, y)`` (or ``x``) batches; under a
        strategy with several replicas, the ``DistributedDataset`` of
        ``strategy.distribute_datasets_from_function``. Pass either to
        ``model.fit`` (without ``batch_size``) or iterate it in a custom loop.

    Raises:
        TypeError: ``x`` or ``y`` is not an array with rows.
        ValueError: ``x`` and ``y`` have different numbers of rows, the
            batch size is not a multiple of the replicas, or there are fewer
            rows than one global batch.

    Example:

    >>> import numpy as np
    >>> from sparselayers.distribute.data import sharded_batches
    >>> x = np.arange(20, dtype="int8").reshape(10, 2)
    >>> firsts = [b.numpy()[:, 0].tolist() for b in sharded_batches(x, global_batch_size=4)]
    >>> firsts
    [[0.0, 2.0, 4.0, 6.0], [8.0, 10.0, 12.0, 14.0]]
    """
    _check_rows("x", x)
    arrays = [x]
    if y is not None:
        _check_rows("y", y)
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"`x` and `y` must have the same number of rows. Received: x.shape={tuple(x.shape)}, "
                f"y.shape={tuple(y.shape)}"
            )
        arrays.append(y)
    batch = check_int(global_batch_size, "global_batch_size", minimum=1)
    prefetch = check_int(prefetch, "prefetch", minimum=0)
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch % replicas:
        raise ValueError(
            f"`global_batch_size` must be a multiple of the {replicas} replicas in sync. "
            f"Received: global_batch_size={batch}"
        )
    steps = int(x.shape[0]) // batch
    if steps == 0:
        raise ValueError(
            f"`global_batch_size` must be at most the number of rows ({x.shape[0]}). "
            f"Received: global_batch_size={batch}"
        )
    per_replica = batch // replicas
    out_dtype = tf.as_dtype(dtype)

    def pipeline(first_replica: int, local_replicas: int) -> tf.data.Dataset:
        def read(start: np.int64) -> list[np.ndarray]:
            return [np.asarray(array[int(start) : int(start) + per_replica]) for array in arrays]

        def load(k: tf.Tensor, r: tf.Tensor) -> Any:
            start = k * batch + (first_replica + r) * per_replica
            parts = tf.numpy_function(read, [start], [tf.as_dtype(np.dtype(a.dtype)) for a in arrays], stateful=False)
            parts = [
                tf.cast(tf.ensure_shape(part, (per_replica, *a.shape[1:])), out_dtype)
                for part, a in zip(parts, arrays)
            ]
            return tuple(parts) if len(parts) > 1 else parts[0]

        order = tf.data.Dataset.range(steps)
        if shuffle:
            order = order.shuffle(steps, seed=seed, reshuffle_each_iteration=True)
        # Each global batch: this worker's replicas' shares, one after the other.
        pairs = order.flat_map(lambda k: tf.data.Dataset.range(local_replicas).map(lambda r: (k, r)))
        # flat_map hides the length, which fit needs to count its steps.
        pairs = pairs.apply(tf.data.experimental.assert_cardinality(steps * local_replicas))
        if repeat:
            pairs = pairs.repeat()
        return pairs.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            prefetch * local_replicas
        )

    if replicas == 1:
        return pipeline(0, 1)

    local_replicas = []

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = replicas // context.num_input_pipelines
        local_replicas.append(local)
        return pipeline(context.input_pipeline_id * local, local)

    distributed = strategy.distribute_datasets_from_function(per_worker)
    if not repeat and local_replicas:
        _count_steps_not_shares(distributed, steps, local_replicas[0])
    return distributed


def _count_steps_not_shares(distributed: Any, steps: int, local_replicas: int) -> None:
    """Makes ``distributed.cardinality`` the number of steps, which ``fit`` reads.

    TensorFlow reports the element count of a worker's dataset, which holds
    one share per local replica for each step: with 2 replicas on a worker,
    twice the steps. ``fit`` would then run past the end of the data ("ran
    out of data"), and callbacks that default to a fraction of ``fit``'s
    steps (RigL's and GradualPruning's ``end_step``) would never get there.
    The count is only reported: iteration ends with the data either way, and
    TF's iterator only asks whether the count is 0 or infinite, which stays
    as it was. A TensorFlow that counts steps already is left alone.
    """
    if getattr(distributed, "_cardinality", None) == steps * local_replicas != steps:
        distributed._cardinality = np.int64(steps)
