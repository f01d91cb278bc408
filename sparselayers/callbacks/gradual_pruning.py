"""Gradual magnitude pruning inside one ``fit`` (Zhu & Gupta, 2017): the "Pruning" baseline of RigL."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers import evolution_step
from sparselayers._validation import _short, check_int, check_layer_names
from sparselayers.allocation import check_distribution, global_keep, keep_counts, top_entries
from sparselayers.callbacks.dynamic import _StepCounting, fit_callback_list
from sparselayers.pattern_state import reset_compiled_functions
from sparselayers.pruning import _all_layers
from sparselayers.sparse_kernel import SparseKernelLayer


def polynomial_density(
    step: int, final_density: float, initial_density: float, begin_step: int, end_step: int, power: float = 3
) -> float:
    """The density the schedule asks for at ``step``.

    ``d_f + (d_i - d_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** power``
    with ``t`` clipped to ``[begin_step, end_step]``, and the result to ``[0, 1]``.

    Example:

    >>> from sparselayers.callbacks.gradual_pruning import polynomial_density
    >>> [round(polynomial_density(t, 0.1, 1.0, 0, 100), 4) for t in (0, 50, 100, 200)]
    [1.0, 0.2125, 0.1, 0.1]
    """
    t = min(max(step, begin_step), end_step)
    progress = (t - begin_step) / (end_step - begin_step)
    density = final_density + (initial_density - final_density) * (1.0 - progress) ** power
    return float(min(max(density, 0.0), 1.0))


class _KeepMask(keras.constraints.Constraint):
    """Zeroes the pruned entries after every optimizer step; then applies the layer's own constraint."""

    def __init__(self, mask: tf.Variable, inner: Any):
        # A mask left behind by a fit that ended with an exception is not the layer's own constraint.
        while isinstance(inner, _KeepMask):
            inner = inner.inner
        self.mask, self.inner = mask, inner

    def __call__(self, w: Any) -> Any:
        if self.inner is not None:
            w = self.inner(w)
        return w * tf.cast(self.mask, w.dtype)


def _check_density(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={_short(value)}")
    return float(value)


class GradualPruning(_StepCounting):
    """Gradual magnitude pruning on the polynomial schedule of Zhu & Gupta (tfmot's ``PolynomialDecay``).

    At step ``t`` (``t`` training steps done in this and earlier fits:
    ``callback.step``, the count RigL and SET keep, saved with the layers)
    the target density is ``d_f + (d_i - d_f) * (1 - (t - begin_step) /
    (end_step - begin_step)) ** power``, clipped to ``[0, 1]``
    (:func:`polynomial_density`). An update runs at the end of each step
    ``t = begin_step + k * frequency`` up to ``end_step``, and at
    ``end_step``; ``begin_step=0`` prunes once at the start of ``fit``. An
    update keeps, per layer, the entries of largest ``|value|`` among those
    still kept (equal magnitudes: the earlier entry), in the numbers that
    ``distribution`` gives for the target density (as
    :func:`sparselayers.sparsify`: ``"uniform"``, ``"erk"`` or
    ``"global"``); an entry once pruned never comes back.

    **Saved state, resumes and faults.** Each layer carries the step count
    and the mask of the entries still kept in its saved state
    (:mod:`sparselayers.evolution_step`: ``.keras``, ``.weights.h5``, so
    ``ModelCheckpoint`` and ``BackupAndRestore``, and
    ``tf.train.Checkpoint``), and the schedule depends on the step alone
    (``d_i`` defaults to the density of the stored entries, pruned or not).
    So a ``fit`` resumed from any of these with the same arguments, or
    restored by ``BackupAndRestore`` (before or after this callback in the
    list) after a crash, continues exactly as the uninterrupted run: the
    count and the masks are read at the first step of ``fit``, after any
    restore. Legacy ``.h5`` files and ``get_weights`` carry neither: from
    them the schedule starts at step 0 (with a warning if the optimizer ran
    steps). With ``steps_per_execution > 1`` the count follows the steps
    that ran, and an update falls at the end of the execution that holds
    its step. Not with ``EarlyStopping(restore_best_weights=True)``, which
    restores values without their mask (``ValueError`` at the start of
    ``fit``).

    **How entries leave storage.** Keras cannot change the size of a
    variable the optimizer trains inside ``fit``, so a pruned entry stays in
    the layer's ``values`` but is held at exactly zero: the update zeroes it
    and a mask, installed as the variable's constraint for the duration of
    ``fit`` (around the layer's own ``values_constraint``), zeroes it again
    after every optimizer step, so it never contributes to an output and no
    update survives on it. After ``fit`` (also one ended by an exception:
    the next training step outside it removes the mask) the layer trains
    freely again. :func:`sparselayers.strip_pruning` then returns a model
    whose layers store only the kept entries (outputs equal), which is what
    to save and export.

    **Memory and speed while pruning.** One float32 mask per layer, the size
    of its ``values`` at the start of ``fit`` (4 bytes per stored entry),
    plus the optimizer state the layer already had: nothing shrinks before
    :func:`strip_pruning`. Each step multiplies ``values`` by the mask once
    (one elementwise product per stored entry, small beside the layer's
    product); an update is a NumPy sort of each layer's values between two
    steps, and no retrace (the mask is a variable). Training runs at the
    speed of the starting pattern until the stripped model takes over.

    **Layers.** It prunes sparse layers (``SparseDense``, the sparse
    convolutions, attention projections and embeddings; of the
    model and nested models, not those inside ``Towers``). For a model of
    ``Dense`` layers start from ``sl.sparsify(model, density=1.0)``, which
    turns every ``Dense`` into a full ``SparseDense`` with the same values.

    Args:
        final_density: ``d_f``, the density at ``end_step``, in [0, 1].
        begin_step: the step of the first update, >= 0.
        end_step: the step of the last update; default 75% of the steps
            ``fit`` runs (as RigL's).
        frequency: steps between two updates, >= 1.
        initial_density: ``d_i``; default the density of the layers' stored
            entries, pruned or not (``nnz`` over ``input_dim * units``,
            summed over the layers): the density before any pruning, the
            same in a resumed run.
        power: the exponent of the schedule, > 0.
        distribution: ``"uniform"``, ``"erk"`` or ``"global"``.
        layers: names (or paths) of the sparse layers to prune; default
            every sparse layer.

    Attributes:
        updates: one dict per update: ``step``, ``density`` (the scheduled
            density), ``nnz`` (entries kept over the pruned layers) and
            ``layers`` (kept entries per layer path). A ``fit`` that starts
            past ``begin_step`` first redoes the last update due, which
            keeps every entry when the layers' saved state holds it.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range; at the start of ``fit``: no
            sparse layer to prune, a name in ``layers`` that matches none,
            ``end_step <= begin_step``, ``end_step`` needed but ``fit``
            cannot tell its number of steps, or an
            ``EarlyStopping(restore_best_weights=True)`` in the same ``fit``.

    Example:

    >>> import keras, numpy as np, sparselayers as sl
    >>> dense = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="d")])
    >>> model = sl.sparsify(dense, density=1.0)
    >>> model.compile(optimizer="adam", loss="mse")
    >>> pruning = sl.callbacks.GradualPruning(0.25, end_step=8, frequency=2)
    >>> x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    >>> _ = model.fit(x, x[:, :8], batch_size=8, epochs=2, verbose=0, callbacks=[pruning])
    >>> log = [(u["step"], u["nnz"]) for u in pruning.updates]
    >>> log
    [(0, 128), (2, 72), (4, 44), (6, 34), (8, 32)]
    >>> small = sl.strip_pruning(model)
    >>> small.get_layer("d").pattern.nnz
    32
    >>> bool(np.allclose(small(x), model(x)))
    True
    """

    def __init__(
        self,
        final_density: float,
        *,
        begin_step: int = 0,
        end_step: int | None = None,
        frequency: int = 100,
        initial_density: float | None = None,
        power: float = 3,
        distribution: str = "uniform",
        layers: Sequence[str] | None = None,
    ):
        super().__init__()
        self.final_density = _check_density(final_density, "final_density")
        self.begin_step = check_int(begin_step, "begin_step", minimum=0)
        self.end_step = None if end_step is None else check_int(end_step, "end_step", minimum=1)
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ValueError(
                f"`end_step` must be > begin_step={self.begin_step}. Received: end_step={self.end_step}"
            )
        self.frequency = check_int(frequency, "frequency", minimum=1)
        self.initial_density = _check_density(initial_density, "initial_density", allow_none=True)
        if isinstance(power, (bool, np.bool_)) or not isinstance(power, numbers.Real) or not power > 0:
            raise ValueError(f"`power` must be a number > 0. Received: power={_short(power)}")
        self.power = float(power)
        self.distribution = check_distribution(distribution)
        self.layer_names = check_layer_names(layers)
        self.updates: list[dict[str, Any]] = []
        self._masks: list[tf.Variable] = []
        self._constraints: list[_KeepMask] = []
        self._callbacks: keras.callbacks.CallbackList | None = None
        self._seen_iterator: Any = None

    def density_at(self, step: int) -> float:
        """The scheduled density at ``step`` (after ``fit`` started: it needs ``end_step`` and ``d_i``)."""
        return polynomial_density(step, self.final_density, self._initial, self.begin_step, self._end, self.power)

    # Keras hooks -------------------------------------------------------------

    def _start(self) -> None:
        self._layers = self._select_layers()
        self._end = self._end_step()
        super()._start()
        sizes = [layer.pattern.shape[0] * layer.pattern.shape[1] for layer in self._layers]
        self._initial = self.initial_density
        if self._initial is None:
            self._initial = sum(layer.pattern.nnz for layer in self._layers) / sum(sizes)
        self._keep = [self._kept_before(layer) for layer in self._layers]
        with self.model.distribute_strategy.scope():
            self._masks = [tf.Variable(keep.astype(np.float32), trainable=False) for keep in self._keep]
        self._constraints = [_KeepMask(mask, layer.values.constraint) for layer, mask in zip(self._layers, self._masks)]
        for layer, constraint in zip(self._layers, self._constraints):
            layer.values.constraint = constraint
        self._callbacks = fit_callback_list(sys._getframe(2))
        self._seen_iterator = None
        # A train function traced before (an earlier fit) lacks the mask.
        reset_compiled_functions(self.model)

    def _resume(self) -> None:
        super()._resume()
        # The masks the layers carry now: BackupAndRestore may have restored older ones.
        self._keep = [self._kept_before(layer) for layer in self._layers]
        for layer, keep, mask in zip(self._layers, self._keep, self._masks):
            mask.assign(keep.astype(np.float32))
            if not keep.all():  # an entry once pruned never comes back, even if a plain fit revived it
                values = keras.ops.convert_to_numpy(layer.values)
                layer.values.assign(np.where(keep, values, 0).astype(values.dtype))
        last = self._last_update_step(self._step)
        if last is not None:
            # The saved state may predate it (a checkpoint written before this
            # callback's hook at that step); if not, it keeps every entry.
            self._update(last)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        super().on_train_batch_begin(batch, logs)
        self._guard_train_function()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        previous = self._count_batch(batch)
        due = [t for t in range(previous + 1, self._step + 1) if self._is_update_step(t)]
        if due:
            self._update(due[-1])

    def on_train_end(self, logs: dict | None = None) -> None:
        self._release()

    def _release(self) -> None:
        """Gives the layers back their own constraints and the model functions without the masks."""
        self._in_fit = False
        self._seen_iterator = None
        for layer, constraint in zip(self._layers, self._constraints):
            if layer.values.constraint is constraint:
                layer.values.constraint = constraint.inner
        self._constraints = []
        reset_compiled_functions(self.model)

    def _guard_train_function(self) -> None:
        """Wraps ``model.train_function`` so that a step outside this ``fit`` first removes the masks.

        ``fit`` skips ``on_train_end`` when it ends with an exception, which
        would leave the masks installed, and baked into the traced function,
        for every later ``fit`` or ``train_on_batch``. The guard tells this
        ``fit``'s steps by their ``CallbackList`` (checked once per data
        iterator). Wraps again whenever the function was rebuilt.
        """
        function = self.model.train_function
        while function is not None:
            if getattr(function, "_pruning_guard", None) is self:
                return
            function = getattr(function, "__wrapped__", None)

        def train_function(iterator):
            if not self._owns(iterator):
                self._release()
                return self.model.train_function(iterator)
            return train_function.__wrapped__(iterator)

        train_function.__wrapped__ = self.model.train_function
        train_function._pruning_guard = self
        self.model.train_function = train_function

    def _owns(self, iterator: Any) -> bool:
        """Whether a call of the train function with ``iterator`` is a step of this callback's ``fit``."""
        if not self._in_fit:
            return False
        if iterator is self._seen_iterator or self._callbacks is None:
            return True
        if fit_callback_list(sys._getframe(2)) is not self._callbacks:
            return False
        self._seen_iterator = iterator
        return True

    # Schedule and update ----------------------------------------------------

    def _end_step(self) -> int:
        if self.end_step is not None:
            return self.end_step
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        if steps is None or epochs is None:
            raise ValueError(
                "`end_step` is needed when fit cannot tell its number of steps. "
                f"Received: end_step=None with steps per epoch={steps}; pass end_step or steps_per_epoch"
            )
        end = max(1, int(0.75 * steps * epochs))
        if end <= self.begin_step:
            raise ValueError(
                f"`end_step` (default 75% of fit's {steps * epochs} steps: {end}) must be > "
                f"begin_step={self.begin_step}. Received: end_step=None"
            )
        return end

    def _last_update_step(self, t: int) -> int | None:
        """The latest update step ``<= t``, or None."""
        if t < self.begin_step:
            return None
        if t >= self._end:
            return self._end
        return self.begin_step + (t - self.begin_step) // self.frequency * self.frequency

    def _is_update_step(self, t: int) -> bool:
        if not self.begin_step <= t <= self._end:
            return False
        return (t - self.begin_step) % self.frequency == 0 or t == self._end

    def _kept_before(self, layer: SparseKernelLayer) -> np.ndarray:
        """Entries this or an earlier GradualPruning left in ``layer``, as it carries them (all, if none)."""
        known = evolution_step.pruning_mask(layer)
        return np.ones(layer.pattern.nnz, bool) if known is None else known.copy()

    def _select_layers(self) -> list[SparseKernelLayer]:
        found = [layer for layer in dict.fromkeys(_all_layers(self.model)) if isinstance(layer, SparseKernelLayer)]
        if not found:
            raise ValueError(
                f"GradualPruning needs a model with a sparse layer; model '{self.model.name}' has none "
                "(start from sl.sparsify(model, density=1.0))."
            )
        if self.layer_names is None:
            return found
        known = {layer.name for layer in found} | {layer.path for layer in found}
        missing = [name for name in self.layer_names if name not in known]
        if missing:
            raise ValueError(
                "`layers` must name sparse layers of the model. "
                f"Received: layers={self.layer_names} ({missing} not found; "
                f"available: {sorted(layer.path for layer in found)})"
            )
        return [layer for layer in found if layer.name in self.layer_names or layer.path in self.layer_names]

    def _update(self, step: int) -> None:
        density = self.density_at(step)
        shapes = [layer.pattern.shape for layer in self._layers]
        # Pruned entries score -1: below every kept |value|, so never taken back.
        scores = [
            np.where(keep, np.abs(keras.ops.convert_to_numpy(layer.values).astype(np.float64)), -1.0)
            for layer, keep in zip(self._layers, self._keep)
        ]
        if self.distribution == "global":
            chosen = global_keep(scores, shapes, density)
        else:
            counts = keep_counts(shapes, density, self.distribution)
            chosen = [top_entries(score, min(count, int(keep.sum()))) for score, count, keep in zip(scores, counts, self._keep)]
        per_layer = {}
        for number, (layer, keep, indices) in enumerate(zip(self._layers, self._keep, chosen)):
            new = np.zeros_like(keep)
            new[indices] = True
            new &= keep
            self._keep[number] = new
            evolution_step.set_pruning_mask(layer, new)
            self._masks[number].assign(new.astype(np.float32))
            values = keras.ops.convert_to_numpy(layer.values)
            layer.values.assign(np.where(new, values, 0).astype(values.dtype))
            per_layer[layer.path] = int(new.sum())
        self.updates.append({"step": step, "density": density, "nnz": sum(per_layer.values()), "layers": per_layer})
