"""Densify ``values`` into the full kernel, then matmuls: for high densities."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from sparselayers.ops.base import Kernel, constant, index_dtype, matmul

#: Row slices of the kernel densified and multiplied separately. Densifying
#: (TF's SparseToDense) runs on one thread, so slices densify in parallel;
#: ``x @ W`` becomes a sum of ``x[:, rows] @ W[rows]``. On the 2-core Intel
#: Xeon (4096 x 4096, batch 256, training step) 4 parts were 6% to 15%
#: faster than 1, within the noise of a shared machine; the flat int32
#: positions take 4 bytes per entry where 2-D int64 indices took 16.
PARTS = 4
#: No slice of fewer rows: below that the matmuls lose efficiency.
MIN_PART_ROWS = 256


class DenseKernel(Kernel):
    """Scatters ``values`` into row slices of the ``(input_dim, units)`` kernel and multiplies.

    Memory and FLOPs are those of a dense layer, but only ``values`` is a
    variable, so gradients and optimizer state stay ``nnz``-sized. Each slice
    holds its entries' flat positions (int32 where they fit, 4 bytes per
    entry); the values gradient gathers them from the dense kernel gradient.
    XLA compiles it.
    """

    name = "dense"
    supports_jit = True

    def __init__(self, pattern, *, parts: int | None = None):
        super().__init__(pattern)
        n, m = pattern.shape
        # never an empty slice: a matmul with a zero inner dimension can abort oneDNN
        parts = min(parts or max(1, min(PARTS, n // MIN_PART_ROWS)), n)
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        starts = pattern.row_pointers[bounds]
        self._row_sizes = np.diff(bounds).tolist()
        self._entry_sizes = np.diff(starts).tolist()
        self._positions = [
            # Positions within the slice, from its own entries: no int64 array of all of them.
            constant((pattern.rows[s:e].astype(np.int64) - r) * m + pattern.cols[s:e], index_dtype(int(size) * m))
            for r, s, e, size in zip(bounds[:-1], starts[:-1], starts[1:], self._row_sizes)
        ]

    def weights(self, values: tf.Tensor) -> tf.Tensor:
        """The whole ``(input_dim, units)`` kernel of ``values`` (a convolution's dense form multiplies it whole)."""
        m = self.pattern.shape[1]
        vs = tf.split(values, self._entry_sizes) if len(self._entry_sizes) > 1 else [values]
        slices = [_densify(v, positions, rows, m) for v, positions, rows in zip(vs, self._positions, self._row_sizes)]
        return slices[0] if len(slices) == 1 else tf.concat(slices, axis=0)

    def __call__(self, x, values):
        m = self.pattern.shape[1]
        xs = tf.split(x, self._row_sizes, axis=1) if len(self._row_sizes) > 1 else [x]
        vs = tf.split(values, self._entry_sizes) if len(self._entry_sizes) > 1 else [values]
        y = None
        for x_part, v_part, positions, rows in zip(xs, vs, self._positions, self._row_sizes):
            product = matmul(x_part, _densify(v_part, positions, rows, m))
            y = product if y is None else y + product
        return y


def _densify(values: tf.Tensor, positions: tf.Tensor, rows: int, units: int) -> tf.Tensor:
    """The ``(rows, units)`` matrix with ``values`` at flat ``positions``, zeros elsewhere."""

    # positions is an explicit input, not a closure, so that a SavedModel
    # captures it with the forward function and can save this gradient.
    @tf.custom_gradient
    def densify(values, positions):
        flat = tf.raw_ops.SparseToDense(
            sparse_indices=positions,
            output_shape=tf.constant([rows * units], positions.dtype),
            sparse_values=values,
            default_value=tf.zeros([], values.dtype),
            validate_indices=False,
        )

        def grad(d_weights):
            return tf.gather(tf.reshape(d_weights, [-1]), positions), None

        return tf.reshape(flat, [rows, units]), grad

    return densify(values, positions)
