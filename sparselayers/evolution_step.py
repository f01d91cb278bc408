"""The training-step count of an evolving pattern, and the pruning mask, as part of a layer's saved state.

RigL, SET and GradualPruning schedule their updates by their own count of
training steps (``optimizer.iterations`` is not that count under loss
scaling or gradient accumulation, and is 0 after ``load_weights`` into a
fresh optimizer). GradualPruning also keeps a mask of the entries it has
not pruned (pruned entries stay in ``values``, held at zero, until
``strip_pruning``). Both live on each :class:`SparseDense`, so they travel
wherever the pattern travels: Keras files (``.keras``, ``.weights.h5``, and
so ``BackupAndRestore`` and ``ModelCheckpoint``) through :func:`save` and
:func:`load`, and ``tf.train.Checkpoint`` through :class:`StepCheckpoint`
(the count) and the pattern's checkpoint (the mask, restored after the
pattern it belongs to: :func:`encode_mask`, :func:`restore_mask`). A file or
checkpoint without them leaves the count at 0 and no mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.trackable import base as trackable

#: Key of the Keras weights store, and of the checkpoint, holding the count.
STEP_KEY = "evolution_step"
#: Key of the Keras weights store, and of the checkpoint, holding the pruning mask.
MASK_KEY = "pruning_mask"


def get(layer: Any) -> int:
    """The training steps counted for ``layer``'s pattern (0 if none were)."""
    return getattr(layer, "_evolution_step", 0)


def set_step(layer: Any, step: int) -> None:
    """Records that ``layer``'s pattern has evolved through ``step`` training steps."""
    object.__setattr__(layer, "_evolution_step", int(step))  # a plain int: no Keras tracking


def pruning_mask(layer: Any) -> np.ndarray | None:
    """The entries of ``layer``'s current pattern that pruning kept (bool, one per entry), or None.

    None when nothing pruned the layer, or when its pattern changed since
    (the mask belonged to the old connections).
    """
    saved = getattr(layer, "_pruning_mask", None)
    if saved is None or (saved[0] is not layer.pattern and saved[0] != layer.pattern):
        return None
    return saved[1]


def set_pruning_mask(layer: Any, keep: np.ndarray | None) -> None:
    """Records that pruning kept the entries ``keep`` of ``layer``'s current pattern (None: no mask)."""
    saved = None if keep is None else (layer.pattern, np.array(keep, bool))
    object.__setattr__(layer, "_pruning_mask", saved)  # no Keras tracking


def encode_mask(layer: Any) -> bytes:
    """The mask as packed bits (one bit per entry), or empty bytes when there is none."""
    keep = pruning_mask(layer)
    return b"" if keep is None else np.packbits(keep).tobytes()


def restore_mask(layer: Any, blob: bytes, where: str) -> None:
    """Sets the mask from :func:`encode_mask`'s bytes, for ``layer``'s current pattern (none if empty).

    Raises:
        ValueError: the bytes do not hold one bit per entry of the pattern.
    """
    if not blob:
        set_pruning_mask(layer, None)
        return
    nnz = layer.pattern.nnz
    if len(blob) != (nnz + 7) // 8:
        raise ValueError(
            f"Corrupt pruning mask in {where}: {len(blob)} bytes for layer '{layer.name}', whose pattern "
            f"has nnz={nnz} ({(nnz + 7) // 8} bytes)."
        )
    set_pruning_mask(layer, np.unpackbits(np.frombuffer(blob, np.uint8), count=nnz).astype(bool))


def save(layer: Any, store: Any) -> None:
    """Writes the count and the pruning mask (if any) into a Keras weights store."""
    store[STEP_KEY] = np.asarray([get(layer)], np.int64)
    mask = encode_mask(layer)
    if mask:
        store[MASK_KEY] = np.frombuffer(mask, np.uint8)


def load(layer: Any, store: Any) -> None:
    """Reads the count and the mask from a Keras weights store (after the pattern); 0 and none for files without them."""
    set_step(layer, int(np.asarray(store[STEP_KEY]).reshape(-1)[0]) if STEP_KEY in store else 0)
    mask = np.asarray(store[MASK_KEY], np.uint8).tobytes() if MASK_KEY in store else b""
    restore_mask(layer, mask, "the weights file")


class StepCheckpoint(trackable.Trackable):
    """The count as a ``tf.train.Checkpoint`` dependency of the layer."""

    def __init__(self, layer: Any):
        self._layer = layer

    def _serialize_to_tensors(self) -> dict[str, tf.Tensor]:
        return {STEP_KEY: tf.constant(get(self._layer), tf.int64)}

    def _restore_from_tensors(self, restored_tensors: dict[str, tf.Tensor]) -> Any:
        if tf.executing_eagerly():  # SavedModel traces restore functions: nothing to count there
            set_step(self._layer, int(restored_tensors[STEP_KEY].numpy()))
        return tf.no_op()
