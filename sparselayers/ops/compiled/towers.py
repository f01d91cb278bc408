"""The fused tower layer of ``Towers``: bias, activation and block product in one pass.

``tower_layer(a, bias, w, towers, relu)`` computes ``act(a + bias) @ W``
for a block-diagonal ``W`` of ``towers`` equal blocks, ``act`` ReLU or the
identity, in the ``(batch, towers * r)`` layout the dense first layer of
``Towers`` writes: no transposed copy of the activations, and no separate
bias, activation, activation-gradient or bias-gradient pass over them. Its
gradient is one more op; gradients of that are pure TF (exact, slower).
"""

from __future__ import annotations

import tensorflow as tf

from sparselayers.ops.compiled import build


def tower_layer(a: tf.Tensor, bias: tf.Tensor, w: tf.Tensor, towers: int, relu: bool) -> tf.Tensor:
    """``act(a + bias) @ W`` on the compiled op; ``a`` and ``w`` float32 or float64.

    ``a`` is ``(batch, towers * r)``, ``bias`` ``(towers * r,)``, ``w`` the
    ``towers`` blocks of ``r x c`` values, row-major one after the other;
    the result is ``(batch, towers * c)``.
    """
    units = int(w.shape[0]) // (int(a.shape[1]) // towers)
    return build.library().sparselayers_tower_forward(a, bias, w, towers=towers, units=units, relu=relu)


def _blocks(t: tf.Tensor, towers: int) -> tf.Tensor:
    return tf.reshape(t, [tf.shape(t)[0], towers, -1])


@tf.RegisterGradient("SparselayersTowerForward")
def _tower_forward_grad(op, dy):
    a, bias, w = op.inputs
    da, dbias, dw = build.library().sparselayers_tower_backward(
        a, bias, w, dy, towers=op.get_attr("towers"), relu=op.get_attr("relu")
    )
    return da, dbias, dw


@tf.RegisterGradient("SparselayersTowerBackward")
def _tower_backward_grad(op, g_da, g_dbias, g_dw):
    # The backward op, u = a + bias, s = act'(u), h = act(u):
    #   da = (dy @ W.T) * s, dbias = sum_b da, dW = h.T @ dy (per tower);
    # its vector-Jacobian product, in pure TF ops (ReLU's s is piecewise
    # constant, so it contributes no derivative of its own).
    a, bias, w, dy = op.inputs
    towers, relu = op.get_attr("towers"), op.get_attr("relu")
    u = _blocks(a, towers) + tf.reshape(bias, [towers, -1])
    r = u.shape[-1]
    weights = tf.reshape(w, [towers, r, -1])
    dy_blocks = _blocks(dy, towers)
    s = tf.cast(u > 0, u.dtype) if relu else tf.ones_like(u)
    h = u * s
    g_u = tf.zeros_like(u) if g_da is None else _blocks(g_da, towers)
    if g_dbias is not None:
        g_u += tf.reshape(g_dbias, [towers, r])
    g_u *= s
    g_w = tf.zeros_like(weights) if g_dw is None else tf.reshape(g_dw, weights.shape)
    d_u = tf.einsum("bnc,nrc->bnr", dy_blocks, g_w) * s
    d_w = tf.einsum("bnr,bnc->nrc", g_u, dy_blocks)
    d_dy = tf.einsum("bnr,nrc->bnc", g_u, weights) + tf.einsum("bnr,nrc->bnc", h, g_w)
    return (
        tf.reshape(d_u, tf.shape(a)),
        tf.reshape(tf.reduce_sum(d_u, axis=0), [-1]),
        tf.reshape(d_w, [-1]),
        tf.reshape(d_dy, tf.shape(dy)),
    )
