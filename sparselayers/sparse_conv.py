"""`SparseConv1D` and `SparseConv2D`: convolutions whose only kernel weights are a pattern's entries.

The kernel's 2-D view is Keras' kernel ``(*kernel_size, in_channels,
filters)`` reshaped in C order to ``(prod(kernel_size) * in_channels,
filters)``: a Keras kernel ``k`` has the view ``k.reshape(-1, filters)``.
The product is that sparse matrix times the image patches (im2col) laid
out in the same order, computed by the layer's kernel
(:mod:`sparselayers.ops`), or, with ``kernel="auto"`` where it measured
faster, by the compiled direct convolution, which reads the image in place
(:mod:`sparselayers.ops.conv`). A 1x1 convolution with unit strides needs
no patches: it is ``SparseDense`` on the channel axis and runs its kernels.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers.ops import conv as conv_products
from sparselayers.sparse_kernel import SparseKernelLayer, register_twin

_PADDINGS = {1: ("valid", "same", "causal"), 2: ("valid", "same")}


def _tuple(value: Any, rank: int, name: str) -> tuple[int, ...]:
    """``value`` as ``rank`` positive integers (an int repeats); else a ValueError naming ``name``."""
    items = (value,) * rank if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if (
        items is None
        or len(items) != rank
        or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 1 for v in items)
    ):
        raise ValueError(
            f"`{name}` must be a positive integer or a tuple of {rank} positive integers. Received: {name}={value!r}"
        )
    return tuple(int(v) for v in items)


def output_length(length: int | None, kernel: int, stride: int, dilation: int, padding: str) -> int | None:
    """Keras' output length of one spatial axis (None stays None)."""
    if length is None:
        return None
    if padding == "valid":
        return max((length - dilation * (kernel - 1) - 1) // stride + 1, 0)
    return -(-length // stride)  # "same" and "causal"


class SlidingWindow:
    """The sliding window the sparse convolutions share: its arguments, output shape and config.

    A mixin before the layer base: ``rank`` is the number of spatial axes.
    """

    rank: int = 0
    small_operands = False  # a row per position: a SavedModel never sees a small operand

    def _set_window(
        self, kernel_size: Any, strides: Any, padding: Any, dilation_rate: Any, data_format: Any, causal: bool = True
    ) -> None:
        """Checks and stores the window's arguments, as Keras does.

        ``causal=False`` refuses ``padding="causal"`` in 1-D too (as Keras' separable convolutions).
        """
        rank = self.rank
        self.kernel_size = _tuple(kernel_size, rank, "kernel_size")
        self.strides = _tuple(strides, rank, "strides")
        self.dilation_rate = _tuple(dilation_rate, rank, "dilation_rate")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides > 1` is not supported together with `dilation_rate > 1` (as in Keras). "
                f"Received: strides={self.strides} and dilation_rate={self.dilation_rate}"
            )
        allowed = _PADDINGS[rank] if causal else _PADDINGS[2]
        if not isinstance(padding, str) or padding.lower() not in allowed:
            raise ValueError(f"`padding` must be one of {list(allowed)}. Received: padding={padding!r}")
        self.padding = padding.lower()
        resolved = keras.config.image_data_format() if data_format is None else data_format
        if resolved != "channels_last":
            raise ValueError(
                "`data_format` must be 'channels_last': sparse convolutions read channels on the last axis "
                f"(transpose the input instead). Received: data_format={resolved!r}"
            )
        self.data_format = "channels_last"

    def compute_output_shape(self, input_shape: Any) -> tuple:
        spatial = [
            output_length(n, k, s, d, self.padding)
            for n, k, s, d in zip(input_shape[1:-1], self.kernel_size, self.strides, self.dilation_rate)
        ]
        return (input_shape[0], *spatial, self.filters)

    def _window_config(self) -> dict[str, Any]:
        return {
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "dilation_rate": self.dilation_rate,
            "data_format": self.data_format,
        }

    @staticmethod
    def _window_arguments(layer: keras.layers.Layer) -> dict[str, Any]:
        """The window's arguments of a Keras convolution."""
        return dict(
            kernel_size=layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )

    @staticmethod
    def _not_channels_last(layer: keras.layers.Layer) -> str | None:
        if layer.data_format != "channels_last":
            return f"its data_format is {layer.data_format!r}; sparse convolutions need 'channels_last'"
        return None


class SparseConv(SlidingWindow, SparseKernelLayer):
    """The convolution shared by :class:`SparseConv1D` and :class:`SparseConv2D`.

    Computes what Keras' ``Conv{rank}D`` computes with the kernel scattered
    from ``values`` (``channels_last``, ``groups=1``).
    """

    def __init__(
        self,
        pattern: Any,
        kernel_size: Any,
        strides: Any = 1,
        padding: str = "valid",
        dilation_rate: Any = 1,
        data_format: str | None = None,
        groups: int = 1,
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
        self._set_window(kernel_size, strides, padding, dilation_rate, data_format)
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups != 1:
            raise ValueError(
                "`groups` must be 1: a grouped convolution is a block-diagonal pattern over the "
                f"channels, which a pattern expresses directly. Received: groups={groups!r}"
            )
        self.groups = 1
        super().__init__(
            pattern,
            activation=activation,
            use_bias=use_bias,
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
        taps = math.prod(self.kernel_size)
        rows = self.pattern.shape[0]
        if rows % taps:
            raise ValueError(
                f"`pattern` must have prod(kernel_size) * in_channels rows; {rows} rows do not divide by "
                f"prod(kernel_size)={taps}. Received: pattern with shape {self.pattern.shape} and "
                f"kernel_size={self.kernel_size}"
            )
        self.filters = self.units
        self.in_channels = rows // taps
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes={-1: self.in_channels})

    def kernel_shape(self) -> tuple[int, ...]:
        return (*self.kernel_size, self.in_channels, self.filters)

    @classmethod
    def check_dense_layer(cls, layer: keras.layers.Layer) -> str | None:
        if layer.groups != 1:
            return f"it has groups={layer.groups}; sparse convolutions take groups=1"
        return cls._not_channels_last(layer) or super().check_dense_layer(layer)

    @classmethod
    def dense_layer_arguments(cls, layer: keras.layers.Layer) -> dict[str, Any]:
        return cls._window_arguments(layer)

    def build(self, input_shape: Any) -> None:
        if len(input_shape) != self.rank + 2 or input_shape[-1] != self.in_channels:
            raise ValueError(
                f"The input must have shape (batch, {', '.join(['length'] * self.rank)}, in_channels) with "
                f"in_channels={self.in_channels} (the pattern's {self.pattern.shape[0]} rows over "
                f"kernel_size={self.kernel_size}). Received: input_shape={tuple(input_shape)}"
            )
        self.build_sparse()

    def _is_pointwise(self) -> bool:
        return max(self.kernel_size) == 1 and max(self.strides) == 1

    def _geometry(self) -> conv_products.ConvGeometry:
        return conv_products.ConvGeometry(self.kernel_size, self.strides, self.dilation_rate, self.padding)

    def call(self, inputs):
        x = inputs
        if x.dtype == tf.string or x.dtype == tf.bool:
            raise TypeError(f"{type(self).__name__} needs numeric inputs. Received: inputs of dtype {x.dtype.name}")
        if not x.dtype.is_floating:
            x = tf.cast(x, self.compute_dtype)
        geometry = self._geometry()
        # RigL's probe wraps `_select_kernel` on the instance to watch the 2-D
        # product (patches, patches @ W): while it does, the patches compute.
        watched = "_select_kernel" in vars(self)
        direct = conv_products.dense_conv(
            self._select_kernel, geometry, self.kernel_shape(), pointwise=self._is_pointwise()
        )
        if direct is None and not self._is_pointwise() and not watched:
            direct = conv_products.direct_conv(self.pattern, geometry, x, auto=self._kernel_argument == "auto")
        if direct is not None:
            self._kernel_in_use = direct.name
            values = tf.cast(self.values, x.dtype)
            if isinstance(direct, conv_products.DirectConv) and self.bias is not None:
                # The compiled op adds the bias in its own pass over the output.
                return self._finish(direct(x, values, tf.cast(self.bias, x.dtype)), add_bias=False)
            return self._finish(direct(x, values))
        patches = x if self._is_pointwise() else conv_products.patches(x, geometry)
        flat = tf.reshape(patches, [-1, self.pattern.shape[0]])
        y = self._finish(self._sparse_product(flat))
        shape = tf.concat([tf.shape(patches)[:-1], [self.filters]], axis=0)
        return tf.reshape(y, shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self._window_config(), "groups": self.groups}


@register_twin(keras.layers.Conv1D)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseConv1D(SparseConv):
    """1-D convolution (temporal) restricted to a fixed sparsity pattern.

    Computes what ``keras.layers.Conv1D(filters, kernel_size, ...)``
    computes with the kernel ``W`` of shape ``(kernel_size, in_channels,
    filters)`` zero outside ``pattern``: the pattern is over ``W``'s 2-D
    view ``W.reshape(kernel_size * in_channels, filters)`` (rows ordered
    tap by tap, channels within a tap), ``values[k]`` sits at
    ``pattern.indices[k]`` of that view.

    Args:
        pattern: a :class:`~sparselayers.SparsityPattern`, scipy.sparse
            matrix or 0/1 mask of shape ``(kernel_size * in_channels,
            filters)``.
        kernel_size: the window's length, an int or a 1-tuple.
        strides: the stride, an int or a 1-tuple.
        padding: ``"valid"``, ``"same"`` or ``"causal"``.
        dilation_rate: the dilation, an int or a 1-tuple (not with
            ``strides > 1``).
        data_format: ``"channels_last"`` (or None with that Keras default).
        groups: 1; a grouped convolution is a block-diagonal pattern.
        activation: Keras activation, default none; the other shared
            arguments (``use_bias``, ``values_*``, ``bias_*``,
            ``activity_regularizer``, ``kernel``) are those of
            :class:`~sparselayers.SparseDense`.
        **kwargs: Keras ``Layer`` arguments (``name``, ``dtype``, ...).

    Raises:
        ValueError: a ``kernel_size``, ``strides`` or ``dilation_rate`` that
            is not positive integers, an unknown ``padding``,
            ``channels_first``, ``groups != 1``, pattern rows that do not
            divide by ``kernel_size``, or (at build) an input whose channels
            do not match the pattern.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> pattern = sl.patterns.random((3 * 4, 8), density=0.25, seed=0)  # kernel 3, 4 -> 8 channels
    >>> layer = sl.SparseConv1D(pattern, kernel_size=3, padding="causal")
    >>> layer(np.ones((2, 10, 4), "float32")).shape
    TensorShape([2, 10, 8])
    >>> layer.kernel_shape(), layer.values.shape[0] == pattern.nnz
    ((3, 4, 8), True)
    """

    rank = 1


@register_twin(keras.layers.Conv2D)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseConv2D(SparseConv):
    """2-D convolution (spatial) restricted to a fixed sparsity pattern.

    Computes what ``keras.layers.Conv2D(filters, kernel_size, ...)``
    computes with the kernel ``W`` of shape ``(kh, kw, in_channels,
    filters)`` zero outside ``pattern``: the pattern is over ``W``'s 2-D
    view ``W.reshape(kh * kw * in_channels, filters)`` (C order),
    ``values[k]`` sits at ``pattern.indices[k]`` of that view.

    Args:
        pattern: a :class:`~sparselayers.SparsityPattern`, scipy.sparse
            matrix or 0/1 mask of shape ``(kh * kw * in_channels, filters)``.
        kernel_size: an int or a pair ``(kh, kw)``.
        strides: an int or a pair.
        padding: ``"valid"`` or ``"same"``.
        dilation_rate: an int or a pair (not with ``strides > 1``).
        data_format: ``"channels_last"`` (or None with that Keras default).
        groups: 1; a grouped convolution is a block-diagonal pattern.
        activation: Keras activation, default none; the other shared
            arguments (``use_bias``, ``values_*``, ``bias_*``,
            ``activity_regularizer``, ``kernel``) are those of
            :class:`~sparselayers.SparseDense`.
        **kwargs: Keras ``Layer`` arguments (``name``, ``dtype``, ...).

    Raises:
        ValueError: as for :class:`SparseConv1D`.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> pattern = sl.patterns.random((3 * 3 * 2, 4), density=0.3, seed=0)
    >>> layer = sl.SparseConv2D(pattern, kernel_size=3, strides=2, padding="same")
    >>> layer(np.ones((1, 7, 7, 2), "float32")).shape
    TensorShape([1, 4, 4, 4])
    """

    rank = 2
