"""What RigL and SET need so that every worker of a cluster reaches the same pattern.

Under ``tf.distribute.MultiWorkerMirroredStrategy`` each worker runs the
callbacks' drop-and-grow update itself, between two steps. The drop and
SET's draws are functions of the (mirrored) values, the step and the seed,
so they agree once the seed does; RigL's criterion needs the gradient of the
global batch, of which a worker holds only its share. These helpers give
both, by collectives every worker runs in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
import weakref
from typing import Any

import numpy as np
import tensorflow as tf


def multi_worker(strategy: Any) -> bool:
    """Whether ``strategy`` spans several worker processes (a MultiWorkerMirroredStrategy cluster)."""
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


_sums: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_reduce_sum(strategy: Any) -> Callable[[tf.Tensor], tf.Tensor]:
    # Traced once per strategy (and shape): run eagerly, the strategy warns of
    # its overhead at every call.
    if strategy not in _sums:
        local = len(strategy.extended.worker_devices)

        @tf.function(reduce_retracing=True, autograph=False)
        def total(value):
            # Every local replica contributes this worker's value once: the sum
            # over all replicas counts each worker `local` times.
            summed = strategy.reduce("SUM", strategy.run(tf.identity, args=(value,)), axis=None)
            return summed / local if local > 1 else summed

        _sums[strategy] = total
    return _sums[strategy]


def worker_sum(strategy: Any) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """A function that sums a tensor over the workers, or None on one worker.

    Every worker must call it with tensors of the same shapes, in the same
    order: it is a collective.

    Args:
        strategy: the model's distribution strategy.

    Returns:
        ``f(tensor) -> tensor`` summing over workers; None when ``strategy``
        is not a multi-worker strategy (nothing to agree on).

    Example:

    >>> import tensorflow as tf
    >>> from sparselayers.distribute.agreement import worker_sum
    >>> worker_sum(tf.distribute.get_strategy()) is None
    True
    """
    if not multi_worker(strategy):
        return None
    return _all_reduce_sum(strategy)


def global_batch_share(strategy: Any, local_batch: int) -> float:
    """This worker's share of the global batch: ``local_batch / sum over workers``.

    Scaling a worker's gradient of a mean loss by its share and summing over
    workers gives the gradient of the mean loss over the global batch.

    Args:
        strategy: the model's distribution strategy.
        local_batch: the number of examples this worker holds.

    Returns:
        The share in (0, 1]; 1.0 on one worker.
    """
    total = worker_sum(strategy)
    if total is None:
        return 1.0
    global_batch = float(total(tf.constant(float(local_batch), tf.float64)))
    return local_batch / global_batch if global_batch else 0.0


def chief_seed(strategy: Any, seed: int) -> int:
    """The chief's (worker 0's) ``seed`` on every worker.

    A callback created with ``seed=None`` draws its own entropy in each
    process; the workers must draw alike.

    Args:
        strategy: the model's distribution strategy.
        seed: this worker's non-negative seed (any size).

    Returns:
        The chief's seed, reduced to 128 bits; ``seed`` itself on one worker.
    """
    total = worker_sum(strategy)
    if total is None:
        return seed
    chunks = [(seed >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
    if strategy.cluster_resolver.task_id != 0:
        chunks = [0, 0, 0, 0]
    agreed = total(tf.constant(np.array(chunks, np.float64)))  # 32-bit chunks are exact in float64
    return sum(int(chunk) << (32 * i) for i, chunk in enumerate(agreed.numpy()))
