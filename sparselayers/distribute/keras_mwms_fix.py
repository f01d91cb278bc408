"""A narrow workaround that lets ``model.fit`` run under MultiWorkerMirroredStrategy.

Keras 3's TensorFlow trainer fails in ``fit``, ``evaluate`` and
``train_on_batch`` under ``tf.distribute.MultiWorkerMirroredStrategy`` with
any model, ``keras.layers.Dense`` included (keras-team/keras#20585, open
since TF 2.16; also tensorflow/tensorflow#72388), for two reasons in
``keras/src/backend/tensorflow/trainer.py``:

* ``_maybe_symbolic_build`` reduces the first data batch across workers,
  eagerly, with ``strategy.reduce("MEAN", batch, axis=None)``, where only the
  local batch's shapes are needed: ``Attempt to convert a value
  (PerReplica:{...}) with an unsupported type``.
* ``reduce_per_replica`` reduces the step's outputs (the scalar loss and
  metrics) with ``strategy.reduce("MEAN", v, axis=0)``: a scalar has no axis 0.

:func:`install` (run by ``import sparselayers``) replaces these two functions
by wrappers that, under a multi-worker ``MultiWorkerMirroredStrategy`` only,
take the local batch's first replica for the symbolic build and reduce the
outputs with ``axis=None`` (the mean across replicas, what Keras computes
under ``MirroredStrategy``). Under any other strategy, or none, the wrappers
call Keras' own functions unchanged. Each wrapper is installed only if the
installed Keras still contains the faulty call (its source is read at
import), so a Keras release that fixes the bug is left alone. The first time
a wrapper acts, it says so once on the ``sparselayers`` logger, naming the
upstream issue. ``SPARSELAYERS_KERAS_MWMS_FIX=0`` (or ``false``, ``no``,
``off``) in the environment before ``import sparselayers`` turns the
workaround off.

To drop the workaround once Keras is fixed: delete this module and its call
in ``sparselayers/__init__.py``; ``tests/test_multi_worker.py`` then checks
that Keras' own ``fit`` works.

Example:

>>> from sparselayers.distribute import keras_mwms_fix
>>> sorted(keras_mwms_fix.installed())  # with Keras 3.15 and the TF backend
['_maybe_symbolic_build', 'reduce_per_replica']
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import keras

from sparselayers._env import flag

ISSUE = "keras-team/keras#20585"
ENVIRONMENT_VARIABLE = "SPARSELAYERS_KERAS_MWMS_FIX"

_log = logging.getLogger("sparselayers")
_originals: dict[str, Any] = {}
_announced = False

# The calls that fail under MultiWorkerMirroredStrategy, as Keras 3.0 to 3.15 write them.
_FAULTY_REDUCE = 'strategy.reduce("MEAN", v, axis=0)'
_FAULTY_BUILD = "self.distribute_strategy.reduce("


def _trainer_module() -> Any:
    from keras.src.backend.tensorflow import trainer

    return trainer


def _still_faulty(function: Any, faulty: str) -> bool:
    try:
        return faulty in inspect.getsource(function)
    except (OSError, TypeError):  # no source shipped: nothing to check against
        return False


def _announce() -> None:
    global _announced
    if not _announced:
        _announced = True
        _log.warning(
            "sparselayers works around a Keras %s bug so that model.fit runs under "
            "MultiWorkerMirroredStrategy (%s); set %s=0 to turn this off.",
            keras.__version__,
            ISSUE,
            ENVIRONMENT_VARIABLE,
        )


def _multi_worker(strategy: Any) -> bool:
    return _trainer_module()._collective_all_reduce_multi_worker(strategy)


def _reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
    if reduction in ("auto", "mean") and _multi_worker(strategy):
        _announce()
        return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _originals["reduce_per_replica"](values, strategy, reduction)


def _local(value: Any, strategy: Any) -> Any:
    if value is None:
        return None
    import tensorflow as tf

    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
    strategy = self.distribute_strategy
    if iterator is not None and self._distribute_strategy is not None and _multi_worker(strategy):
        _announce()
        for _, _, batches in iterator:  # as Keras does: the first batch, for its shapes
            data_batch = next(batches)
            break
        # Only the shapes matter: this worker's first replica has them.
        data_batch = keras.tree.map_structure(lambda v: _local(v, strategy), data_batch)
        iterator = None
    return _originals["_maybe_symbolic_build"](self, iterator=iterator, data_batch=data_batch)


def installed() -> list[str]:
    """The Keras functions the workaround currently replaces.

    Returns:
        Names among ``"reduce_per_replica"`` and ``"_maybe_symbolic_build"``;
        empty when Keras needs no workaround, the backend is not TensorFlow,
        or ``SPARSELAYERS_KERAS_MWMS_FIX=0`` (or ``false``, ``no``, ``off``)
        was set before import.
    """
    return sorted(_originals)


def install() -> list[str]:
    """Installs the workaround where the installed Keras still needs it.

    Idempotent. Does nothing when ``SPARSELAYERS_KERAS_MWMS_FIX`` is ``0``,
    ``false``, ``no`` or ``off``, or the Keras backend is not TensorFlow.

    Returns:
        The names of the replaced Keras functions, as :func:`installed`.
    """
    if not flag(ENVIRONMENT_VARIABLE, default=True) or keras.backend.backend() != "tensorflow":
        return installed()
    trainer = _trainer_module()
    if "reduce_per_replica" not in _originals and _still_faulty(trainer.reduce_per_replica, _FAULTY_REDUCE):
        _originals["reduce_per_replica"] = trainer.reduce_per_replica
        trainer.reduce_per_replica = _reduce_per_replica
    build = trainer.TensorFlowTrainer._maybe_symbolic_build
    if "_maybe_symbolic_build" not in _originals and _still_faulty(build, _FAULTY_BUILD):
        _originals["_maybe_symbolic_build"] = build
        trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    return installed()


def uninstall() -> None:
    """Puts Keras' own functions back."""
    if not _originals:
        return
    trainer = _trainer_module()
    if "reduce_per_replica" in _originals:
        trainer.reduce_per_replica = _originals.pop("reduce_per_replica")
    if "_maybe_symbolic_build" in _originals:
        trainer.TensorFlowTrainer._maybe_symbolic_build = _originals.pop("_maybe_symbolic_build")
