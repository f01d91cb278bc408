"""`SparseEinsumDense`: an ``EinsumDense`` whose only kernel weights are a pattern's entries.

The kernel's 2-D view puts the kernel axes the equation contracts (those it
shares with the input) against the axes it writes to the output, each group
in the kernel's own axis order and flattened in C order: for a Keras kernel
``k`` of ``"abc,cde->abde"`` the view is ``k.reshape(c, d * e)``, for
``"ab,cb->ac"`` it is ``k.T``. The product moves the input's contracted
axes last, flattens them, multiplies by the sparse view with the layer's
kernel (:mod:`sparselayers.ops`), and puts the axes in the equation's
output order.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.layers.core.einsum_dense import _analyze_einsum_string

from sparselayers.sparse_kernel import SparseKernelLayer, register_twin

# Keras' three forms: no ellipsis, an ellipsis on the left, one on the right.
_FORMS = (
    re.compile(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)"),
    re.compile(r"\.\.\.([a-zA-Z]+),([a-zA-Z]+)->\.\.\.([a-zA-Z]+)"),
    re.compile(r"([a-zA-Z]{2,})\.\.\.,([a-zA-Z]+)->([a-zA-Z]+)\.\.\."),
)


def _parse(equation: Any) -> tuple[str, str, str, str | None]:
    """``(input, kernel, output, ellipsis side)`` of an EinsumDense equation."""
    if isinstance(equation, str):
        compact = equation.replace(" ", "")
        for side, form in zip((None, "left", "right"), _FORMS):
            match = form.fullmatch(compact)
            if match:
                return (*match.groups(), side)
    raise ValueError(
        "`equation` must read 'ab,bc->ac', '...b,bc->...c' or 'ab...,bc->ac...' (the input, then the kernel). "
        f"Received: equation={equation!r}"
    )


def kernel_axes(equation: str) -> tuple[list[int], list[int]]:
    """The kernel axes an equation contracts and those it outputs, each in the kernel's order.

    Args:
        equation: an ``EinsumDense`` equation.

    Returns:
        ``(contracted, outputs)``: positions in the kernel; the 2-D view is
        ``kernel.transpose(contracted + outputs)`` flattened to two axes.

    Raises:
        ValueError: the equation is not ``EinsumDense``'s, or it is not a
            plain product of the input and kernel: a kernel axis in both the
            input and the output (a batched product), an input axis summed
            away, a repeated axis.

    >>> kernel_axes("abc,cde->abde"), kernel_axes("ab,cb->ac")
    (([0], [1, 2]), ([1], [0]))
    """
    inputs, kernel, outputs, _ = _parse(equation)
    for spec in (inputs, kernel, outputs):
        if len(set(spec)) != len(spec):
            raise ValueError(f"`equation` must not repeat an axis within a term. Received: equation={equation!r}")
    for axis in kernel:
        if axis in inputs and axis in outputs:
            raise ValueError(
                f"`equation` must not keep a kernel axis in the output that the input also has ('{axis}': a "
                f"batched product, which a 2-D view of the kernel cannot express). Received: equation={equation!r}"
            )
        if axis not in inputs and axis not in outputs:
            raise ValueError(f"`equation` must use every kernel axis ('{axis}' is unused). Received: equation={equation!r}")
    for axis in inputs:
        if axis not in kernel and axis not in outputs:
            raise ValueError(
                f"`equation` must not sum an input axis away ('{axis}' is neither in the kernel nor in the output). "
                f"Received: equation={equation!r}"
            )
    for axis in outputs:
        if axis not in inputs and axis not in kernel:
            raise ValueError(f"`equation` has an output axis '{axis}' from nowhere. Received: equation={equation!r}")
    contracted = [i for i, axis in enumerate(kernel) if axis in inputs]
    produced = [i for i, axis in enumerate(kernel) if axis in outputs]
    return contracted, produced


def _check_bias_axes(equation: str, bias_axes: Any) -> str | None:
    if bias_axes is None:
        return None
    _, kernel, outputs, _ = _parse(equation)
    own = [axis for axis in kernel if axis in outputs]
    if not isinstance(bias_axes, str) or not bias_axes or any(axis not in own for axis in bias_axes):
        raise ValueError(
            f"`bias_axes` must be None or output axes of the kernel ({''.join(own)!r} in {equation!r}): a bias "
            f"over the input's free axes needs their sizes fixed, which a sparse layer does not assume. "
            f"Received: bias_axes={bias_axes!r}"
        )
    return bias_axes


def _expand(inputs: str, outputs: str, side: str | None, rank: int) -> tuple[str, str]:
    """The input and output specs with the ellipsis replaced by fresh axes for an input of ``rank``."""
    if side is None:
        return inputs, outputs
    spare = [c for c in string.ascii_letters if c not in inputs + outputs]
    elided = "".join(spare[: rank - len(inputs)])
    if side == "left":
        return elided + inputs, elided + outputs
    return inputs + elided, outputs + elided


@register_twin(keras.layers.EinsumDense)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseEinsumDense(SparseKernelLayer):
    """``keras.layers.EinsumDense`` restricted to a fixed sparsity pattern.

    Computes what ``keras.layers.EinsumDense(equation, output_shape, ...)``
    computes with the kernel zero outside ``pattern``. The pattern is over
    the kernel's 2-D view: its contracted axes (shared with the input)
    against its output axes, each group in the kernel's axis order,
    flattened in C order (see :func:`kernel_axes`); ``values[k]`` sits at
    ``pattern.indices[k]`` of that view and :meth:`to_dense` returns the
    kernel in Keras' layout. For ``"abc,cde->abde"`` (a query projection of
    ``MultiHeadAttention``) the view is ``(c, d * e)``.

    Args:
        pattern: a :class:`~sparselayers.SparsityPattern`, scipy.sparse
            matrix or 0/1 mask over the kernel's 2-D view.
        equation: the ``EinsumDense`` equation, input first, then kernel.
        output_shape: the output's shape without the batch axis (None for
            an axis the input sets), as for ``EinsumDense``.
        activation: Keras activation, default none.
        bias_axes: None, or output axes of the kernel to hold a bias over,
            as for ``EinsumDense`` (a bias over the input's free axes is
            refused).
        values_initializer: as for :class:`~sparselayers.SparseDense`, and so
            are ``bias_initializer``, ``values_regularizer``,
            ``bias_regularizer``, ``activity_regularizer``,
            ``values_constraint``, ``bias_constraint`` and ``kernel``.
        **kwargs: Keras ``Layer`` arguments (``name``, ``dtype``, ...).

    Raises:
        ValueError: an equation ``EinsumDense`` refuses or that is not a
            plain product (a batched kernel axis, an input axis summed
            away), ``bias_axes`` outside the kernel's output axes, or (at
            build) a pattern whose shape is not the kernel's 2-D view.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> pattern = sl.patterns.random((16, 4 * 8), density=0.25, seed=0)  # 16 -> 4 heads of 8
    >>> layer = sl.SparseEinsumDense(pattern, "abc,cde->abde", (None, 4, 8), bias_axes="de")
    >>> layer(np.ones((2, 5, 16), "float32")).shape
    TensorShape([2, 5, 4, 8])
    >>> layer.kernel_shape(), tuple(layer.bias.shape)
    ((16, 4, 8), (4, 8))
    """

    def __init__(
        self,
        pattern: Any,
        equation: str,
        output_shape: Any,
        activation: Any = None,
        bias_axes: str | None = None,
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
        self._contracted, self._produced = kernel_axes(equation)
        self.equation = equation
        self.bias_axes = _check_bias_axes(equation, bias_axes)
        self.partial_output_shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
        super().__init__(
            pattern,
            activation=activation,
            use_bias=bias_axes is not None,
            values_initializer=values_initializer,
            bias_initializer=bias_initializer,
            values_regularizer=values_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            values_constraint=values_constraint,
            bias_constraint=bias_constraint,
            kernel=kernel,
            **kwargs,
        )
        self._kernel_shape: tuple[int, ...] | None = None

    # The Keras layer this type replaces -----------------------------------------

    @classmethod
    def check_dense_layer(cls, layer: keras.layers.Layer) -> str | None:
        if getattr(layer, "lora_enabled", False):
            return "it has LoRA enabled (merge or drop the LoRA weights first)"
        try:
            kernel_axes(layer.equation)
            _check_bias_axes(layer.equation, layer.bias_axes)
        except ValueError as error:
            return str(error).split(". Received")[0].replace("`", "")
        return super().check_dense_layer(layer)

    @classmethod
    def dense_kernel_view(cls, kernel: np.ndarray, layer: keras.layers.Layer | None = None) -> np.ndarray:
        if layer is None:
            raise TypeError("SparseEinsumDense.dense_kernel_view needs the EinsumDense `layer` to read its equation.")
        contracted, produced = kernel_axes(layer.equation)
        rows = math.prod(kernel.shape[i] for i in contracted)
        return np.transpose(kernel, contracted + produced).reshape(rows, -1)

    @classmethod
    def from_dense_layer(cls, layer: keras.layers.Layer, pattern: Any) -> SparseEinsumDense:
        return cls(
            pattern, layer.equation, layer.partial_output_shape, bias_axes=layer.bias_axes, **cls.carried_arguments(layer)
        )

    # Layout ------------------------------------------------------------------------

    def kernel_shape(self) -> tuple[int, ...]:
        """The Keras kernel's shape (known once built: the contracted sizes come from the input)."""
        if self._kernel_shape is None:
            raise ValueError(f"SparseEinsumDense '{self.name}' learns its kernel's shape from its input: build it first.")
        return self._kernel_shape

    def bias_shape(self) -> tuple[int, ...]:
        return self._bias_shape

    def to_dense(self) -> np.ndarray:
        view = self.pattern.to_dense(keras.ops.convert_to_numpy(self.values))
        order = self._contracted + self._produced
        grouped = view.reshape([self.kernel_shape()[i] for i in order])
        return np.transpose(grouped, np.argsort(order))

    # Keras layer ---------------------------------------------------------------------

    def build(self, input_shape: Any) -> None:
        input_shape = tuple(input_shape)
        inputs, kernel, outputs, side = _parse(self.equation)
        if len(input_shape) < len(inputs) + (side is not None) or (side is None and len(input_shape) != len(inputs)):
            raise ValueError(
                f"The input must have {'at least ' * (side is not None)}{len(inputs) + (side is not None)} axes "
                f"for equation {self.equation!r}. Received: input_shape={input_shape}"
            )
        kernel_shape, bias_shape, _, _, _ = _analyze_einsum_string(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape
        )
        if any(size is None for size in kernel_shape):
            raise ValueError(
                f"The input's contracted axes and `output_shape` must fix the kernel's shape, got {tuple(kernel_shape)}. "
                f"Received: input_shape={input_shape}"
            )
        rows = math.prod(kernel_shape[i] for i in self._contracted)
        units = math.prod(kernel_shape[i] for i in self._produced)
        if self.pattern.shape != (rows, units):
            raise ValueError(
                f"`pattern` must have the shape of the kernel's 2-D view, (contracted {rows}, output {units}) for "
                f"kernel shape {tuple(kernel_shape)} of {self.equation!r}. Received: pattern with shape "
                f"{self.pattern.shape} and input_shape={input_shape}"
            )
        self._kernel_shape = tuple(int(size) for size in kernel_shape)
        self._bias_shape = tuple(int(size) for size in bias_shape) if bias_shape is not None else (units,)
        full_in, full_out = _expand(inputs, outputs, side, len(input_shape))
        free = [axis for axis in full_in if axis not in kernel]
        contracted = [kernel[i] for i in self._contracted]
        produced = [kernel[i] for i in self._produced]
        self._in_order = [full_in.index(axis) for axis in free + contracted]
        self._out_order = [(free + produced).index(axis) for axis in full_out]
        self._free = len(free)
        self._units_shape = [self._kernel_shape[i] for i in self._produced]
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape))
        self.build_sparse()

    def call(self, inputs):
        x = inputs
        if x.dtype == tf.string or x.dtype == tf.bool:
            raise TypeError(f"SparseEinsumDense needs numeric inputs. Received: inputs of dtype {x.dtype.name}")
        if not x.dtype.is_floating:
            x = tf.cast(x, self.compute_dtype)
        if self._in_order != sorted(self._in_order):
            x = tf.transpose(x, self._in_order)
        free = [size if size is not None else tf.shape(x)[i] for i, size in enumerate(x.shape[: self._free])]
        y = self._sparse_product(tf.reshape(x, [-1, self.pattern.shape[0]]))
        y = tf.reshape(y, free + self._units_shape)
        if self._out_order != sorted(self._out_order):
            y = tf.transpose(y, self._out_order)
        return self._finish(y)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        _, _, full_output_shape, _, _ = _analyze_einsum_string(
            self.equation, self.bias_axes, tuple(input_shape), self.partial_output_shape
        )
        return tuple(full_output_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        del config["use_bias"]  # bias_axes says it
        return {
            **config,
            "equation": self.equation,
            "output_shape": self.partial_output_shape,
            "bias_axes": self.bias_axes,
        }
