"""Pattern generators. Each returns a :class:`~sparselayers.SparsityPattern`.

Named after what they build, like ``scipy.sparse.block_diag`` and
``diags_array``; the shape comes first and options are keyword-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparselayers._validation import _short, check_int, check_probability, check_shape
from sparselayers.sparsity_pattern import SparsityPattern

__all__ = ["block_diagonal", "block_sparse", "banded", "dense", "local", "n_of_m", "random"]


def _block_shapes(blocks: Any) -> list[tuple[int, int]]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not len(blocks):
        raise TypeError(
            "`blocks` must be a non-empty sequence of (rows, cols) pairs. "
            f"Received: blocks={_short(blocks)}"
        )
    shapes = []
    for k, block in enumerate(blocks):
        try:
            shapes.append(check_shape(block, f"blocks[{k}]"))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error}. Each block is a (rows, cols) pair of positive integers") from None
    return shapes


def block_diagonal(blocks: Sequence[tuple[int, int]]) -> SparsityPattern:
    """Dense blocks along the diagonal, like ``scipy.sparse.block_diag``.

    Block ``k`` of shape ``(r_k, c_k)`` connects inputs
    ``sum(r[:k]) .. sum(r[:k+1])`` with outputs ``sum(c[:k]) .. sum(c[:k+1])``:
    the pattern equals ``scipy.sparse.block_diag([np.ones(b) for b in blocks])``.

    Args:
        blocks: ``(rows, cols)`` of each block; sizes may differ.

    Example:

    >>> import sparselayers as sl
    >>> sl.patterns.block_diagonal([(2, 1), (1, 2)]).to_dense().astype(int)
    array([[1, 0, 0],
           [1, 0, 0],
           [0, 1, 1]])
    """
    shapes = _block_shapes(blocks)
    r = np.array([s[0] for s in shapes], np.int64)
    c = np.array([s[1] for s in shapes], np.int64)
    shape = check_shape((int(r.sum()), int(c.sum())))
    # Entry t of block k, laid out row-major inside the block.
    sizes = r * c
    block = np.repeat(np.arange(len(shapes)), sizes)
    t = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    rows = np.repeat(np.cumsum(r) - r, sizes) + t // c[block]
    cols = np.repeat(np.cumsum(c) - c, sizes) + t % c[block]
    return SparsityPattern._from_linear(rows * shape[1] + cols, shape)


def block_sparse(block_mask: Any, block_shape: tuple[int, int]) -> SparsityPattern:
    """Dense ``block_shape`` tiles wherever ``block_mask`` is nonzero.

    Equal to ``np.kron(block_mask != 0, np.ones(block_shape))``.

    >>> import sparselayers as sl
    >>> sl.patterns.block_sparse([[1, 0], [1, 1]], (1, 2)).to_dense().astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 1, 1]])
    """
    outer = SparsityPattern.from_dense(block_mask)
    shape = check_shape(block_shape, "block_shape")
    return outer.kron(dense(shape))


def dense(shape: tuple[int, int]) -> SparsityPattern:
    """Every entry of ``shape``: equal to ``np.ones(shape)``.

    >>> import sparselayers as sl
    >>> sl.patterns.dense((2, 3)).nnz
    6
    """
    shape = check_shape(shape)
    return SparsityPattern._from_linear(np.arange(shape[0] * shape[1], dtype=np.int64), shape)


def banded(shape: tuple[int, int], *, lower: int = 0, upper: int = 0) -> SparsityPattern:
    """Entries near the diagonal: ``(i, j)`` iff ``-lower <= j - i <= upper``.

    Equal to ``np.tri``-style masks:
    ``(j - i >= -lower) & (j - i <= upper)`` over ``np.indices(shape)``.

    >>> import sparselayers as sl
    >>> sl.patterns.banded((3, 4), lower=0, upper=1).to_dense().astype(int)
    array([[1, 1, 0, 0],
           [0, 1, 1, 0],
           [0, 0, 1, 1]])
    """
    n, m = check_shape(shape)
    lower = check_int(lower, "lower", minimum=0)
    upper = check_int(upper, "upper", minimum=0)
    lower, upper = min(lower, n - 1), min(upper, m - 1)
    offsets = np.arange(-lower, upper + 1, dtype=np.int64)
    rows = np.arange(n, dtype=np.int64)[:, None]
    cols = rows + offsets[None, :]
    keep = (cols >= 0) & (cols < m)
    rows = np.broadcast_to(rows, cols.shape)[keep]
    return SparsityPattern._from_linear(rows * m + cols[keep], (n, m))


def local(shape: tuple[int, int], *, window: int) -> SparsityPattern:
    """Each output sees ``window`` consecutive inputs around its position.

    Output ``j`` is centred on input ``floor((j + 0.5) * input_dim / units)``
    and its window is clipped to stay inside ``[0, input_dim)``, so every
    output has exactly ``min(window, input_dim)`` inputs: a 1-D locally
    connected layer without weight sharing.

    >>> import sparselayers as sl
    >>> sl.patterns.local((6, 3), window=2).to_dense().astype(int)
    array([[1, 0, 0],
           [1, 0, 0],
           [0, 1, 0],
           [0, 1, 0],
           [0, 0, 1],
           [0, 0, 1]])
    """
    n, m = check_shape(shape)
    window = min(check_int(window, "window", minimum=1), n)
    centre = ((np.arange(m) + 0.5) * n / m).astype(np.int64)
    start = np.clip(centre - window // 2, 0, n - window)
    rows = (start[None, :] + np.arange(window)[:, None]).ravel()
    cols = np.tile(np.arange(m, dtype=np.int64), window)
    return SparsityPattern._from_linear(np.sort(rows * m + cols), (n, m))


def _rng(seed: Any) -> np.random.Generator:
    if seed is None or isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(seed)
    if isinstance(seed, np.random.Generator):
        return seed
    raise TypeError(
        f"`seed` must be None, an int or a numpy Generator. Received: seed={_short(seed)}"
    )


def random(
    shape: tuple[int, int],
    *,
    density: float | None = None,
    fan_in: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> SparsityPattern:
    """A uniformly random pattern, like ``scipy.sparse.random_array``.

    Give exactly one of:

    - ``density``: exactly ``round(density * input_dim * units)`` entries,
      drawn without replacement over the whole matrix;
    - ``fan_in``: every output unit gets exactly ``fan_in`` distinct inputs.

    Args:
        shape: ``(input_dim, units)``.
        density: fraction of entries, in ``[0, 1]``.
        fan_in: inputs per output, in ``[0, input_dim]``.
        seed: an int, a ``numpy.random.Generator`` or None.

    Example:

    >>> import sparselayers as sl
    >>> sl.patterns.random((100, 50), density=0.1, seed=0).nnz
    500
    >>> sl.patterns.random((100, 50), fan_in=3, seed=0).fan_in.tolist() == [3] * 50
    True
    """
    n, m = check_shape(shape)
    if (density is None) == (fan_in is None):
        raise ValueError(
            "Give exactly one of `density` and `fan_in`. "
            f"Received: density={density}, fan_in={fan_in}"
        )
    rng = _rng(seed)
    if density is not None:
        density = check_probability(density, "density")
        nnz = int(round(density * n * m))
        linear = rng.choice(n * m, size=nnz, replace=False, shuffle=False)
        return SparsityPattern._from_linear(np.sort(linear.astype(np.int64)), (n, m))
    fan_in = check_int(fan_in, "fan_in", minimum=0, maximum=n)
    rows = _distinct_per_column(rng, n, m, fan_in)
    cols = np.repeat(np.arange(m, dtype=np.int64), fan_in)
    return SparsityPattern._from_linear(np.sort(rows * m + cols), (n, m))


def _distinct_per_column(rng: np.random.Generator, n: int, m: int, k: int) -> np.ndarray:
    """``k`` distinct draws from ``range(n)`` for each of ``m`` columns, flattened."""
    if k == 0:
        return np.zeros(0, np.int64)
    if n * m <= 2**24:
        # Vectorised: the k smallest of n uniform keys per column.
        keys = rng.random((m, n))
        return np.argpartition(keys, k - 1, axis=1)[:, :k].ravel().astype(np.int64)
    # Filled in place: a list of m small arrays, once concatenated, left their
    # memory to the allocator (about 9 bytes per entry at 10^7 entries, held
    # for the life of the process).
    rows = np.empty(m * k, np.int64)
    for j in range(m):
        rows[j * k : (j + 1) * k] = rng.choice(n, size=k, replace=False)
    return rows


#: Random keys drawn at once by :func:`n_of_m` (float64: 128 MiB), so a large
#: layer's pattern needs memory for its entries, not for every cell.
_CHUNK_CELLS = 2**24


def _check_n_of_m(n: Any, m: Any) -> tuple[int, int]:
    """``(n, m)`` as ints with ``1 <= n <= m``, or raises naming them."""
    n = check_int(n, "n", minimum=1)
    m = check_int(m, "m", minimum=1)
    if n > m:
        raise ValueError(f"`n` must be at most `m` (n of every m inputs). Received: n={n}, m={m}")
    return n, m


def n_of_m(
    shape: tuple[int, int], n: int, m: int, *, seed: int | np.random.Generator | None = None
) -> SparsityPattern:
    """N:M sparsity: exactly ``n`` entries in every group of ``m`` consecutive inputs of each output.

    The inputs fall into groups ``0 .. m-1``, ``m .. 2m-1``, ...; in every
    output column each group holds exactly ``n`` entries, drawn uniformly and
    independently per group and column. The pattern ``p`` satisfies
    ``(p.to_dense().reshape(input_dim // m, m, units) != 0).sum(axis=1) == n``
    everywhere, so every output has fan-in ``n * input_dim // m`` and the
    density is ``n / m`` (2:4 is the layout of NVIDIA's sparse tensor cores).
    ``sl.sparsify(model, n_of_m=(n, m))`` picks the ``n`` largest of each
    group of a trained layer instead.

    Args:
        shape: ``(input_dim, units)``; ``m`` must divide ``input_dim``.
        n: entries kept per group, in ``[1, m]``.
        m: inputs per group, >= 1.
        seed: an int, a ``numpy.random.Generator`` or None.

    Raises:
        ValueError: ``n`` or ``m`` below 1, ``n > m``, or ``m`` does not
            divide ``input_dim``.
        TypeError: ``n`` or ``m`` not an integer, or a bad ``seed``.

    Example:

    >>> import sparselayers as sl
    >>> sl.patterns.n_of_m((8, 3), 1, 4, seed=0).to_dense().astype(int)
    array([[0, 0, 0],
           [0, 0, 0],
           [0, 1, 0],
           [1, 0, 1],
           [0, 0, 1],
           [1, 0, 0],
           [0, 1, 0],
           [0, 0, 0]])
    """
    rows, units = check_shape(shape)
    n, m = _check_n_of_m(n, m)
    if rows % m:
        raise ValueError(
            f"`m` must divide the number of inputs, shape[0] = {rows}, so that the inputs form whole groups. "
            f"Received: shape={(rows, units)}, m={m}"
        )
    rng = _rng(seed)
    groups = rows // m
    per_chunk = max(1, _CHUNK_CELLS // (units * m))
    linear = np.empty((groups, units, n), np.int64)
    for start in range(0, groups, per_chunk):
        stop = min(start + per_chunk, groups)
        # The n smallest of m uniform keys: a uniform n-subset of each group.
        keys = rng.random((stop - start, units, m))
        picked = np.argpartition(keys, n - 1, axis=2)[..., :n]
        group_rows = np.arange(start, stop, dtype=np.int64)[:, None, None] * m + picked
        linear[start:stop] = group_rows * units + np.arange(units, dtype=np.int64)[None, :, None]
    return SparsityPattern._from_linear(np.sort(linear, axis=None), (rows, units))
