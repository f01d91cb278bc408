"""``prune_low_magnitude``, ``strip_pruning`` and ``prune_scope``: TFMOT's entry points on sparse layers.

TFMOT wraps each layer in a ``PruneLowMagnitude`` that multiplies its kernel
by a mask. Here a pruned layer is the layer's sparse twin
(``sl.sparsify(model, density=1.0)``: same name, values and outputs) holding
every entry of its kernel; a mask, updated by :class:`UpdatePruningStep` on
the layer's schedule, holds the pruned entries at exactly zero. So
``sl.strip_pruning`` can drop them (truly sparse layers), and this module's
:func:`strip_pruning` scatters them back into the original Keras types.
"""

from __future__ import annotations

import inspect
import logging
import numbers
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import sparselayers as sl
from sparselayers import evolution_step
from sparselayers._validation import _short
from sparselayers.compat.tfmot.schedules import ConstantSparsity, PruningSchedule
from sparselayers.sparse_kernel import _TWINS, sparse_twin

_log = logging.getLogger("sparselayers")
#: TFMOT's text when a pruned model trains without the callback.
MISSING_CALLBACK = (
    "Prune() wrapper requires the UpdatePruningStep callback to be provided during training. "
    "Please add it as a callback to your model.fit call."
)


@dataclass(eq=False)
class LayerPruning:
    """What ``prune_low_magnitude`` attached to a sparse layer: its settings and its pruning state.

    ``mask`` is one float per stored entry (1 kept, 0 pruned); ``step`` is
    the last step :class:`UpdatePruningStep` gave the layer (-1: none yet);
    ``step_variable`` holds it for the traced train step;
    ``threshold`` the magnitude of the last update (TFMOT's threshold).
    """

    schedule: PruningSchedule
    block_size: tuple[int, int]
    block_pooling_type: str
    sparsity_m_by_n: tuple[int, int] | None
    mask: tf.Variable
    step_variable: tf.Variable
    step: int = -1
    threshold: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)


class _KeepMasked(keras.constraints.Constraint):
    """The layer's own constraint, then the mask; TFMOT's error when no UpdatePruningStep drives it.

    Keras applies it after every optimizer step, so pruned entries stay at
    exactly zero. As TFMOT's wrapper, it asserts that the step variable the
    callback sets is >= 0: the first training step without the callback
    raises ``InvalidArgumentError`` with TFMOT's message. (Raising in
    Python while Keras traces the step would leave the optimizer broken.)
    XLA drops assertions, so the trace also logs a warning.
    """

    def __init__(self, state: LayerPruning, inner: Any):
        self.state, self.inner = state, inner

    def __call__(self, w: Any) -> Any:
        if self.state.step < 0 and not tf.executing_eagerly():
            _log.warning(MISSING_CALLBACK)
        check = tf.debugging.assert_greater_equal(self.state.step_variable, np.int64(0), message=MISSING_CALLBACK)
        with tf.control_dependencies([check]):
            if self.inner is not None:
                w = self.inner(w)
            return w * tf.cast(self.state.mask, w.dtype)


class PruningPolicy:
    """TFMOT's experimental ``pruning_policy``: which layers of a model to prune.

    Subclass it: ``allow_pruning(layer)`` says whether to prune ``layer``;
    ``ensure_model_supports_pruning(model)`` raises for a model the policy
    cannot handle. (TFMOT's ``PruneForLatencyOnXNNPack`` is not provided.)
    """

    def allow_pruning(self, layer: keras.layers.Layer) -> bool:
        return True

    def ensure_model_supports_pruning(self, model: keras.Model) -> None:
        return None


def pruning_state(layer: Any) -> LayerPruning | None:
    """The :class:`LayerPruning` that ``prune_low_magnitude`` attached to ``layer``, or None."""
    return getattr(layer, "_tfmot_pruning", None)


def pruned_layers(model: keras.layers.Layer) -> list[sl.SparseKernelLayer]:
    """The layers of ``model`` (nested models included) that ``prune_low_magnitude`` prunes."""
    return [layer for layer in sl.sparse_layers(model) if pruning_state(layer) is not None]


def prune_scope() -> Any:
    """A scope to load pruned models in, as TFMOT's; not needed here.

    Pruned layers are sparselayers' own, registered with Keras, so
    ``keras.models.load_model`` loads them anywhere. The file keeps the
    values and each layer's mask, not the schedule: to go on pruning a
    loaded model, call :func:`prune_low_magnitude` on it again.
    """
    return keras.utils.custom_object_scope({})


def prune_low_magnitude(
    to_prune: Any,
    pruning_schedule: PruningSchedule | None = None,
    block_size: tuple[int, int] = (1, 1),
    block_pooling_type: str = "AVG",
    pruning_policy: PruningPolicy | None = None,
    sparsity_m_by_n: tuple[int, int] | None = None,
    **kwargs: Any,
) -> Any:
    """Makes a layer or a model prune its weights by magnitude during training, as TFMOT's does.

    Each prunable layer (``Dense``, ``Conv1D``/``Conv2D``, their separable
    forms, ``EinsumDense``, ``Embedding``: the types ``sl.sparsify``
    converts; a sparse layer too) becomes its sparse twin with every entry
    of its kernel, same name and values. During ``fit`` with
    :class:`UpdatePruningStep`, at each step where
    ``pruning_schedule(step)`` says to prune, the layer keeps the
    ``round(size * (1 - sparsity))`` largest ``|w|`` of its kernel (all
    those at or above that magnitude, as TFMOT); the others are held at
    exactly zero. Layers without a kernel (``Flatten``, pooling,
    normalization, ...) stay as they are.

    Args:
        to_prune: a built layer, a list of layers, or a built Sequential or
            Functional model (nested models are pruned too).
        pruning_schedule: a :class:`PruningSchedule`; default
            ``ConstantSparsity(0.5, 0)``.
        block_size: ``(height, width)``: prune whole blocks of the kernel's
            2-D view ``(inputs, units)``, ranked by their pooled ``|w|``.
        block_pooling_type: ``"AVG"`` or ``"MAX"``, the pooling of a block.
        pruning_policy: a :class:`PruningPolicy` choosing the layers of a
            model to prune.
        sparsity_m_by_n: ``(m, n)``: ``m`` zeros in every ``n`` consecutive
            inputs of each output (along the kernel's input-channel axis),
            set at the schedule's pruning steps instead of its sparsity.
        **kwargs: TFMOT passes these to its wrapper layer; none applies
            here (a ``TypeError`` names them).

    Returns:
        The pruned layer, list or model. A model is a copy, not compiled.

    Raises:
        TypeError: ``to_prune`` is not a layer, list or model; a bad
            argument type; unknown keyword arguments.
        ValueError: an argument out of range, a layer with a kernel that
            cannot be pruned (TFMOT's registry error), an unbuilt layer or
            model, a subclassed model.

    Example:

    >>> import keras, numpy as np
    >>> import sparselayers.compat.tfmot as tfmot
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="d")])
    >>> schedule = tfmot.sparsity.keras.ConstantSparsity(0.75, begin_step=0, frequency=1)
    >>> pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    >>> pruned.compile(optimizer="adam", loss="mse")
    >>> x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")
    >>> _ = pruned.fit(x, x[:, :8], epochs=1, verbose=0,
    ...                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    >>> stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    >>> type(stripped.get_layer("d")).__name__, float(np.mean(stripped.get_layer("d").kernel.numpy() == 0))
    ('Dense', 0.75)
    """
    if kwargs:
        raise TypeError(
            f"`prune_low_magnitude` got keyword arguments it does not take: {sorted(kwargs)} (TFMOT passed "
            f"them to its wrapper layer, which does not exist here). Received: {_short(kwargs)}"
        )
    settings = _check_settings(pruning_schedule, block_size, block_pooling_type, sparsity_m_by_n)
    if pruning_policy is not None and not callable(getattr(pruning_policy, "allow_pruning", None)):
        raise TypeError(
            "`pruning_policy` must have an `allow_pruning(layer)` method (a PruningPolicy). "
            f"Received: pruning_policy of type {type(pruning_policy).__name__}"
        )
    if isinstance(to_prune, list):
        return [layer if isinstance(layer, keras.layers.InputLayer) else _prune_layer(layer, settings) for layer in to_prune]
    if isinstance(to_prune, keras.Model):
        if not isinstance(to_prune, keras.Sequential) and not hasattr(to_prune, "_operations_by_depth"):
            raise ValueError(
                "`prune_low_magnitude` prunes Sequential and Functional models; a subclassed model has no "
                f"graph of layers to rebuild (prune its layers instead). Received: model of type {type(to_prune).__name__}"
            )
        if pruning_policy is not None and callable(getattr(pruning_policy, "ensure_model_supports_pruning", None)):
            pruning_policy.ensure_model_supports_pruning(to_prune)
        return _prune_model(to_prune, settings, pruning_policy)
    if isinstance(to_prune, keras.layers.Layer):
        return _prune_layer(to_prune, settings)
    raise TypeError(
        "`prune_low_magnitude` can only prune an object of the following types: keras.Sequential, a "
        "Functional model, keras.layers.Layer, list of keras.layers.Layer. You passed an object of type: "
        f"{type(to_prune).__name__}."
    )


def strip_pruning(model: Any) -> Any:
    """The model with its pruned layers back in their original Keras types, zeros in their kernels.

    As TFMOT's: every layer that ``prune_low_magnitude`` pruned becomes the
    Keras layer it came from (``Dense``, ``Conv2D``, ...; same name,
    settings and outputs), its kernel the dense kernel with the pruned
    entries at zero. The other layers are taken as they are (shared with
    ``model``). For truly sparse layers instead, that store and compute
    only the kept entries, call ``sl.strip_pruning(model)`` on the same
    model.

    Args:
        model: a Sequential or Functional model, or one pruned layer.

    Returns:
        A new model (or layer).

    Raises:
        TypeError: ``model`` is not a Keras model or layer.
    """
    if isinstance(model, keras.Model):
        return _clone(model, _strip_layer)
    if isinstance(model, keras.layers.Layer):
        return _strip_layer(model)
    raise TypeError(
        f"`strip_pruning` takes a keras.Model or a keras.layers.Layer. Received: model of type {type(model).__name__}"
    )


# Pruning ---------------------------------------------------------------------


def _check_settings(schedule: Any, block_size: Any, pooling: Any, m_by_n: Any) -> dict[str, Any]:
    schedule = ConstantSparsity(0.5, 0) if schedule is None else schedule
    if not callable(schedule):
        raise TypeError(
            "`pruning_schedule` must be a PruningSchedule (callable on a step). "
            f"Received: pruning_schedule of type {type(schedule).__name__}"
        )
    block_size = _check_pair(block_size, "block_size", minimum=1)
    if pooling not in ("AVG", "MAX"):
        raise ValueError(f"`block_pooling_type` must be 'AVG' or 'MAX'. Received: block_pooling_type={_short(pooling)}")
    if m_by_n is not None:
        m_by_n = _check_pair(m_by_n, "sparsity_m_by_n", minimum=0)
        if not m_by_n[0] < m_by_n[1]:
            raise ValueError(
                "`sparsity_m_by_n` is (m, n): m zeros in every n consecutive values, so m < n. "
                f"Received: sparsity_m_by_n={m_by_n}"
            )
        if block_size != (1, 1):
            raise ValueError(
                "`sparsity_m_by_n` and `block_size` are two kinds of structure; give one. "
                f"Received: sparsity_m_by_n={m_by_n}, block_size={block_size}"
            )
    return dict(schedule=schedule, block_size=block_size, block_pooling_type=pooling, sparsity_m_by_n=m_by_n)


def _check_pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if (
        isinstance(value, (str, bytes))
        or not hasattr(value, "__len__")
        or len(value) != 2
        or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) for v in value)
    ):
        raise TypeError(f"`{name}` must be a pair of integers. Received: {name}={_short(value)}")
    if any(v < minimum for v in value):
        raise ValueError(f"`{name}` must hold integers >= {minimum}. Received: {name}={tuple(value)}")
    return int(value[0]), int(value[1])


def _has_kernel(layer: keras.layers.Layer) -> bool:
    return any(len(v.shape) >= 2 for v in layer.trainable_weights)


def _unsupported(layer: keras.layers.Layer) -> ValueError:
    return ValueError(
        "Please initialize `Prune` with a supported layer. `prune_low_magnitude` prunes "
        f"{', '.join(sorted(k.__name__ for k in _TWINS))} and the sparse layers; layer '{layer.name}' "
        f"holds a kernel it cannot prune (skip it with a clone_function or a pruning_policy). "
        f"You passed: {type(layer)}"
    )


def _prune_layer(layer: keras.layers.Layer, settings: dict[str, Any]) -> keras.layers.Layer:
    """The sparse twin of a built ``layer`` with every entry, pruning on ``settings``."""
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(f"`prune_low_magnitude` prunes Keras layers. Received: an object of type {type(layer).__name__}")
    if isinstance(layer, sl.SparseKernelLayer):
        return _attach(layer, settings)
    twin = sparse_twin(layer)
    if twin is None:
        if layer.built and not _has_kernel(layer):
            return layer  # nothing to prune, as TFMOT's registry does for Flatten, pooling, ...
        raise _unsupported(layer)
    if not layer.built:
        raise ValueError(
            f"`prune_low_magnitude` needs a built layer: the shape of its kernel is the pattern of its sparse "
            f"twin. Build '{layer.name}' first (call it on an input, or prune the model it is in). "
            f"Received: unbuilt {type(layer).__name__}"
        )
    reason = twin.check_dense_layer(layer)
    if reason:
        raise ValueError(f"`prune_low_magnitude` cannot prune {type(layer).__name__} '{layer.name}': {reason}.")
    kernel = twin.dense_kernel_view(keras.ops.convert_to_numpy(twin.dense_kernel_variable(layer)), layer)
    sparse = twin.from_dense_layer(layer, sl.patterns.dense(kernel.shape))
    sparse.build_from_config(layer.get_build_config())
    sparse.values.assign(kernel.ravel().astype(sparse.values.dtype))
    if sparse.bias is not None:
        sparse.bias.assign(keras.ops.convert_to_numpy(layer.bias))
    for target, source in zip(sparse.extra_weights(), twin.dense_extra_weights(layer), strict=True):
        target.assign(keras.ops.convert_to_numpy(source))
    return _attach(sparse, settings)


def _attach(layer: sl.SparseKernelLayer, settings: dict[str, Any]) -> sl.SparseKernelLayer:
    """Gives a built sparse layer its pruning state and installs the mask as its values' constraint."""
    known = evolution_step.pruning_mask(layer)
    keep = np.ones(layer.pattern.nnz, bool) if known is None else known
    old = pruning_state(layer)
    if old is not None:
        layer.values.constraint = layer.values.constraint.inner
    state = LayerPruning(
        mask=tf.Variable(keep.astype(np.float32), trainable=False),
        step_variable=tf.Variable(np.int64(-1), trainable=False),
        **settings,
    )
    object.__setattr__(layer, "_tfmot_pruning", state)  # no Keras tracking: not a weight of the layer
    evolution_step.set_pruning_mask(layer, keep)
    layer.values.constraint = _KeepMasked(state, layer.values.constraint)
    return layer


def _prune_model(model: keras.Model, settings: dict[str, Any], policy: Any) -> keras.Model:
    if not model.built:
        raise ValueError(
            "`prune_low_magnitude` needs a built model (give it an `Input` or call it on data) so its kernels "
            f"exist. Received: unbuilt model '{model.name}'"
        )

    def prune(layer: keras.layers.Layer) -> keras.layers.Layer:
        if policy is not None and not policy.allow_pruning(layer):
            return layer
        if pruning_state(layer) is not None:
            return layer  # pruned already: keeps its own schedule, as TFMOT keeps a wrapped layer
        return _prune_layer(layer, settings)

    return _clone(model, prune)


def _clone(model: keras.Model, clone_function: Any) -> keras.Model:
    """``clone_model`` with ``clone_function`` on every layer, nested models cloned the same way."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.Model):
            return _clone(layer, clone_function)
        return clone_function(layer)

    return keras.models.clone_model(model, clone_function=clone)


# Stripping -------------------------------------------------------------------


def _strip_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A pruned sparse layer as its Keras twin with the dense kernel; any other layer as it is."""
    if not isinstance(layer, sl.SparseKernelLayer) or (
        pruning_state(layer) is None and evolution_step.pruning_mask(layer) is None
    ):
        return layer
    twin = type(layer)
    keras_class = next((k for k, s in _TWINS.items() if s is twin), None)
    if keras_class is None:
        return layer
    dense = keras_class.from_config(_keras_config(layer, keras_class))
    dense.build_from_config(layer.get_build_config())
    twin.dense_kernel_variable(dense).assign(layer.to_dense().astype(np.float32))
    if layer.bias is not None:
        dense.bias.assign(keras.ops.convert_to_numpy(layer.bias))
    for target, source in zip(twin.dense_extra_weights(dense), layer.extra_weights(), strict=True):
        target.assign(keras.ops.convert_to_numpy(source))
    return dense


def _keras_config(layer: sl.SparseKernelLayer, keras_class: type) -> dict[str, Any]:
    """The config of the Keras layer ``layer`` came from: its arguments under their Keras names."""
    accepted = set(keras_class(**_probe(keras_class)).get_config())
    prefix = "embeddings_" if "embeddings_initializer" in accepted else "kernel_"
    config = {}
    for key, value in layer.get_config().items():
        if key.startswith("values_"):
            key = prefix + key[len("values_"):]
        if key in accepted and key != prefix + "initializer":  # the values initializer is sparse-only
            config[key] = value
    rows, units = layer.pattern.shape
    for name, value in (("units", units), ("filters", units), ("input_dim", rows), ("output_dim", units)):
        if name in accepted:
            config[name] = value
    return config


def _probe(keras_class: type) -> dict[str, Any]:
    """Arguments that construct ``keras_class``, so that its config lists the keys it takes."""
    required = {"units": 1, "filters": 1, "kernel_size": 1, "input_dim": 1, "output_dim": 1,
                "equation": "ab,bc->ac", "output_shape": 1}
    parameters = inspect.signature(keras_class.__init__).parameters
    return {k: v for k, v in required.items() if k in parameters and parameters[k].default is inspect.Parameter.empty}
