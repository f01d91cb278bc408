"""The machinery RigL and SET share: schedule, drop, grow, optimizer slots, the fit hooks."""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers import evolution_step
from sparselayers._validation import _short, check_int, check_layer_names
from sparselayers.callbacks.fan_in import drop_within_units, unit_counts
from sparselayers.distribute import agreement
from sparselayers.pattern_state import reset_compiled_functions
from sparselayers.sparse_kernel import SparseKernelLayer, sparse_layers
from sparselayers.sparsity_pattern import SparsityPattern


def cosine_drop_fraction(step: int, drop_fraction: float, end_step: int) -> float:
    """The fraction of entries an update at ``step`` moves (RigL's cosine decay).

    Args:
        step: the training step of the update.
        drop_fraction: the fraction at step 0.
        end_step: the step from which nothing moves.

    Returns:
        ``drop_fraction * (1 + cos(pi * step / end_step)) / 2`` before
        ``end_step``, 0 from it on.

    Example:

    >>> from sparselayers.callbacks import cosine_drop_fraction
    >>> tuple(round(cosine_drop_fraction(t, 0.3, 100), 4) for t in (0, 50, 100, 150))
    (0.3, 0.15, 0.0, 0.0)
    """
    if step >= end_step:
        return 0.0
    return drop_fraction * (1.0 + math.cos(math.pi * step / end_step)) / 2.0


def random_positions(
    shape: tuple[int, int], taken: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` distinct positions drawn uniformly among those not in ``taken``.

    Draws ranks among the free positions and maps each rank to its position,
    so the dense mask is never built.

    Args:
        shape: ``(input_dim, units)``.
        taken: sorted row-major positions to avoid.
        n: how many to draw, at most the number of free positions.
        rng: the NumPy Generator to draw from.

    Returns:
        Sorted int64 row-major positions.
    """
    free = shape[0] * shape[1] - taken.size
    ranks = np.sort(rng.choice(free, size=n, replace=False))
    # Free rank r sits at r + (number of taken positions before it): taken[j] - j
    # counts the free positions before taken[j].
    return ranks + np.searchsorted(taken - np.arange(taken.size), ranks, side="right")


def input_gradient_tile(x: tf.Tensor | tf.SparseTensor, dy: tf.Tensor) -> tf.Tensor:
    """``x.T @ dy``: a tile of the dense kernel gradient, for a dense or sparse layer input ``x``.

    An embedding's input is the one-hot matrix of its ids, ``(batch,
    input_dim)``, a ``tf.SparseTensor`` that is never densified.
    """
    if isinstance(x, tf.SparseTensor):
        return tf.sparse.sparse_dense_matmul(x, dy, adjoint_a=True)
    return tf.matmul(x, dy, transpose_a=True)


def top_gradient_positions(
    x: tf.Tensor,
    dy: tf.Tensor,
    kept: np.ndarray,
    n: int,
    tile_elements: int,
    tile_sum: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> np.ndarray:
    """Up to ``n`` positions outside ``kept`` where ``|x.T @ dy|`` is largest and nonzero.

    Scores column tiles of ``x.T @ dy`` with a running top-``n``, so at most
    ``max(tile_elements, input_dim)`` gradient entries exist at once.

    Args:
        x: ``(batch, input_dim)`` float32 layer input (dense, or a ``tf.SparseTensor``).
        dy: ``(batch, units)`` float32 gradient of the loss at ``x @ W``.
        kept: sorted row-major positions never chosen.
        n: how many positions to choose at most.
        tile_elements: gradient entries per tile (at least one column).
        tile_sum: sums a tile of ``x.T @ dy`` over the workers of a cluster
            (:func:`sparselayers.distribute.agreement.worker_sum`), so
            every worker scores the global gradient; None on one worker.

    Returns:
        Sorted int64 row-major positions: the ``n`` best, fewer if fewer
        have a nonzero gradient; equal scores go to the lower position.
    """
    input_dim, units = int(x.shape[1]), int(dy.shape[1])
    width = max(1, tile_elements // input_dim)
    kept_rows, kept_cols = np.divmod(kept, units)
    by_col = np.argsort(kept_cols, kind="stable")
    sorted_cols = kept_cols[by_col]
    best_scores = np.zeros(0, np.float32)
    best = np.zeros(0, np.int64)
    for start in range(0, units, width):
        stop = min(units, start + width)
        tile = input_gradient_tile(x, dy[:, start:stop])
        tile = tf.abs(tile if tile_sum is None else tile_sum(tile))
        lo, hi = np.searchsorted(sorted_cols, [start, stop])
        inside = by_col[lo:hi]
        if inside.size:
            where = np.stack([kept_rows[inside], kept_cols[inside] - start], axis=1)
            tile = tf.tensor_scatter_nd_update(tile, where, tf.zeros(inside.size, tile.dtype))
        # top_k puts the lower index first among equal values, and the tile's
        # flat order is the row-major order of its positions.
        scores, flat = tf.math.top_k(tf.reshape(tile, [-1]), k=min(n, input_dim * (stop - start)))
        scores, flat = scores.numpy(), flat.numpy().astype(np.int64)
        positive = scores > 0
        rows, cols = np.divmod(flat[positive], stop - start)
        best_scores = np.concatenate([best_scores, scores[positive]])
        best = np.concatenate([best, rows * units + start + cols])
        order = np.lexsort((best, -best_scores))[:n]
        best_scores, best = best_scores[order], best[order]
    return np.sort(best)


def optimizer_slots(optimizer: Any, variable: Any) -> list[Any]:
    """The optimizer variables that shadow ``variable`` entry by entry (moments, momentum, ...).

    Keras optimizers keep one list per kind of state, indexed like their
    trainable variables (``_momentums[i]`` belongs to variable ``i``); any
    such list of optimizer variables is found, whatever the optimizer.

    Args:
        optimizer: a Keras optimizer (a ``LossScaleOptimizer`` is unwrapped).
        variable: one of the variables it trains.

    Returns:
        The optimizer's variables of ``variable``'s shape that belong to it;
        empty before the optimizer is built or if it does not train it.
    """
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    if optimizer is None or not optimizer.built:
        return []
    try:
        index = optimizer._get_variable_index(variable)
    except KeyError:
        return []
    owned = {id(v) for v in optimizer.variables}
    count = len(optimizer._trainable_variables)
    slots = []
    for name, value in vars(optimizer).items():
        if name in ("_variables", "_trainable_variables") or not isinstance(value, (list, tuple)):
            continue
        if len(value) != count:
            continue
        slot = value[index]
        if slot is not None and id(slot) in owned and tuple(slot.shape) == tuple(variable.shape):
            if all(slot is not other for other in slots):
                slots.append(slot)
    return slots


class _RecordingKernel:
    """A layer's kernel that also keeps its input and (watched) output."""

    def __init__(self, kernel: Any, calls: list, tape: tf.GradientTape):
        self._kernel, self._calls, self._tape = kernel, calls, tape

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)

    def __call__(self, x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        y = self._kernel(x, values)
        self._tape.watch(y)
        self._calls.append((x, y))
        return y


@contextlib.contextmanager
def _recording(layers: list[SparseKernelLayer], tape: tf.GradientTape) -> Iterator[dict[int, list]]:
    """Within this block, every call of ``layers`` records ``(x, x @ W)``.

    Wraps the layer's kernel-choice seam, per instance, so the layer's own
    ``call`` runs unchanged.
    """
    calls: dict[int, list] = {id(layer): [] for layer in layers}
    for layer in layers:
        choose = layer._select_kernel

        def recording_choice(*args, choose=choose, record=calls[id(layer)]):
            return _RecordingKernel(choose(*args), record, tape)

        object.__setattr__(layer, "_select_kernel", recording_choice)
    try:
        yield calls
    finally:
        for layer in layers:
            object.__delattr__(layer, "_select_kernel")


def _check_fraction(drop_fraction: Any) -> float:
    if isinstance(drop_fraction, (bool, np.bool_)) or not isinstance(drop_fraction, numbers.Real):
        raise TypeError(
            f"`drop_fraction` must be a number in [0, 1). Received: drop_fraction={_short(drop_fraction)}"
        )
    if not 0.0 <= float(drop_fraction) < 1.0:
        raise ValueError(f"`drop_fraction` must be in [0, 1). Received: drop_fraction={drop_fraction}")
    return float(drop_fraction)


def _retrace_if_patterns_changed(model: keras.Model) -> None:
    """Rebuilds the model's compiled functions if a pattern changed since they were last rebuilt here.

    Keras keeps a traced train function across ``fit`` calls; one traced
    before a pattern change (a RigL update, a backup loaded by
    ``BackupAndRestore`` inside ``fit``) would raise, or with
    ``jit_compile=True`` compute NaN. Rebuilding only on a change keeps
    the batch-recording wrappers other callbacks installed on the current one.
    """
    versions = tuple(getattr(getattr(layer, "_state", None), "_python_version", None) for layer in sparse_layers(model))
    if getattr(model, "_sparselayers_pattern_versions", None) != versions:
        reset_compiled_functions(model)
        object.__setattr__(model, "_sparselayers_pattern_versions", versions)


def fit_callback_list(frame: Any, depth: int = 4) -> keras.callbacks.CallbackList | None:
    """The Keras ``CallbackList`` of the ``fit`` running at ``frame`` or up to ``depth`` frames above it.

    Found as the ``self`` of a ``CallbackList`` hook, or as ``fit``'s local
    ``callbacks``; None if neither is there.
    """
    for _ in range(depth):
        if frame is None:
            return None
        local = frame.f_locals
        for name in ("self", "callbacks"):
            if isinstance(local.get(name), keras.callbacks.CallbackList):
                return local[name]
        frame = frame.f_back
    return None


class _StepCounting(keras.callbacks.Callback):
    """A callback that counts training steps on its layers (:mod:`sparselayers.evolution_step`).

    The count continues across fits, files, checkpoints and ``BackupAndRestore``:
    it is read from the layers at the first step of ``fit`` (after any
    restore), follows the steps that ran under ``steps_per_execution``, and
    is written back to the layers after every step. Subclasses select
    ``_layers`` and ``_end`` in :meth:`_start` and act on the count.
    """

    def __init__(self) -> None:
        super().__init__()
        self._layers: list[SparseKernelLayer] = []
        self._in_fit = False
        self._optimizer = None
        self._step = 0
        self._first_batch = False

    @property
    def step(self) -> int:
        """Training steps counted so far (``fit``'s steps; for RigL and SET also :meth:`after_step` calls)."""
        return self._step

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._refuse_restoring_early_stopping()
        self._in_fit = True
        self._first_batch = True
        self._optimizer = None
        self._start()

    def _refuse_restoring_early_stopping(self) -> None:
        """Raises if an ``EarlyStopping(restore_best_weights=True)`` runs in the same ``fit``.

        It restores with ``model.set_weights``: values without their
        pattern or pruning mask, so an earlier epoch's values would land on
        today's connections. The callbacks of this ``fit`` are found on the
        Keras ``CallbackList`` that calls this hook.
        """
        siblings = fit_callback_list(sys._getframe(1))
        if siblings is None:
            return
        for callback in siblings.callbacks:
            if isinstance(callback, keras.callbacks.EarlyStopping) and callback.restore_best_weights:
                raise ValueError(
                    f"{type(self).__name__} cannot run with EarlyStopping(restore_best_weights=True): Keras restores "
                    "the best epoch's values with model.set_weights, which carries no pattern and no pruning mask, "
                    "so they would be paired with the connections and mask of a later epoch. Keep the best model with "
                    "keras.callbacks.ModelCheckpoint(path, save_best_only=True) (a .keras or .weights.h5 path: "
                    "it carries the pattern) and load it after fit; EarlyStopping(restore_best_weights=False) "
                    "may still stop the run."
                )

    def _start(self) -> None:
        """Selects ``_layers`` and ``_end`` (subclasses), and warns where the count cannot follow the steps."""
        execution = getattr(self.model, "steps_per_execution", 1)
        if self._in_fit and execution > 1 and self.params.get("steps") is None:
            warnings.warn(
                f"{type(self).__name__} cannot tell how many steps the last execution of an epoch runs when fit "
                f"does not know the steps per epoch (steps_per_execution={execution}), so its step count may run "
                "ahead of the steps run. Pass steps_per_epoch to fit, or compile with steps_per_execution=1.",
                stacklevel=4,
            )

    def _read_step(self) -> None:
        """Continues the count the layers carry (restored with them from a file or checkpoint)."""
        self._step = max(evolution_step.get(layer) for layer in self._layers)
        optimizer = self._training_optimizer()
        iterations = 0 if optimizer is None else int(keras.ops.convert_to_numpy(optimizer.iterations))
        if self._step == 0 and iterations > 0:
            name = type(self).__name__
            warnings.warn(
                f"{name} starts its schedule at step 0: the layers carry no step count, while "
                f"the optimizer has run {iterations} steps. That is right for a model trained so far without "
                f"{name}. To continue an earlier run instead, restore the model from a file or "
                "checkpoint that carries the count (.keras, .weights.h5, tf.train.Checkpoint, written by this "
                "version of sparselayers).",
                stacklevel=3,
            )

    def _resume(self) -> None:
        """At the first step of ``fit``: continue from the state the layers carry."""
        self._read_step()
        _retrace_if_patterns_changed(self.model)

    def _count_steps(self, steps: int) -> None:
        self._step += steps
        for layer in self._layers:
            evolution_step.set_step(layer, self._step)

    def _training_optimizer(self) -> Any:
        return self._optimizer if self._optimizer is not None else getattr(self.model, "optimizer", None)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._first_batch:
            # Read here, not at the start of fit: BackupAndRestore, wherever
            # it stands among the callbacks, has restored the backup by now.
            self._first_batch = False
            self._resume()
        self._batch_begin = batch

    def _count_batch(self, batch: int) -> int:
        """Counts the steps of the execution that ended at ``batch``; returns the count before them."""
        previous = self._step
        self._count_steps(self._steps_run(self._batch_begin, batch))
        return previous

    def _steps_run(self, begin: int, end: int) -> int:
        """Steps an execution of batches ``begin..end`` runs.

        Keras reports a full execution even when the epoch's last one runs
        fewer steps.
        """
        steps = self.params.get("steps")
        return (end if steps is None else min(end, steps - 1)) - begin + 1


class _DynamicSparsity(_StepCounting):
    """Drop-and-grow updates of sparse layers' patterns; subclasses choose where to grow."""

    #: Whether updates need the batch of the step (RigL's gradient).
    _needs_batch = False
    #: Drop and grow within each output unit (set by RigL's and SET's ``constant_fan_in``).
    constant_fan_in = False

    def __init__(
        self,
        update_freq: int = 100,
        drop_fraction: float = 0.3,
        end_step: int | None = None,
        layers: Sequence[str] | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        self.update_freq = check_int(update_freq, "update_freq", minimum=1)
        self.drop_fraction = _check_fraction(drop_fraction)
        self.end_step = None if end_step is None else check_int(end_step, "end_step", minimum=1)
        self.layer_names = check_layer_names(layers)
        self.seed = None if seed is None else check_int(seed, "seed", minimum=0)
        # Every draw is a function of (seed, step, layer), so a resumed run
        # draws what the uninterrupted run would have.
        self._seed = self.seed if seed is not None else np.random.SeedSequence().entropy
        self.updates: list[dict[str, Any]] = []
        self._batch = None
        self._recording_batch = False

    def drop_fraction_at(self, step: int) -> float:
        """The fraction of each layer's entries moved by an update at ``step``."""
        return cosine_drop_fraction(step, self.drop_fraction, self._end_step())

    def _end_step(self) -> int:
        if self.end_step is not None:
            return self.end_step
        if not self.params:
            raise ValueError(
                f"`end_step` is needed to drive {type(self).__name__} from a custom training loop. "
                "Received: end_step=None"
            )
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        if steps is None or epochs is None:
            raise ValueError(
                "`end_step` is needed when fit cannot tell its number of steps. "
                f"Received: end_step=None with steps per epoch={steps}; pass end_step or steps_per_epoch"
            )
        return max(1, int(0.75 * steps * epochs))

    # Layers ----------------------------------------------------------------

    def _select_layers(self) -> list[SparseKernelLayer]:
        name = type(self).__name__
        found = sparse_layers(self.model)
        if not found:
            raise ValueError(
                f"{name} needs a model with a sparse layer; model '{self.model.name}' has none."
            )
        if self.layer_names is not None:
            names = set(self.layer_names)
            chosen = [layer for layer in found if layer.name in names or layer.path in names]
            known = {layer.name for layer in found} | {layer.path for layer in found}
            missing = [n for n in self.layer_names if n not in known]
            if missing:
                raise ValueError(
                    "`layers` must name sparse layers of the model. "
                    f"Received: layers={self.layer_names} ({missing} not found; "
                    f"available: {sorted(layer.path for layer in found)})"
                )
        else:
            chosen = found
        evolving = []
        for layer in chosen:
            total = layer.pattern.shape[0] * layer.pattern.shape[1]
            if 0 < layer.pattern.nnz < total:
                evolving.append(layer)
                continue
            reason = f"layer '{layer.path}' has nnz={layer.pattern.nnz} of {total} positions, no room to evolve"
            if self.layer_names is not None:
                raise ValueError(
                    f"`layers` must name layers that can evolve. Received: layers={self.layer_names} ({reason})"
                )
            warnings.warn(f"{name} leaves {reason}.", stacklevel=3)
        if not evolving:
            raise ValueError(
                f"{name} found no sparse layer that can evolve in model '{self.model.name}'."
            )
        return evolving

    # Keras hooks -------------------------------------------------------------

    def _start(self) -> None:
        self._layers = self._select_layers()
        self._end = self._end_step()
        # Workers of a cluster draw alike only from one seed: the chief's.
        self._seed = agreement.chief_seed(self.model.distribute_strategy, self._seed)
        super()._start()

    # Custom training loops ----------------------------------------------------

    def attach(self, model: keras.Model, optimizer: Any = None) -> None:
        """Prepares the callback to be driven by :meth:`after_step` from a custom training loop.

        Args:
            model: the model whose sparse layers evolve.
            optimizer: the optimizer that trains it; default
                ``model.optimizer``. Its state (moments, momentum) follows
                each connection that an update moves.

        Raises:
            TypeError: ``model`` is not a Keras model or layer.
            ValueError: no optimizer, no ``end_step``, or no sparse
                layer that can evolve (as at the start of ``fit``).
        """
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"`model` must be a Keras model. Received: model={_short(model)}")
        if optimizer is None and getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"{type(self).__name__}.attach needs the optimizer that trains the model, so that its state "
                "follows the connections an update moves. Received: optimizer=None and model.optimizer=None; "
                "pass attach(model, optimizer=...)"
            )
        self._in_fit = False
        self.set_params({})  # no fit: no steps to take end_step from
        self.set_model(model)
        self._optimizer = optimizer
        self._start()
        self._read_step()

    def after_step(self, batch: Any = None) -> list[dict[str, Any]]:
        """Counts one training step of a custom loop; at an update step, drops and grows.

        Call it after each step of the loop, once :meth:`attach` prepared the
        callback. An update changes the patterns, so a ``tf.function`` traced
        before it is stale (it raises, or returns NaN with
        ``jit_compile=True``): trace the step again when the returned list is
        not empty.

        Args:
            batch: the step's batch ``(x, y)`` or ``(x, y, sample_weight)``;
                RigL scores its gradient at the weights after the step, SET
                ignores it.

        Returns:
            The update records of this step (see ``updates``), empty when the
            step is not an update step.

        Raises:
            ValueError: called before :meth:`attach`, or RigL without
                ``batch`` at an update step.

        Example:

        >>> import keras, numpy as np, tensorflow as tf, sparselayers as sl
        >>> model = keras.Sequential([keras.Input((8,)), sl.SparseDense(sl.patterns.random((8, 4), density=0.5, seed=0))])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> set_ = sl.callbacks.SET(update_freq=3, drop_fraction=0.5, end_step=10, seed=0)
        >>> set_.attach(model)
        >>> x, y = np.ones((2, 8), "float32"), np.zeros((2, 4), "float32")
        >>> for _ in range(6):
        ...     _ = model.train_on_batch(x, y)  # or your own step (trace it again after an update)
        ...     records = set_.after_step(batch=(x, y))
        ...     if records:
        ...         print(set_.step, [(r["dropped"], r["new"] > 0) for r in records])
        3 [(6, True)]
        6 [(3, True)]
        """
        if self._in_fit or not self._layers:
            raise ValueError(
                f"{type(self).__name__}.after_step needs {type(self).__name__}.attach(model) first "
                "(and is not for fit, where the callback counts steps itself)."
            )
        previous = self._step
        self._count_steps(1)
        step = self._update_step(self._step, previous)
        if not step:
            return []
        if self._needs_batch and batch is None:
            raise ValueError(
                f"{type(self).__name__}.after_step needs the step's batch at update step {step}: "
                "after_step(batch=(x, y)). Received: batch=None"
            )
        first = len(self.updates)
        self._batch = batch
        try:
            self._update(step)
        finally:
            self._batch = None
        return self.updates[first:]

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        super().on_train_batch_begin(batch, logs)
        last = batch + self.model.steps_per_execution - 1
        coming = self._update_step(self._step + self._steps_run(batch, last), self._step)
        self._recording_batch = self._needs_batch and coming > 0
        if self._needs_batch:
            self._wrap_train_function()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        previous = self._count_batch(batch)
        step = self._update_step(self._step, previous)
        if step:
            self._update(step)
        self._batch = None

    def on_train_end(self, logs: dict | None = None) -> None:
        self._in_fit = False
        self._unwrap_train_function()
        self._batch = None
        self._recording_batch = False

    def _update_step(self, last: int, previous: int) -> int:
        """The latest update step in ``(previous, last]``, or 0."""
        last = min(last, self._end - 1)
        step = last - last % self.update_freq
        return step if step > previous else 0

    def _wrap_train_function(self) -> None:
        """Makes ``model.train_function`` keep the batch of recording steps.

        Wraps again whenever the function was rebuilt (by this callback's
        update or another's); wrappers of several callbacks nest.
        """
        function = self.model.train_function
        while function is not None:
            if getattr(function, "_recorder", None) is self:
                return
            function = getattr(function, "__wrapped__", None)

        def train_function(iterator):
            inner = train_function.__wrapped__
            # Outside this callback's fit (one that ended with an exception
            # skips on_train_end), the wrapper only passes through.
            if not self._in_fit or (self.model.steps_per_execution > 1 and not self._recording_batch):
                return inner(iterator)
            # A list of batches takes Keras' path for Python iterables: the
            # same compiled one-step function, called once per batch. With one
            # step per execution every step takes it, so that an update
            # retraces one function, not this and the multi-step one.
            batches = list(itertools.islice(iter(iterator), self.model.steps_per_execution))
            if not batches:
                raise StopIteration
            if self._recording_batch:
                self._batch = batches[-1]
            return inner(batches)

        train_function.__wrapped__ = self.model.train_function
        train_function._recorder = self
        self.model.train_function = train_function

    def _unwrap_train_function(self) -> None:
        outer, function = None, self.model.train_function
        while function is not None and getattr(function, "_recorder", None) is not self:
            outer, function = function, getattr(function, "__wrapped__", None)
        if function is None:
            return
        if outer is None:
            self.model.train_function = function.__wrapped__
        else:
            outer.__wrapped__ = function.__wrapped__

    # The update ----------------------------------------------------------------

    def _update(self, step: int) -> None:
        fraction = self.drop_fraction_at(step)
        prepared = self._prepare(self._layers)
        changed = False
        for number, layer in enumerate(self._layers):
            changed |= self._update_layer(layer, number, step, fraction, prepared)
        if changed:
            _retrace_if_patterns_changed(self.model)

    def _prepare(self, layers: list[SparseKernelLayer]) -> Any:
        """What ``_grow`` needs for this update (RigL: the layers' gradients)."""
        return None

    def _grow(
        self,
        layer: SparseKernelLayer,
        kept: np.ndarray,
        n: int,
        rng: np.random.Generator,
        prepared: Any,
        per_unit: np.ndarray | None = None,
    ) -> np.ndarray:
        """``n`` sorted row-major positions outside the sorted ``kept``; ``per_unit[j]`` in column ``j`` if given."""
        raise NotImplementedError

    def _record(self, step: int, layer: SparseKernelLayer, fraction: float, dropped: int, new: int) -> None:
        self.updates.append(
            {"step": step, "layer": layer.path, "drop_fraction": fraction, "dropped": dropped, "new": new}
        )

    def _update_layer(self, layer: SparseKernelLayer, number: int, step: int, fraction: float, prepared: Any) -> bool:
        pattern = layer.pattern
        per_unit = unit_counts(pattern, fraction) if self.constant_fan_in else None
        n = round(fraction * pattern.nnz) if per_unit is None else int(per_unit.sum())
        if n == 0:
            self._record(step, layer, fraction, 0, 0)
            return False
        values = keras.ops.convert_to_numpy(layer.values)
        old_linear = pattern.linear  # computed on each access: once here
        if per_unit is None:
            smallest_first = np.argsort(np.abs(values), kind="stable")  # ties: earlier entry first
            kept = np.sort(old_linear[smallest_first[n:]])
        else:
            kept = drop_within_units(pattern, values, per_unit)
        rng = np.random.default_rng([self._seed, step, number])
        grown = self._grow(layer, kept, n, rng, prepared, per_unit)
        linear = np.sort(np.concatenate([kept, grown]))  # disjoint; np.union1d hashes, 100x slower
        # Where each new entry was in the old canonical order, if it was there.
        old_index = np.minimum(np.searchsorted(old_linear, linear), pattern.nnz - 1)
        was_there = old_linear[old_index] == linear
        self._record(step, layer, fraction, n, int((~was_there).sum()))
        if was_there.all():
            return False

        def follow(array: np.ndarray) -> np.ndarray:
            moved = np.zeros_like(array)
            moved[was_there] = array[old_index[was_there]]
            return moved

        slots = optimizer_slots(self._training_optimizer(), layer.values)
        slot_values = [follow(keras.ops.convert_to_numpy(slot)) for slot in slots]
        layer.set_pattern(SparsityPattern._from_linear(linear, pattern.shape), values=follow(values))
        for slot, value in zip(slots, slot_values):
            slot.assign(value)
        return True
