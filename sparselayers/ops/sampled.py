"""The values gradient of scattered patterns: a sampled dense-dense product.

For ``y = x @ W`` the gradient of the entry ``(i, j)`` of ``W`` is
``sum_b x[b, i] * dy[b, j]``: one dot product of length ``batch`` per entry,
the largest single cost of a training step with a scattered pattern.
Gathering both operands per entry and reducing reads and writes several
``(nnz, batch)`` temporaries. :class:`GroupedSampledProduct` instead groups
the pattern's output columns ``g`` at a time and computes, per group, one
small matmul of the gathered input rows by the group's ``g`` columns of
``dy``: ``g`` times the useful FLOPs, but one gather instead of two, no
elementwise passes, and matmul speed.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from sparselayers.ops.base import constant, index_dtype
from sparselayers.sparsity_pattern import ENTRY_CHUNK

#: Output columns per group. Each entry costs ``2 * batch * g`` FLOPs in the
#: group's matmul, so small groups waste less, large ones make larger
#: matmuls. 2-core Intel Xeon (family 6 model 207), 4096 x 4096 at 1%,
#: batch 256, values gradient alone: g = 8 took 33 ms, 16 42 ms, 32 54 ms,
#: the two-gather reduction 61 ms (all under the same load).
GROUP = 8
#: Padded entries gathered per chunk of groups (``batch`` floats each): the
#: gathered block of a chunk stays near the core's cache size at batch 256.
CHUNK_ENTRIES = 4096
#: At most this many chunks (large patterns get larger chunks): every
#: unrolled chunk's ops cost memory and tracing time of their own. 100,000 x
#: 100,000 at 10^7 entries, Adam, batch 64 (Intel Xeon): 256 chunks peaked at
#: 102 to 106 bytes per entry with a 1.3 to 1.7 s step, 64 chunks at 88 bytes
#: and 0.93 s. Patterns below about 260,000 entries keep chunks of
#: :data:`CHUNK_ENTRIES` (4096 x 4096 at 1%: 43 chunks).
MAX_CHUNKS = 64


class _SampledProduct:
    """The products ``d[k] = sum_b x[b, rows[k]] * dy[b, cols[k]]``; subclasses
    compute them from ``x.T`` and ``dy.T`` (:meth:`transposed`)."""

    nnz: int
    tensors: tuple[tf.Tensor, ...]

    def __call__(self, x: tf.Tensor, dy: tf.Tensor, tensors: tuple[tf.Tensor, ...] | None = None) -> tf.Tensor:
        """The ``(nnz,)`` products, in the pattern's canonical order."""
        return self.transposed(tf.transpose(x), tf.transpose(dy), tensors)

    def transposed(self, x_t: tf.Tensor, dy_t: tf.Tensor, tensors: tuple[tf.Tensor, ...] | None = None) -> tf.Tensor:
        """The products from ``x.T`` and ``dy.T``, which a kernel may hold already."""
        raise NotImplementedError


class GroupedSampledProduct(_SampledProduct):
    """``d[k] = sum_b x[b, rows[k]] * dy[b, cols[k]]`` for every entry ``k`` of a pattern.

    Columns are dealt into groups of ``group`` with about equal entry counts
    (largest first, in a snake), so that padding every group to the largest
    count wastes little; a column with more than twice the mean count is
    split into several pieces first, each taking a place of its own (the
    padding stays below about ``2 / group`` of the entries whatever the
    column counts). Per group, the input rows of its entries (padded
    with row 0, whose products are never read) are gathered once and
    multiplied by the group's columns of ``dy`` in one batched matmul; the
    entry's own column of the product is its result.

    Holds, per entry, a padded row index, the position of its product within
    its chunk and its canonical place (int32 where they fit): about 12
    bytes. Temporaries stay within a chunk, about :data:`CHUNK_ENTRIES`
    times ``batch`` floats, two chunks at a time.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> from sparselayers.ops.sampled import GroupedSampledProduct
    >>> p = sl.patterns.random((6, 5), density=0.5, seed=0)
    >>> x, dy = np.ones((3, 6), "float32"), np.full((3, 5), 2.0, "float32")
    >>> GroupedSampledProduct(p)(x, dy).numpy().tolist() == [6.0] * p.nnz
    True
    """

    def __init__(self, pattern, *, group: int = GROUP, chunk_entries: int = CHUNK_ENTRIES):
        n, m = pattern.shape
        self.nnz = nnz = pattern.nnz
        # Per-entry arrays are int32 where they fit and are filled a block
        # of entries at a time (ENTRY_CHUNK): at 10^7 entries the int64 arrays
        # and their temporaries took about 100 bytes per entry at once.
        entry = index_dtype(nnz).as_numpy_dtype
        cols = pattern.cols
        # Columns with entries, split into pieces of at most twice their mean
        # count: a hub column (one unit fed by every input) would otherwise
        # set the padded size of every group.
        counts = np.bincount(cols, minlength=m)
        cap = max(1, -(-2 * nnz // max(1, np.count_nonzero(counts))))
        pieces = -(-counts // cap)
        column_of = np.repeat(np.arange(m), pieces)  # the real column of each piece
        by_column = np.argsort(cols, kind="stable").astype(entry)
        column_start = np.cumsum(counts) - counts
        piece_start = np.cumsum(pieces) - pieces
        piece = np.empty(nnz, entry)  # the piece of each entry
        for s in range(0, nnz, ENTRY_CHUNK):
            k = by_column[s : s + ENTRY_CHUNK]
            rank = np.arange(s, s + k.size) - column_start[cols[k]]  # entry's rank within its column
            piece[k] = piece_start[cols[k]] + rank // cap
        del by_column
        n_pieces = max(1, column_of.size)
        piece_counts = np.bincount(piece, minlength=n_pieces)
        group = max(1, min(group, n_pieces))
        n_groups = -(-n_pieces // group)
        # Snake deal of pieces, most entries first: group sums stay even.
        by_count = np.argsort(-piece_counts, kind="stable")
        rounds = np.arange(n_pieces) // n_groups
        slot_in_round = np.arange(n_pieces) % n_groups
        group_of = np.empty(n_pieces, np.int64)
        group_of[by_count] = np.where(rounds % 2 == 0, slot_in_round, n_groups - 1 - slot_in_round)
        place_of = np.empty(n_pieces, np.int64)
        place_of[by_count] = rounds  # the piece's place within its group
        # Each group's real columns in place order, padded with column 0 (never read).
        columns = np.zeros((n_groups, group), np.int64)
        columns[group_of[: column_of.size], place_of[: column_of.size]] = column_of
        # Entries ordered by group; position of each within its group.
        entry_group = group_of.astype(index_dtype(n_groups).as_numpy_dtype)[piece]
        order = np.argsort(entry_group, kind="stable").astype(entry)
        sizes = np.bincount(entry_group, minlength=n_groups)
        self.padded = int(sizes.max()) if nnz else 1
        first = np.cumsum(sizes) - sizes
        slot = np.empty(nnz, entry)
        for s in range(0, nnz, ENTRY_CHUNK):
            k = order[s : s + ENTRY_CHUNK]
            slot[k] = np.arange(s, s + k.size) - first[entry_group[k]]
        rows = np.zeros((n_groups, self.padded), index_dtype(n).as_numpy_dtype)
        for s in range(0, nnz, ENTRY_CHUNK):
            rows[entry_group[s : s + ENTRY_CHUNK], slot[s : s + ENTRY_CHUNK]] = pattern.rows[s : s + ENTRY_CHUNK]
        rows = constant(rows, index_dtype(n))
        # Chunks of whole groups; each keeps its own entries' products, in
        # group order, at their flat positions within the chunk's product.
        per_chunk = max(1, chunk_entries // self.padded, -(-n_groups // MAX_CHUNKS))
        self._bounds = list(range(0, n_groups, per_chunk)) + [n_groups]
        by_group = order  # entries sorted by group (stable: canonical within a group)
        chunk_size = per_chunk * self.padded * group
        local = np.empty(nnz, index_dtype(chunk_size).as_numpy_dtype)
        canonical = np.empty(nnz, entry)  # the inverse permutation of by_group
        for s in range(0, nnz, ENTRY_CHUNK):
            k = by_group[s : s + ENTRY_CHUNK]
            g = entry_group[k].astype(np.int64)
            local[s : s + k.size] = (g * self.padded + slot[k]) * group + place_of[piece[k]] - g // per_chunk * chunk_size
            canonical[k] = np.arange(s, s + k.size)
        del piece, slot, order, by_group, entry_group
        # Entries before each chunk: the chunks hold whole groups, in order.
        ends = np.concatenate([[0], np.cumsum(sizes)])
        self._entry_bounds = ends[np.minimum(np.arange(len(self._bounds)) * per_chunk, n_groups)].tolist()
        #: The index constants, to pass to :meth:`transposed` explicitly from
        #: a custom gradient: a SavedModel saves a gradient function only
        #: if the tensors it uses are inputs of the forward function.
        self.tensors = (
            rows,
            constant(columns, index_dtype(m)),
            constant(local, index_dtype(chunk_size)),
            constant(canonical, index_dtype(self.nnz)),
        )

    def transposed(self, x_t: tf.Tensor, dy_t: tf.Tensor, tensors: tuple[tf.Tensor, ...] | None = None) -> tf.Tensor:
        """The products from ``x.T`` and ``dy.T``, which a kernel may hold already."""
        if not self.nnz:
            return tf.zeros([0], x_t.dtype)
        rows, columns, local, canonical = self.tensors if tensors is None else tensors
        dy_groups = tf.gather(dy_t, columns)  # (groups, group, batch)
        parts: list[tf.Tensor] = []
        bounds, entries = self._bounds, self._entry_bounds
        for k, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            # One chunk after the one before the last: two in flight keep both
            # cores busy while the temporaries stay bounded.
            with tf.control_dependencies(parts[-2:-1]):
                gathered = tf.gather(x_t, rows[start:stop])  # (chunk, padded, batch)
                product = tf.matmul(gathered, dy_groups[start:stop], transpose_b=True)
                parts.append(tf.gather(tf.reshape(product, [-1]), local[entries[k] : entries[k + 1]]))
        return tf.gather(tf.concat(parts, 0) if len(parts) > 1 else parts[0], canonical)


class GatheredSampledProduct(_SampledProduct):
    """The same products by gathering both operands per entry and reducing.

    For each chunk of :data:`CHUNK_ENTRIES` entries, the rows of ``x.T`` and
    ``dy.T`` are gathered, multiplied and summed over the batch: no wasted
    FLOPs but three ``(chunk, batch)`` temporaries per chunk. The chunks are
    the iterations of one ``tf.while_loop``, at most two in flight, so the
    temporaries and the graph stay small whatever the pattern's size (an
    unrolled chunk costs its own memory in the traced graph). Reads the
    pattern's ``(nnz, 2)`` int32 coordinates: ``indices``, a tensor a kernel
    already holds (no memory of its own), or a constant of 8 bytes per entry.
    """

    def __init__(self, pattern, *, indices: tf.Tensor | None = None, chunk_entries: int = CHUNK_ENTRIES):
        self.nnz = pattern.nnz
        self._chunk = chunk_entries
        self.tensors = (constant(pattern.indices, tf.int32) if indices is None else indices,)

    def transposed(self, x_t: tf.Tensor, dy_t: tf.Tensor, tensors: tuple[tf.Tensor, ...] | None = None) -> tf.Tensor:
        """The products from ``x.T`` and ``dy.T``, which a kernel may hold already."""
        if not self.nnz:
            return tf.zeros([0], x_t.dtype)
        (indices,) = self.tensors if tensors is None else tensors
        chunk, count = self._chunk, -(-self.nnz // self._chunk)

        def body(k, parts):
            rows, cols = tf.unstack(indices[k * chunk : (k + 1) * chunk], axis=1)
            return k + 1, parts.write(k, tf.reduce_sum(tf.gather(x_t, rows) * tf.gather(dy_t, cols), axis=1))

        parts = tf.TensorArray(x_t.dtype, size=count, infer_shape=False, element_shape=tf.TensorShape([None]))
        _, parts = tf.while_loop(lambda k, _: k < count, body, (0, parts), parallel_iterations=2)
        return parts.concat()


class DenseSampledProduct(_SampledProduct):
    """The same products as entries of the dense ``x.T @ dy``.

    One GEMM of ``input_dim x units`` outputs, whatever the density: on
    devices with a fast GEMM and slow gathers (GPUs) this can be the fastest
    strategy from a few percent of density. Holds the entries' flat
    positions, 4 bytes each where they fit; the transient is the dense
    ``(input_dim, units)`` product.
    """

    def __init__(self, pattern):
        n, m = pattern.shape
        self.nnz = pattern.nnz
        self.tensors = (constant(pattern.linear, index_dtype(n * m)),)

    def transposed(self, x_t: tf.Tensor, dy_t: tf.Tensor, tensors: tuple[tf.Tensor, ...] | None = None) -> tf.Tensor:
        """The products from ``x.T`` and ``dy.T``, which a kernel may hold already."""
        (positions,) = self.tensors if tensors is None else tensors
        return tf.gather(tf.reshape(tf.matmul(x_t, dy_t, transpose_b=True), [-1]), positions)


#: The values-gradient strategies by name, as the csr kernels use them.
STRATEGIES = {"grouped": GroupedSampledProduct, "gather": GatheredSampledProduct, "dense": DenseSampledProduct}
