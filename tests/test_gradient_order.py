"""The weight gradient waits for the input gradient (sparselayers.ops.gradient_order)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import sparselayers as sl
from sparselayers.ops.gradient_order import input_gradient_first


def _ancestors(tensor: tf.Tensor) -> set[str]:
    """Names of every op ``tensor`` depends on, through data and control edges."""
    seen, stack = set(), [tensor.op]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


def _gradient_graph(watch_x: bool, tie: bool = True):
    x = tf.TensorSpec((4, 3), tf.float64)
    v = tf.TensorSpec((3, 5), tf.float64)

    @tf.function
    def grads(x, v):
        with tf.GradientTape() as tape:
            tape.watch([x, v] if watch_x else [v])
            tied_x, tied_v = input_gradient_first(x, v) if tie else (x, v)
            y = tf.reduce_sum(tf.sin(tf.matmul(tied_x, tied_v)))
        dx, dv = tape.gradient(y, [x, v])
        return (dx if watch_x else tf.zeros_like(x)), dv

    return grads, grads.get_concrete_function(x, v).graph


def test_values_gradient_depends_on_the_input_gradient_only_where_it_is_needed():
    def dx_computed_before_dv(graph):
        dx, dv = graph.outputs  # each behind the function's output Identity
        return _ancestors(dx.op.inputs[0]) <= _ancestors(dv)

    # Tied, every op computing dx precedes dv: the update can only start once dx exists.
    assert dx_computed_before_dv(_gradient_graph(watch_x=True)[1])
    assert not dx_computed_before_dv(_gradient_graph(watch_x=True, tie=False)[1])
    _, graph = _gradient_graph(watch_x=False)
    assert not [op for op in graph.get_operations() if op.type == "IdentityN"]  # nothing added


def test_tied_gradients_equal_the_float64_reference():
    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(4, 3)), rng.normal(size=(3, 5))
    grads, _ = _gradient_graph(watch_x=True)
    dx, dv = (t.numpy() for t in grads(tf.constant(x), tf.constant(v)))
    upstream = np.cos(x @ v)
    np.testing.assert_allclose(dx, upstream @ v.T, rtol=1e-12)
    np.testing.assert_allclose(dv, x.T @ upstream, rtol=1e-12)


def test_a_layer_behind_another_ties_its_values_and_trains_as_before():
    # SparseDense over a watched input: second-order gradients and values still
    # match the dense float64 reference x @ W.
    pattern = sl.patterns.random((6, 4), density=0.5, seed=0)
    layer = sl.SparseDense(pattern, use_bias=False, dtype="float64")
    x = tf.constant(np.random.default_rng(1).normal(size=(3, 6)))
    layer.build(x.shape)
    w = pattern.to_dense(layer.values.numpy())
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = tf.reduce_sum(layer(x) ** 2)
        dx = inner.gradient(y, x)
        penalty = tf.reduce_sum(dx**2)
    dvalues = outer.gradient(penalty, layer.values)
    np.testing.assert_allclose(dx.numpy(), 2 * (x.numpy() @ w) @ w.T, rtol=1e-10)
    # penalty = |G|^2 with G = 2 x W W^T: d/dW = 4 (x^T G W + G^T x W), read at the pattern's entries.
    xv = x.numpy()
    g = 2 * xv @ w @ w.T
    dw = 4 * (xv.T @ g @ w + g.T @ xv @ w)
    np.testing.assert_allclose(dvalues.numpy(), dw[pattern.rows, pattern.cols], rtol=1e-10)


def test_forward_mode_differentiates_a_layer_whose_input_a_tape_watches():
    # Under a ForwardAccumulator the tie steps aside: the JVP is x_dot @ W.
    pattern = sl.patterns.random((16, 12), density=0.3, seed=0)
    layer = sl.SparseDense(pattern, kernel="dense", use_bias=False, dtype="float64")
    layer.build((None, 16))
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 16)))
    tangent = tf.constant(np.random.default_rng(1).normal(size=(3, 16)))
    with tf.autodiff.ForwardAccumulator(x, tangent) as accumulator:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
    w = pattern.to_dense(layer.values.numpy())
    np.testing.assert_allclose(accumulator.jvp(y).numpy(), tangent.numpy() @ w, rtol=1e-12)
