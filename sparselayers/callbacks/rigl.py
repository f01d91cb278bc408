"""RigL: drop the smallest entries, grow where the dense gradient is largest."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers._validation import check_bool, check_int
from sparselayers.distribute import agreement
from sparselayers.callbacks.dynamic import _DynamicSparsity, _recording, random_positions, top_gradient_positions
from sparselayers.callbacks.fan_in import random_within_units, top_gradient_within_units
from sparselayers.ops.context import observing_layers
from sparselayers.sparse_kernel import SparseKernelLayer


class RigL(_DynamicSparsity):
    """Rigged Lottery: drop the smallest entries, grow where the dense gradient is largest.

    See :mod:`sparselayers.callbacks` for the exact semantics (schedule,
    which entries move, optimizer state, memory bound, cost).

    Args:
        update_freq: training steps between two updates, >= 1.
        drop_fraction: fraction of each layer's entries moved by the first
            update, in [0, 1); it decays to 0 at ``end_step`` (cosine).
        end_step: step from which the pattern stays fixed; default 75% of the
            steps ``fit`` runs.
        layers: names (or paths) of the sparse layers to evolve; default
            every sparse layer that can.
        seed: seed of the random draws that complete the growth when too few
            positions have a nonzero gradient; None draws a fresh one.
        tile_elements: dense gradient entries scored at once (at least one
            column of ``input_dim``); bounds an update's extra memory.
        constant_fan_in: drop and grow within each output unit, so that
            every unit keeps its fan-in (SRigL, Lasby et al. 2024; see
            :mod:`sparselayers.callbacks.fan_in`): a unit of fan-in ``k``
            moves ``round(f(t) * k)`` entries, grown where its column of
            the dense gradient is largest.

    Attributes:
        updates: one dict per layer and update: ``step``, ``layer`` (its
            path), ``drop_fraction``, ``dropped`` (entries dropped) and
            ``new`` (connections at positions the layer did not have).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range; at the start of ``fit``, a
            model with no sparse layer that can evolve, a name in ``layers``
            that matches none, or an unknown number of steps without
            ``end_step``.

    Example:

    >>> import keras, numpy as np, sparselayers as sl
    >>> layer = sl.SparseDense(sl.patterns.random((16, 4), density=0.25, seed=0))
    >>> model = keras.Sequential([keras.Input((16,)), layer])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> rigl = sl.callbacks.RigL(update_freq=2, drop_fraction=0.5, seed=0)
    >>> x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")
    >>> _ = model.fit(x, x[:, :4], batch_size=8, epochs=2, verbose=0, callbacks=[rigl])
    >>> [(u["step"], u["dropped"]) for u in rigl.updates]  # end_step = 0.75 * 8 steps
    [(2, 6), (4, 2)]
    """

    _needs_batch = True

    def __init__(
        self,
        update_freq: int = 100,
        drop_fraction: float = 0.3,
        end_step: int | None = None,
        layers: Sequence[str] | None = None,
        seed: int | None = None,
        *,
        tile_elements: int = 2**22,
        constant_fan_in: bool = False,
    ):
        super().__init__(update_freq, drop_fraction, end_step, layers, seed)
        self.tile_elements = check_int(tile_elements, "tile_elements", minimum=1)
        self.constant_fan_in = check_bool(constant_fan_in, "constant_fan_in")
        self._tile_sum = None

    def attach(self, model: keras.Model, optimizer: Any = None) -> None:
        if isinstance(model, keras.Model) and getattr(model, "_compile_loss", None) is None:
            raise ValueError(
                "RigL scores the gradient of the model's compiled loss, and model "
                f"'{model.name}' has none: model.compile(optimizer, loss=...) before attach "
                "(your loop may still use its own step)."
            )
        super().attach(model, optimizer)

    def _prepare(self, layers: list[SparseKernelLayer]) -> dict[int, tuple[tf.Tensor, tf.Tensor]]:
        if self._batch is None:
            warnings.warn(
                "RigL did not see the batch of this step (was model.train_function replaced?); "
                "this update grows connections at random, as SET.",
                stacklevel=2,
            )
            return {}
        return self._layer_gradients(layers)

    def _layer_gradients(self, layers: list[SparseKernelLayer]) -> dict[int, tuple[tf.Tensor, tf.Tensor]]:
        """Per layer: its input ``x`` and the loss gradient ``dy`` of ``x @ W``, on the kept batch."""
        data = self._batch
        strategy = self.model.distribute_strategy
        parts = strategy.experimental_local_results(data)
        if len(parts) > 1:  # replicas' shares of the global batch
            data = keras.tree.map_structure(lambda *p: tf.concat(p, axis=0), *parts)
        else:
            data = parts[0]
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # On a cluster each worker holds its share of the global batch: the
        # shares' gradients, weighted and summed over workers, are the global one.
        self._tile_sum = agreement.worker_sum(strategy)
        share = agreement.global_batch_share(strategy, int(tf.shape(keras.tree.flatten(x)[0])[0]))
        # StatelessScope: the probe must not move metrics, batch-norm
        # statistics or seed generators.
        with tf.GradientTape() as tape, keras.StatelessScope():
            with _recording(layers, tape) as calls, observing_layers():
                y_pred = self.model(x, training=True)
            loss = self.model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        outputs = [out for layer in layers for _, out in calls[id(layer)]]
        grads = iter(tape.gradient(loss, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        gradients = {}
        for layer in layers:
            if not calls[id(layer)]:
                continue
            xs = [tf.cast(x_in, tf.float32) for x_in, _ in calls[id(layer)]]
            dys = [tf.cast(next(grads), tf.float32) for _ in calls[id(layer)]]
            x_all = tf.sparse.concat(0, xs) if isinstance(xs[0], tf.SparseTensor) else tf.concat(xs, axis=0)
            gradients[id(layer)] = (x_all, tf.concat(dys, axis=0) * share)
        return gradients

    def _grow(
        self,
        layer: SparseKernelLayer,
        kept: np.ndarray,
        n: int,
        rng: np.random.Generator,
        prepared: Any,
        per_unit: np.ndarray | None = None,
    ) -> np.ndarray:
        if per_unit is not None:
            return self._grow_within_units(layer, kept, per_unit, rng, prepared)
        grown = np.zeros(0, np.int64)
        if id(layer) in prepared:
            x, dy = prepared[id(layer)]
            grown = top_gradient_positions(x, dy, kept, n, self.tile_elements, self._tile_sum)
        if grown.size < n:
            taken = np.sort(np.concatenate([kept, grown]))
            rest = random_positions(layer.pattern.shape, taken, n - grown.size, rng)
            grown = np.sort(np.concatenate([grown, rest]))
        return grown

    def _grow_within_units(
        self, layer: SparseKernelLayer, kept: np.ndarray, per_unit: np.ndarray, rng: np.random.Generator, prepared: Any
    ) -> np.ndarray:
        units = layer.pattern.shape[1]
        grown = np.zeros(0, np.int64)
        if id(layer) in prepared:
            x, dy = prepared[id(layer)]
            grown = top_gradient_within_units(x, dy, kept, per_unit, self.tile_elements, self._tile_sum)
        missing = per_unit - np.bincount(grown % units, minlength=units)
        if missing.any():
            taken = np.sort(np.concatenate([kept, grown]))
            grown = np.sort(np.concatenate([grown, random_within_units(layer.pattern.shape, taken, missing, rng)]))
        return grown
