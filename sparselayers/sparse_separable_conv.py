"""`SparseSeparableConv1D` and `SparseSeparableConv2D`: a dense depthwise step, then a sparse pointwise one.

A separable convolution's weights are almost all in its pointwise kernel
``(1, ..., in_channels * depth_multiplier, filters)``; that kernel is the
sparse one here, over its 2-D view ``(in_channels * depth_multiplier,
filters)``, computed as ``SparseDense`` on the channel axis. The depthwise
kernel ``(*kernel_size, in_channels, depth_multiplier)`` stays dense, as
in TFMOT and JaxPruner, which prune only the pointwise kernel of
separable convolutions.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
import tensorflow as tf

from sparselayers.ops import conv as conv_products
from sparselayers.sparse_conv import SlidingWindow
from sparselayers.sparse_kernel import SparseKernelLayer, register_twin


class SparseSeparableConv(SlidingWindow, SparseKernelLayer):
    """The separable convolution shared by the 1-D and 2-D layers.

    Computes what Keras' ``SeparableConv{rank}D`` computes with the
    pointwise kernel scattered from ``values`` (``channels_last``).
    """

    def __init__(
        self,
        pattern: Any,
        kernel_size: Any,
        strides: Any = 1,
        padding: str = "valid",
        dilation_rate: Any = 1,
        depth_multiplier: int = 1,
        data_format: str | None = None,
        activation: Any = None,
        use_bias: bool = True,
        depthwise_initializer: Any = "glorot_uniform",
        depthwise_regularizer: Any = None,
        depthwise_constraint: Any = None,
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
        self._set_window(kernel_size, strides, padding, dilation_rate, data_format, causal=False)
        if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, numbers.Integral) or depth_multiplier < 1:
            raise ValueError(f"`depth_multiplier` must be a positive integer. Received: depth_multiplier={depth_multiplier!r}")
        self.depth_multiplier = int(depth_multiplier)
        self.depthwise_initializer = keras.initializers.get(depthwise_initializer)
        self.depthwise_regularizer = keras.regularizers.get(depthwise_regularizer)
        self.depthwise_constraint = keras.constraints.get(depthwise_constraint)
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
        rows = self.pattern.shape[0]
        if rows % self.depth_multiplier:
            raise ValueError(
                f"`pattern` must have in_channels * depth_multiplier rows; {rows} rows do not divide by "
                f"depth_multiplier={self.depth_multiplier}. Received: pattern with shape {self.pattern.shape}"
            )
        self.filters = self.units
        self.in_channels = rows // self.depth_multiplier
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes={-1: self.in_channels})

    def kernel_shape(self) -> tuple[int, ...]:
        return (*(1,) * self.rank, self.pattern.shape[0], self.filters)

    def build(self, input_shape: Any) -> None:
        if len(input_shape) != self.rank + 2 or input_shape[-1] != self.in_channels:
            raise ValueError(
                f"The input must have rank {self.rank + 2} and in_channels={self.in_channels} (the pattern's "
                f"{self.pattern.shape[0]} rows over depth_multiplier={self.depth_multiplier}). "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.depthwise_kernel = self.add_weight(
            name="depthwise_kernel",
            shape=(*self.kernel_size, self.in_channels, self.depth_multiplier),
            initializer=self.depthwise_initializer,
            regularizer=self.depthwise_regularizer,
            constraint=self.depthwise_constraint,
        )
        self.build_sparse()

    def extra_weights(self) -> list[Any]:
        return [self.depthwise_kernel]

    def _depthwise(self, x: tf.Tensor) -> tf.Tensor:
        kernel = tf.cast(self.depthwise_kernel, x.dtype)
        padding = self.padding.upper()
        strides, dilations = self.strides, self.dilation_rate
        if self.rank == 1:
            # As Keras: a 2-D depthwise convolution over a height of 1, whose
            # height stride may equal the length's (TF needs them equal).
            x, kernel = x[:, None], kernel[None]
            strides, dilations = strides * 2, (1, *dilations)
        y = tf.nn.depthwise_conv2d(x, kernel, strides=(1, *strides, 1), padding=padding, dilations=dilations)
        return y[:, 0] if self.rank == 1 else y

    def call(self, inputs):
        x = inputs
        if not x.dtype.is_floating:
            x = tf.cast(x, self.compute_dtype)
        h = self._depthwise(x)
        pointwise = conv_products.ConvGeometry(*[(1,) * self.rank] * 3, "valid")
        product = conv_products.dense_conv(self._select_kernel, pointwise, self.kernel_shape(), pointwise=True)
        if product is not None:
            return self._finish(product(h, tf.cast(self.values, h.dtype)))
        y = self._finish(self._sparse_product(tf.reshape(h, [-1, self.pattern.shape[0]])))
        return tf.reshape(y, tf.concat([tf.shape(h)[:-1], [self.filters]], axis=0))

    @classmethod
    def check_dense_layer(cls, layer: keras.layers.Layer) -> str | None:
        return cls._not_channels_last(layer) or super().check_dense_layer(layer)

    @classmethod
    def dense_kernel_variable(cls, layer: keras.layers.Layer) -> Any:
        return layer.pointwise_kernel

    @classmethod
    def dense_extra_weights(cls, layer: keras.layers.Layer) -> list[Any]:
        return [layer.depthwise_kernel]

    @classmethod
    def dense_kernel_regularization(cls, layer: keras.layers.Layer) -> tuple[Any, Any]:
        return layer.pointwise_regularizer, layer.pointwise_constraint

    @classmethod
    def dense_layer_arguments(cls, layer: keras.layers.Layer) -> dict[str, Any]:
        return dict(
            **cls._window_arguments(layer),
            depth_multiplier=layer.depth_multiplier,
            depthwise_initializer=layer.depthwise_initializer,
            depthwise_regularizer=layer.depthwise_regularizer,
            depthwise_constraint=layer.depthwise_constraint,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            **self._window_config(),
            "depth_multiplier": self.depth_multiplier,
            "depthwise_initializer": keras.initializers.serialize(self.depthwise_initializer),
            "depthwise_regularizer": keras.regularizers.serialize(self.depthwise_regularizer),
            "depthwise_constraint": keras.constraints.serialize(self.depthwise_constraint),
        }


@register_twin(keras.layers.SeparableConv1D)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseSeparableConv1D(SparseSeparableConv):
    """1-D separable convolution whose pointwise kernel is restricted to a fixed sparsity pattern.

    Computes what ``keras.layers.SeparableConv1D`` computes: a dense
    depthwise convolution (``depthwise_kernel`` of shape ``(kernel_size,
    in_channels, depth_multiplier)``), then the pointwise kernel, zero
    outside ``pattern`` over its 2-D view ``(in_channels *
    depth_multiplier, filters)``, then bias and activation.

    Args:
        pattern: a :class:`~sparselayers.SparsityPattern`, scipy.sparse
            matrix or 0/1 mask of shape ``(in_channels * depth_multiplier,
            filters)``.
        kernel_size: the window, as for :class:`~sparselayers.SparseConv1D`
            (with ``strides``, ``dilation_rate`` and ``data_format``).
        padding: ``"valid"`` or ``"same"`` (as Keras' separable convolutions).
        depth_multiplier: depthwise channels per input channel.
        depthwise_initializer: Keras initializer of the dense depthwise
            kernel (``depthwise_regularizer`` and ``depthwise_constraint``
            as in Keras).
        activation: Keras activation, default none; the other shared
            arguments (``use_bias``, ``values_*``, ``bias_*``,
            ``activity_regularizer``, ``kernel``) are those of
            :class:`~sparselayers.SparseDense`.
        **kwargs: Keras ``Layer`` arguments.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> layer = sl.SparseSeparableConv1D(sl.patterns.random((3 * 2, 5), density=0.4, seed=0), 3, depth_multiplier=2)
    >>> layer(np.ones((1, 8, 3), "float32")).shape
    TensorShape([1, 6, 5])
    """

    rank = 1


@register_twin(keras.layers.SeparableConv2D)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseSeparableConv2D(SparseSeparableConv):
    """2-D separable convolution whose pointwise kernel is restricted to a fixed sparsity pattern.

    As :class:`SparseSeparableConv1D`, over two spatial axes: what
    ``keras.layers.SeparableConv2D`` computes with the pointwise kernel
    ``(1, 1, in_channels * depth_multiplier, filters)`` zero outside
    ``pattern``.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> layer = sl.SparseSeparableConv2D(sl.patterns.random((4, 8), density=0.25, seed=0), 3, padding="same")
    >>> layer(np.ones((1, 6, 6, 4), "float32")).shape
    TensorShape([1, 6, 6, 8])
    """

    rank = 2
