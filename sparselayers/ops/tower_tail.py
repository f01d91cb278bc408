"""The block layers of :class:`sparselayers.Towers`, fused into two compiled ops.

After the shared first layer, every tower is a small MLP whose layers are
block-diagonal. :func:`tower_tail` computes all of them in the first
layer's ``(batch, tower * unit)`` layout: the first layer's bias and ReLU,
each block layer, its bias and ReLU, up to the last layer's
pre-activation. ``SparselayersTowerForward`` reads the first layer's
product once; ``SparselayersTowerBackward`` recomputes the activations from
it and writes its gradient once, with every weight and bias gradient, so
a training step makes no transposed copy and no separate bias, ReLU or
bias-gradient pass over the first layer's output.

Second and higher order gradients differentiate :func:`reference`, the
same function in plain TensorFlow ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from sparselayers.ops.compiled import build
from sparselayers.ops.compiled.kernels import OP_DTYPES, compiled_allowed


def fused_available(dtype: tf.DType) -> bool:
    """Whether :func:`tower_tail` runs its compiled ops for this dtype here (built, default context)."""
    return dtype in OP_DTYPES and compiled_allowed() and build.enabled() and build.available()


def reference(h, first_bias, weights, biases, widths: Sequence[int], towers: int, relu: bool) -> tf.Tensor:
    """What :func:`tower_tail` computes, in TensorFlow ops: ``(batch, towers * widths[-1])``.

    ``first_bias``, ``biases[l]`` may be empty (no bias); ``weights[l]``
    holds tower ``t``'s ``widths[l] x widths[l + 1]`` block row-major at
    ``t * widths[l] * widths[l + 1]``.

    >>> import numpy as np
    >>> h = tf.constant([[1.0, -2.0]])
    >>> reference(h, tf.zeros([0]), [tf.constant([3.0, 5.0])], [tf.zeros([0])], [1, 1], 2, True).numpy()
    array([[3., 0.]], dtype=float32)
    """
    act = tf.nn.relu if relu else tf.identity
    a = act(h + first_bias if first_bias.shape[0] else h)
    a = tf.reshape(a, [-1, towers, widths[0]])
    z = a
    for layer, (w, b) in enumerate(zip(weights, biases)):
        n_in, n_out = widths[layer], widths[layer + 1]
        z = tf.einsum("ntu,tuv->ntv", a, tf.reshape(w, [towers, n_in, n_out]))
        if b.shape[0]:
            z = z + tf.reshape(b, [towers, n_out])
        a = act(z)
    return tf.reshape(z, [-1, towers * widths[-1]])


def tower_tail(h, first_bias, weights, biases, widths: Sequence[int], towers: int, relu: bool) -> tf.Tensor:
    """:func:`reference` on the compiled ops (see :func:`fused_available`), with gradients of any order.

    Pass ``tf.zeros([0], h.dtype)`` for a missing bias.
    """
    ops = build.library()
    widths, layers = [int(w) for w in widths], len(weights)
    attrs = dict(towers=int(towers), widths=widths, relu=bool(relu))
    params = [first_bias, *weights, *biases]

    def split(params):
        return params[0], list(params[1 : 1 + layers]), list(params[1 + layers :])

    def reference_backward(dy, h, *params):
        first_bias, weights, biases = split(params)
        with tf.GradientTape() as tape:
            tape.watch([h, *params])
            y = reference(h, first_bias, weights, biases, widths, towers, relu)
        return tape.gradient(y, [h, *params], output_gradients=dy, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    @tf.custom_gradient
    def backward(dy, h, *params):
        first_bias, weights, biases = split(params)
        dh, d_first, d_weights, d_biases = ops.sparselayers_tower_backward(
            dy, h, first_bias, weights, biases, **attrs
        )

        def grad(*upstream):
            inputs = [dy, h, *params]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                outputs = reference_backward(dy, h, *params)
            upstream = [tf.zeros_like(o) if u is None else u for u, o in zip(upstream, outputs)]
            return tape.gradient(outputs, inputs, output_gradients=upstream,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)

        return [dh, d_first, *d_weights, *d_biases], grad

    @tf.custom_gradient
    def forward(h, *params):
        first_bias, weights, biases = split(params)
        y = ops.sparselayers_tower_forward(h, first_bias, weights, biases, **attrs)

        def grad(dy):
            return backward(dy, h, *params)

        return y, grad

    return forward(h, *params)
