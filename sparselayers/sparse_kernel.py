"""`SparseKernelLayer`: what makes any layer sparse, in one place.

A sparse layer stores its kernel as the entries of a fixed pattern over a
2-D view of the kernel, ``(rows, units)``: for ``Dense`` the kernel itself,
for a convolution its ``(*kernel_size, in_channels)`` taps flattened in C
order against its filters. Everything else is shared and lives here:

* the pattern and the 1-D ``values`` variable (``values[k]`` belongs to
  ``pattern.indices[k]``), the bias, and their initializers, regularizers
  and constraints;
* :meth:`~SparseKernelLayer.set_pattern`, the one seam through which a
  pattern changes after construction (pruning, RigL, SET, loading);
* the pattern as saved state (Keras files, ``tf.train.Checkpoint``);
* the kernel chosen for each context (default, XLA, export) and device, by
  :meth:`~SparseKernelLayer._select_kernel`, which every layer type calls on
  its 2-D operand ``(n, rows)``; tools that watch the product (RigL's dense
  gradient, ``sl.autotune``) hook there and so see every layer type alike.

A layer type adds only its own product around :meth:`_sparse_product` and
its own arguments. Features (``sparsify``, the callbacks, export) find
layers with :func:`sparse_layers` and never ask which type they hold.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
import numpy as np
import scipy.sparse
import tensorflow as tf

from sparselayers import evolution_step, pattern_state, seams
from sparselayers import initializers as sparse_initializers
from sparselayers.ops import KERNELS, check_kernel_name, choose_jit_kernel, get_kernel
from sparselayers.ops.context import kernel_context
from sparselayers.ops.gradient_order import input_gradient_first
from sparselayers.ops.export_kernels import export_kernel
from sparselayers.sparsity_pattern import SparsityPattern


def as_pattern(pattern: Any) -> SparsityPattern:
    """Accepts a SparsityPattern, a scipy.sparse matrix, a dense mask or a config dict."""
    if isinstance(pattern, SparsityPattern):
        return pattern
    if scipy.sparse.issparse(pattern):
        return SparsityPattern.from_scipy(pattern)
    if isinstance(pattern, dict):
        return SparsityPattern.from_config(pattern)
    if isinstance(pattern, (np.ndarray, list, tuple)) or hasattr(pattern, "__array__"):
        return SparsityPattern.from_dense(pattern)
    raise TypeError(
        "`pattern` must be a SparsityPattern, a scipy.sparse matrix or array, or a 2-D mask. "
        f"Received: pattern of type {type(pattern).__name__}"
    )


#: Keras layer class -> the sparse layer class that replaces it (filled by ``register_twin``).
_TWINS: dict[type, type[SparseKernelLayer]] = {}

# Regularizers and constraints that act entry by entry mean the same thing on
# the kept values as on the dense kernel; others (MaxNorm, orthogonality, ...)
# need the full kernel and are dropped.
_ELEMENTWISE_REGULARIZERS = (keras.regularizers.L1, keras.regularizers.L2, keras.regularizers.L1L2)
_ELEMENTWISE_CONSTRAINTS = (keras.constraints.NonNeg,)


def register_twin(keras_class: type) -> Any:
    """Class decorator: the decorated sparse layer replaces ``keras_class`` (and its subclasses) in ``sparsify``."""

    def register(sparse_class: type[SparseKernelLayer]) -> type[SparseKernelLayer]:
        _TWINS[keras_class] = sparse_class
        return sparse_class

    return register


def sparse_twin(layer: Any) -> type[SparseKernelLayer] | None:
    """The sparse layer class that can replace the Keras layer ``layer``, or None.

    >>> import keras, sparselayers as sl
    >>> from sparselayers.sparse_kernel import sparse_twin
    >>> sparse_twin(keras.layers.Conv2D(4, 3)).__name__, sparse_twin(keras.layers.Conv3D(4, 3))
    ('SparseConv2D', None)
    """
    for klass in type(layer).__mro__:
        if klass in _TWINS:
            return _TWINS[klass]
    return None


#: Keras layer class -> the class that replaces it by making its kernel sublayers sparse (``register_container_twin``).
_CONTAINER_TWINS: dict[type, type] = {}


def register_container_twin(keras_class: type) -> Any:
    """Class decorator: the decorated layer replaces ``keras_class`` in ``sparsify`` by converting its sublayers.

    For layers whose kernels live in sublayers built by the layer itself
    (``MultiHeadAttention``'s projections). The decorated class provides
    ``kernel_sublayers(layer) -> dict[str, Layer]`` (the convertible
    sublayers of a built ``keras_class`` or decorated layer, by a key of its
    own) and ``from_dense_layer(layer, patterns)``, an unbuilt layer
    configured like ``layer`` whose sublayer ``key`` is sparse on
    ``patterns[key]`` (dense where None). ``sparsify`` then plans the
    sublayers like any other layer; every weight of the layer must live in
    those sublayers.
    """

    def register(container_class: type) -> type:
        _CONTAINER_TWINS[keras_class] = container_class
        return container_class

    return register


def container_twin(layer: Any) -> type | None:
    """The class that makes ``layer``'s kernel sublayers sparse (see :func:`register_container_twin`), or None."""
    for klass in type(layer).__mro__:
        if klass in _CONTAINER_TWINS:
            return _CONTAINER_TWINS[klass]
    return None


def twin_types() -> list[str]:
    """Names of the Keras layer types that ``sparsify`` converts."""
    return sorted(klass.__name__ for klass in (*_TWINS, *_CONTAINER_TWINS))


def sparse_layers(model: keras.layers.Layer) -> list[SparseKernelLayer]:
    """Every sparse layer inside ``model`` (any type), nested models and ``Towers`` included.

    Args:
        model: a Keras model or layer (itself included if sparse).

    Returns:
        The layers in a fixed traversal order (equal for equal architectures).

    Example:

    >>> import keras, sparselayers as sl
    >>> model = keras.Sequential([
    ...     keras.Input((8, 3)),
    ...     sl.SparseConv1D(sl.patterns.random((9, 4), density=0.5, seed=0), 3, name="conv"),
    ...     keras.layers.Flatten(),
    ...     sl.SparseDense(sl.patterns.random((24, 2), density=0.5, seed=0), name="head"),
    ... ])
    >>> names = [layer.name for layer in sl.sparse_layers(model)]
    >>> names == ["conv", "head"]
    True
    """
    found = model._flatten_layers(include_self=True, recursive=True)
    return [layer for layer in found if isinstance(layer, SparseKernelLayer)]


class SparseKernelLayer(keras.layers.Layer):
    """Base of every sparse layer: a pattern, its ``values``, and the product's kernel.

    Subclasses set up their own arguments, then call :meth:`build_sparse`
    from ``build`` and compute their product with :meth:`_sparse_product`
    on a 2-D operand whose columns are the pattern's rows, and finish with
    :meth:`_finish` (bias, activation, pattern guard). They report the
    Keras layout of their kernel through :meth:`kernel_shape`.

    Args:
        pattern: a :class:`SparsityPattern`, a scipy.sparse matrix or array
            (its stored entries), or a 2-D 0/1 mask, over the kernel's 2-D
            view ``(rows, units)``.
        activation: Keras activation, default none; the other shared
            arguments (``use_bias``, ``values_*``, ``bias_*``,
            ``activity_regularizer``, ``kernel``) are those of
            :class:`~sparselayers.SparseDense`.
        **kwargs: Keras ``Layer`` arguments (``name``, ``dtype``, ...).
    """

    #: Whether one example can be a small 2-D operand: then a SavedModel
    #: switches small batches to ``sparse_dense_matmul``
    #: (:mod:`sparselayers.ops.serving`). Convolutions, whose operand holds a
    #: row per position, set it False.
    small_operands = True

    def __init__(
        self,
        pattern: Any,
        activation: Any = None,
        use_bias: bool = True,
        values_initializer: Any = None,
        bias_initializer: Any = "zeros",
        values_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        values_constraint: Any = None,
        bias_constraint: Any = None,
        kernel: str = "auto",
        **kwargs: Any,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.pattern = as_pattern(pattern)
        self.units = self.pattern.shape[1]
        self.activation = keras.activations.get(activation)
        if not isinstance(use_bias, (bool, np.bool_)):
            raise TypeError(f"`use_bias` must be a bool. Received: use_bias={use_bias!r}")
        self.use_bias = bool(use_bias)
        self.values_initializer = sparse_initializers.get(values_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.values_regularizer = keras.regularizers.get(values_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.values_constraint = keras.constraints.get(values_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self._kernel_argument = kernel
        self.set_kernel(kernel)

    # The Keras layer this type replaces ---------------------------------------

    @classmethod
    def check_dense_layer(cls, layer: keras.layers.Layer) -> str | None:
        """Why the Keras ``layer`` cannot become this type (a phrase), or None when it can."""
        if getattr(layer, "quantization_mode", None) is not None:
            return "it is quantized (sparsify before quantizing)"
        return None

    @classmethod
    def dense_kernel_variable(cls, layer: keras.layers.Layer) -> Any:
        """The Keras ``layer``'s kernel variable, in its own layout (ERK reads its shape, SNIP its gradient)."""
        return layer.kernel

    @classmethod
    def dense_kernel_view(cls, kernel: np.ndarray, layer: keras.layers.Layer | None = None) -> np.ndarray:
        """The 2-D view ``(rows, units)`` of a kernel in the Keras layout, over which patterns are laid.

        Every axis but the last against the last: ``Dense`` and convolutions.
        A type whose view depends on the Keras ``layer`` (the axes of an
        ``EinsumDense`` equation) reads it from ``layer``.
        """
        return kernel.reshape(-1, kernel.shape[-1])

    @classmethod
    def dense_kernel_regularization(cls, layer: keras.layers.Layer) -> tuple[Any, Any]:
        """The Keras ``layer``'s ``(regularizer, constraint)`` of the kernel that becomes ``values``."""
        return layer.kernel_regularizer, layer.kernel_constraint

    @classmethod
    def dense_extra_weights(cls, layer: keras.layers.Layer) -> list[Any]:
        """The Keras ``layer``'s weights besides its kernel and bias, in the order of :meth:`extra_weights`."""
        return []

    def extra_weights(self) -> list[Any]:
        """This layer's weights besides ``values`` and the bias (a separable convolution's depthwise kernel)."""
        return []

    @classmethod
    def dense_layer_arguments(cls, layer: keras.layers.Layer) -> dict[str, Any]:
        """The constructor arguments of this type that the Keras ``layer`` sets, besides the shared ones."""
        return {}

    @classmethod
    def from_dense_layer(cls, layer: keras.layers.Layer, pattern: Any) -> SparseKernelLayer:
        """An unbuilt layer of this type on ``pattern``, configured like the Keras ``layer``.

        Same name, activation, bias settings, dtype policy and trainability;
        kernel regularizers and constraints carry over when they act entry by
        entry (``L1``, ``L2``, ``L1L2``, ``NonNeg``), others need the full
        kernel and are dropped.
        """
        return cls(
            pattern, use_bias=layer.use_bias, **cls.carried_arguments(layer), **cls.dense_layer_arguments(layer)
        )

    @classmethod
    def carried_arguments(cls, layer: keras.layers.Layer) -> dict[str, Any]:
        """The shared arguments a sparse twin takes over from the Keras ``layer``.

        Activation, bias initializer, regularizer and constraint, activity
        regularizer, name, dtype policy and trainability; the kernel's
        regularizer and constraint when they act entry by entry.
        """
        regularizer, constraint = cls.dense_kernel_regularization(layer)
        return dict(
            activation=layer.activation,
            bias_initializer=layer.bias_initializer,
            values_regularizer=regularizer if isinstance(regularizer, _ELEMENTWISE_REGULARIZERS) else None,
            bias_regularizer=layer.bias_regularizer,
            activity_regularizer=layer.activity_regularizer,
            values_constraint=constraint if isinstance(constraint, _ELEMENTWISE_CONSTRAINTS) else None,
            bias_constraint=layer.bias_constraint,
            name=layer.name,
            dtype=layer.dtype_policy,
            trainable=layer.trainable,
        )

    # The layout of the kernel ---------------------------------------------

    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the equivalent Keras kernel, whose C-order reshape to ``pattern.shape`` is the 2-D view."""
        return self.pattern.shape

    def bias_shape(self) -> tuple[int, ...]:
        """The bias variable's shape: one entry per unit, unless the Keras twin shapes its bias otherwise."""
        return (self.units,)

    def to_scipy(self) -> scipy.sparse.csr_array:
        """The kernel's 2-D view as a scipy CSR array (bias not included)."""
        return self.pattern.to_scipy(keras.ops.convert_to_numpy(self.values))

    def to_dense(self) -> np.ndarray:
        """The kernel as a dense NumPy array in the Keras layout (:meth:`kernel_shape`)."""
        return self.pattern.to_dense(keras.ops.convert_to_numpy(self.values)).reshape(self.kernel_shape())

    # Kernels ----------------------------------------------------------------

    def set_kernel(self, kernel: str) -> None:
        """Selects the kernel of later calls (``"auto"`` or a name in ``KERNELS``).

        The saved config keeps the constructor's ``kernel`` argument: a choice
        made for one device (see :func:`sparselayers.autotune`) is not part
        of the model. Functions traced before keep the kernel they traced.
        """
        self._kernel_choice = check_kernel_name(kernel, self.pattern)
        self._kernel_in_use: str | None = None
        # "auto" lets a cached autotune measurement override the static rule.
        self._kernel_request = kernel
        # Inside an XLA compile, call() uses `jit_kernel_name`, which XLA can
        # compile. With kernel="auto" that swap is the layer's own choice, so
        # it supports jit; a kernel the user forced is honoured, so the layer
        # then supports jit only if that kernel does, and Keras runs it
        # uncompiled.
        self.jit_kernel_name = choose_jit_kernel(self.pattern, self._kernel_choice)
        self.supports_jit = self._kernel_argument == "auto" or KERNELS[self._kernel_choice].supports_jit

    @property
    def kernel_name(self) -> str:
        """The kernel of the layer's last call or trace, for its context and batch.

        That is the kernel chosen by ``kernel=`` or :meth:`set_kernel`, unless
        the call took another: ``jit_kernel_name`` inside XLA, an export form
        while exporting, or a kernel measured faster for that batch on this
        device (:func:`sparselayers.autotune`), or ``"sparse_input"`` when
        a ``SparseDense`` read a sparse batch from its nonzeros. A compiled
        kernel whose ops could not run (switched off, not built, or not
        accepting the pattern) reports the pure-TF twin that computed
        instead. Before any call, and after
        :meth:`set_kernel` or :meth:`set_pattern`, the kernel a plain call
        runs when nothing was measured.
        """
        return self._kernel_in_use or self._kernel_choice

    def _select_kernel(self, flat: tf.Tensor | None = None) -> Any:
        """The kernel for this call's context (see :mod:`sparselayers.ops.context`) and 2-D operand ``flat``.

        In the default context a ``kernel="auto"`` layer takes a kernel
        measured on this device for ``flat``'s batch, if one is cached
        (:func:`sparselayers.seams.measured_kernel`). The choice becomes
        :attr:`kernel_name`.
        """
        context = kernel_context()
        if context == "export":
            kernel = export_kernel(self.pattern, self._kernel_choice, forced=self._kernel_argument != "auto",
                                   small_batches=self.small_operands)
        else:
            name = self._kernel_choice
            if context == "xla":
                name = self.jit_kernel_name
            elif flat is not None:
                name = seams.measured_kernel(self, flat, name)
            kernel = get_kernel(name, self.pattern).resolved()
        self._kernel_in_use = kernel.name
        return kernel

    def _sparse_product(self, flat: tf.Tensor) -> tf.Tensor:
        """``flat @ W`` for the 2-D operand ``flat`` of shape ``(n, rows)``, in ``flat``'s dtype."""
        kernel = self._select_kernel(flat)
        if flat.shape[0] is not None:
            kernel.check_batch(flat.shape[0])
        # The update of values waits for flat's gradient: no copy of values mid-step.
        return kernel(*input_gradient_first(flat, tf.cast(self.values, flat.dtype)))

    def _finish(self, y: tf.Tensor, add_bias: bool = True) -> tf.Tensor:
        """Bias (unless the product added it), activation and the pattern guard on the product ``y``.

        The bias (:meth:`bias_shape`) broadcasts against ``y``.
        """
        if self.bias is not None and add_bias:
            y = y + tf.cast(self.bias, y.dtype)
        if self.activation is not None:
            y = self.activation(y)
        # The guard comes last: between the product and the bias add it
        # would keep Grappler from fusing matmul, bias and activation.
        return self._state.guard(y, self.name)

    # The pattern --------------------------------------------------------------

    def set_pattern(self, pattern: Any, values: Any = None) -> None:
        """Replaces the layer's connections, in place, keeping its variables.

        This is the one seam through which a pattern changes after
        construction (pruning, RigL and SET, loading a saved pattern). The new
        pattern must have the layer's shape and, once built, its ``nnz``:
        ``values`` keeps its variable (and the optimizer its slots), and
        ``values[k]`` now belongs to ``pattern.indices[k]``. Pass ``values``
        to assign new values in the same step. The kernel follows the new
        pattern; functions traced under the old pattern raise instead of
        computing with it (rebuild them with
        :func:`sparselayers.reset_compiled_functions`).

        >>> import numpy as np, sparselayers as sl
        >>> layer = sl.SparseDense(sl.patterns.banded((4, 4)), use_bias=False)
        >>> layer.build((None, 4))
        >>> layer.set_pattern(sl.patterns.banded((4, 4)).transpose(), values=[1.0, 2.0, 3.0, 4.0])
        >>> layer(np.eye(4, dtype="float32")).numpy().diagonal().tolist()
        [1.0, 2.0, 3.0, 4.0]
        """
        pattern = as_pattern(pattern)
        if pattern.shape != self.pattern.shape:
            raise ValueError(
                f"`pattern` must keep the layer's shape {self.pattern.shape}. Received: pattern with shape {pattern.shape}"
            )
        if self.built and pattern.nnz != self.pattern.nnz:
            raise ValueError(
                f"`pattern` must keep the built layer's nnz={self.pattern.nnz} (its values variable). "
                f"Received: pattern with nnz={pattern.nnz}"
            )
        if values is not None:
            values = np.asarray(values)
            if values.shape != (pattern.nnz,):
                raise ValueError(
                    f"`values` must have shape ({pattern.nnz},). Received: values with shape {values.shape}"
                )
        if pattern.input_names is None and pattern.output_names is None:
            # Same shape, so the layer's unit names still apply.
            pattern = pattern.with_names(self.pattern.input_names, self.pattern.output_names)
        kernel = self._kernel_argument
        if kernel != "auto":
            try:
                check_kernel_name(kernel, pattern)
            except ValueError:
                # A forced structured kernel no longer fits: choose again, and
                # say so in the config, which must rebuild this pattern.
                kernel = self._kernel_argument = "auto"
        self.pattern = pattern
        self.set_kernel(kernel)
        if self.built:
            if values is not None:
                self.values.assign(values.astype(self.values.dtype))
            self._state.bump()

    def build_sparse(self) -> None:
        """Creates ``values``, the bias and the saved state; subclasses call it from ``build``."""
        initializer = self.values_initializer
        if isinstance(initializer, sparse_initializers.SparseVarianceScaling):
            initializer = functools.partial(initializer, pattern=self.pattern)
        self.values = self.add_weight(
            name="values",
            shape=(self.pattern.nnz,),
            initializer=initializer,
            regularizer=self.values_regularizer,
            constraint=self.values_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=self.bias_shape(),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self._state = pattern_state.PatternState()
        self._pattern_checkpoint = pattern_state.PatternCheckpoint(self)
        self._step_checkpoint = evolution_step.StepCheckpoint(self)

    # Saving -----------------------------------------------------------------

    def save_own_variables(self, store: Any) -> None:
        super().save_own_variables(store)
        pattern_state.save_pattern(self.pattern, store)
        evolution_step.save(self, store)

    def load_own_variables(self, store: Any) -> None:
        stored = store["0"] if "0" in store else None
        saved_pattern = pattern_state.load_pattern(store, "the weights file", self)
        if saved_pattern is not None:
            pattern_state.check_replacement(self, saved_pattern, "The weights file")
        if stored is not None and tuple(stored.shape) != (self.pattern.nnz,):
            raise ValueError(
                f"Saved values do not match layer '{self.name}': the pattern has "
                f"nnz={self.pattern.nnz} but the file holds values of shape {tuple(stored.shape)}."
            )
        variables = self._trainable_variables + self._non_trainable_variables
        expected = [str(i) for i in range(len(variables))]
        missing = [key for key in expected if key not in store]
        if missing:
            raise ValueError(
                f"Layer '{self.name}' expected {len(variables)} variables in the weights file "
                f"but found none under keys {missing}."
            )
        if saved_pattern is not None and not pattern_state.identical(saved_pattern, self.pattern):
            self.set_pattern(saved_pattern)
        for key, variable in zip(expected, variables):
            variable.assign(store[key])
        evolution_step.load(self, store)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparseKernelLayer:
        # Decoded before Keras' from_config, which turns any error into a
        # TypeError quoting the whole config (megabytes for a large pattern).
        return super().from_config({**config, "pattern": as_pattern(config["pattern"])})

    def get_config(self) -> dict[str, Any]:
        base_config = super().get_config()
        config = {
            "pattern": self.pattern.get_config(),
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "values_initializer": keras.initializers.serialize(self.values_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "values_regularizer": keras.regularizers.serialize(self.values_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "values_constraint": keras.constraints.serialize(self.values_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "kernel": self._kernel_argument,
        }
        return {**base_config, **config}
