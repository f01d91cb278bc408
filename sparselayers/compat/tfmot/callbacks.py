"""``UpdatePruningStep`` and ``PruningSummaries``: TFMOT's pruning callbacks."""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers import evolution_step
from sparselayers.compat.tfmot.prune import LayerPruning, pruned_layers, pruning_state

_log = logging.getLogger("sparselayers")


class UpdatePruningStep(keras.callbacks.Callback):
    """Drives the pruning of the layers ``prune_low_magnitude`` made; required in ``fit``, as in TFMOT.

    At the start of each training step ``t`` (``optimizer.iterations``
    before the step), every pruned layer asks its schedule; when
    ``should_prune`` it recomputes its mask from its current weights (pruned
    ones are zero), so the step trains the pruned kernel. Without this
    callback the first training step raises TFMOT's error.

    Example:

    >>> import keras, numpy as np
    >>> import sparselayers.compat.tfmot as tfmot
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> pruned = tfmot.sparsity.keras.prune_low_magnitude(model)
    >>> pruned.compile(optimizer="sgd", loss="mse")
    >>> x = np.ones((8, 4), "float32")
    >>> pruned.fit(x, x[:, :2], verbose=0)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    tensorflow.python.framework.errors_impl.InvalidArgumentError: Prune() wrapper requires the UpdatePruningStep callback to be provided during training. Please add it as a callback to your model.fit call.
    >>> _ = pruned.fit(x, x[:, :2], verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    """

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._layers = pruned_layers(self.model)
        if not self._layers:
            _log.warning(
                "UpdatePruningStep found no layer pruned by prune_low_magnitude in model '%s' (a loaded model "
                "keeps its masks, not its schedules: call prune_low_magnitude on it again).",
                self.model.name,
            )
        self._next = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        # With steps_per_execution > 1 this runs once per execution: the steps
        # since the last call ran inside the previous one.
        for layer in self._layers:
            state = pruning_state(layer)
            due = [t for t in range(min(self._next, step), step + 1) if _should_prune(state, t)]
            state.step = step
            state.step_variable.assign(step)
            if due:
                update_mask(layer, state, due[-1])
        self._next = step + 1


class PruningSummaries(keras.callbacks.TensorBoard):
    """TensorBoard with each pruned layer's sparsity and threshold, logged at the end of each epoch.

    The scalars ``<layer name>/sparsity`` (the fraction of the layer's
    kernel that is pruned) and ``<layer name>/threshold`` go to the
    ``train`` run of ``log_dir``, at step ``optimizer.iterations``.

    Args:
        log_dir: TensorBoard's log directory.
        update_freq: as ``keras.callbacks.TensorBoard``'s; default ``"epoch"``.
        **kwargs: the other arguments of ``keras.callbacks.TensorBoard``.
    """

    def __init__(self, log_dir: str, update_freq: Any = "epoch", **kwargs: Any):
        super().__init__(log_dir=log_dir, update_freq=update_freq, **kwargs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        with self._train_writer.as_default():
            for layer in pruned_layers(self.model):
                state = pruning_state(layer)
                mask = keras.ops.convert_to_numpy(state.mask)
                tf.summary.scalar(f"{layer.name}/sparsity", 1.0 - float(mask.mean()), step=step)
                tf.summary.scalar(f"{layer.name}/threshold", state.threshold, step=step)
        self._train_writer.flush()


def _should_prune(state: LayerPruning, step: int) -> bool:
    return bool(np.asarray(state.schedule(step)[0]))


def update_mask(layer: Any, state: LayerPruning, step: int) -> None:
    """Recomputes ``layer``'s mask for ``step`` from its current values, and zeroes the pruned ones."""
    values = keras.ops.convert_to_numpy(layer.values)
    dense = np.zeros(layer.pattern.shape[0] * layer.pattern.shape[1], values.dtype)
    dense[layer.pattern.linear] = values
    view = np.abs(dense.reshape(layer.pattern.shape))
    if state.sparsity_m_by_n is not None:
        threshold, keep = 0.0, m_by_n_mask(view.reshape(layer.kernel_shape()), state.sparsity_m_by_n)
        keep = keep.reshape(view.shape)
    else:
        sparsity = float(np.asarray(state.schedule(step)[1]))
        threshold, keep = block_mask(view, sparsity, state.block_size, state.block_pooling_type)
    kept = keep.ravel()[layer.pattern.linear]
    state.mask.assign(kept.astype(np.float32))
    state.threshold = float(threshold)
    state.history.append((step, 1.0 - float(kept.mean())))
    evolution_step.set_pruning_mask(layer, kept)
    layer.values.assign(np.where(kept, values, 0).astype(values.dtype))


def magnitude_mask(magnitude: np.ndarray, sparsity: float) -> tuple[float, np.ndarray]:
    """TFMOT's mask: ``k = round(size * (1 - sparsity))`` in float32; keep ``|w| >=`` the k-th largest."""
    k = int(np.round(np.float32(magnitude.size) * (np.float32(1) - np.float32(sparsity))))
    if k == 0:
        return float("inf"), np.zeros(magnitude.shape, bool)
    threshold = np.sort(magnitude, axis=None)[::-1][k - 1]
    return float(threshold), magnitude >= threshold


def block_mask(view: np.ndarray, sparsity: float, block: tuple[int, int], pooling: str) -> tuple[float, np.ndarray]:
    """The magnitude mask of ``block``-sized tiles from ``(0, 0)``, each pooled (``AVG`` or ``MAX`` of ``|w|``)."""
    if block == (1, 1):
        return magnitude_mask(view, sparsity)
    rows, cols = view.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    padded = np.full((tiles[0] * block[0], tiles[1] * block[1]), np.nan, view.dtype)
    padded[:rows, :cols] = view
    blocks = padded.reshape(tiles[0], block[0], tiles[1], block[1])
    pooled = np.nanmean(blocks, axis=(1, 3)) if pooling == "AVG" else np.nanmax(blocks, axis=(1, 3))
    threshold, keep = magnitude_mask(pooled, sparsity)
    return threshold, np.repeat(np.repeat(keep, block[0], 0), block[1], 1)[:rows, :cols]


def m_by_n_mask(magnitude: np.ndarray, m_by_n: tuple[int, int]) -> np.ndarray:
    """Keeps the ``n - m`` largest of every ``n`` consecutive entries along the input-channel axis (-2).

    TFMOT's grouping: per output and kernel position, the input channels in
    groups of ``n`` from the first (the last group may be shorter and keeps
    at most ``n - m``); equal magnitudes keep the earlier channel.
    """
    m, n = m_by_n
    channels_last = np.moveaxis(magnitude, -2, -1)
    groups = -(-channels_last.shape[-1] // n)
    padded = np.full((*channels_last.shape[:-1], groups * n), -1.0)
    padded[..., : channels_last.shape[-1]] = channels_last
    grouped = padded.reshape(*channels_last.shape[:-1], groups, n)
    rank = np.argsort(np.argsort(-grouped, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (rank < n - m) & (grouped >= 0)
    keep = keep.reshape(padded.shape)[..., : channels_last.shape[-1]]
    return np.moveaxis(keep, -1, -2)
