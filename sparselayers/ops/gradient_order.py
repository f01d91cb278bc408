"""A layer's weight gradient held back until its input gradient is computed.

In a training step that also needs the gradient of a layer's input (any
layer after the first, or an input the tape watches), TensorFlow runs the
input-gradient product and the weight gradient side by side, and the
optimizer may update the weights as soon as their gradient exists. If the
input-gradient product is still reading the weights then, the update
cannot write in place: ``AssignSubVariableOp`` first copies the whole
variable (copy on write), while the product competes for the same cores.
On the 2-core Intel Xeon, ``Towers(1024, [16, 16])`` over 256 inputs (batch
256, SGD, gradients of the weights and the input) took 29.8 to 31.1 ms a
step with that race, and 22.6 to 22.8 ms with the update after the input
gradient; a Keras ``Dense(16384)`` under a ``Dense(1024)`` head, 127 against
114 ms.

:func:`input_gradient_first` ties the two: it passes ``x`` and ``values``
through unchanged, and in the backward pass releases the gradient of
``values`` only after the gradient of ``x`` exists, so the update finds the
weights no longer read. Where nothing needs the input's gradient (data fed
to the first layer) it adds nothing: a dependency on that gradient would
make TensorFlow compute it.

>>> import numpy as np, tensorflow as tf
>>> x, w = tf.constant(np.ones((2, 3), "float32")), tf.Variable(np.ones((3, 4), "float32"))
>>> with tf.GradientTape() as tape:
...     tape.watch(x)
...     tied_x, tied_w = input_gradient_first(x, tf.convert_to_tensor(w))
...     loss = tf.reduce_sum(tied_x @ tied_w)
>>> dx, dw = tape.gradient(loss, [x, w])
>>> dx.numpy().tolist(), dw.numpy()[0].tolist()
([[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]], [2.0, 2.0, 2.0, 2.0])
"""

from __future__ import annotations

import tensorflow as tf


def _input_gradient_needed(x: tf.Tensor) -> bool:
    """Whether a gradient tape that is recording would differentiate through ``x``.

    False as well under a forward-mode accumulator that tracks ``x``
    (``tf.autodiff.ForwardAccumulator``), which would differentiate the tie's
    gradient function too.
    """
    try:
        from tensorflow.python import pywrap_tfe
        from tensorflow.python.eager import record
    except ImportError:  # a TensorFlow without these modules: no tie, the step stays correct
        return False
    if pywrap_tfe.TFE_Py_PackJVPs([x])[1]:
        return False
    return bool(record.should_record_backprop([x]))


def input_gradient_first(x: tf.Tensor, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(x, values)`` unchanged; backward, the gradient of ``values`` follows the gradient of ``x``.

    ``x`` is a dense tensor; a ``tf.SparseTensor`` (no input gradient) or an
    ``x`` no tape differentiates through is returned as is, with ``values``.
    """
    if isinstance(x, tf.SparseTensor) or not _input_gradient_needed(x):
        return x, values

    @tf.custom_gradient
    def tie(x, values):
        def grad(dx, dvalues):
            if dx is None or dvalues is None:
                return dx, dvalues
            with tf.control_dependencies([dx]):
                if isinstance(dvalues, tf.IndexedSlices):
                    return dx, tf.IndexedSlices(tf.identity(dvalues.values), tf.identity(dvalues.indices),
                                                dvalues.dense_shape)
                return dx, tf.identity(dvalues)

        return (tf.identity(x), tf.identity(values)), grad

    return tie(x, values)
