"""The ``kernel="auto"`` rule: pick by structure, density and size.

The thresholds come from ``benchmarks/`` on a 2-core CPU (training step,
batch 256, float32); docs/kernels.md shows the measurements behind them.
"""

from __future__ import annotations

from sparselayers.sparsity_pattern import SparsityPattern
from sparselayers.structure import detect_band, detect_blocks

#: Mean entries per dense rectangle from which one batched matmul per block
#: shape beats the general sparse kernels.
BLOCK_MIN_AREA = 64
#: Band width (``lower + upper + 1``) from which the tiled banded kernel wins.
BAND_MIN_WIDTH = 8
#: Density from which multiplying by the densified kernel is fastest.
DENSE_MIN_DENSITY = 0.05
#: Largest ``input_dim * units`` the dense kernel may materialise (256 MiB f32).
DENSE_MAX_ENTRIES = 2**26


def choose_kernel(pattern: SparsityPattern) -> str:
    """Name of the kernel that ``kernel="auto"`` uses for ``pattern``.

    In order: an empty pattern or one made of dense rectangles of at least
    :data:`BLOCK_MIN_AREA` entries on average takes ``"block"``; a full band
    of width at least :data:`BAND_MIN_WIDTH` takes ``"banded"``; a density of
    at least :data:`DENSE_MIN_DENSITY` (when the dense kernel fits in
    :data:`DENSE_MAX_ENTRIES`) takes ``"dense"``; everything else ``"csr"``.

    >>> import sparselayers as sl
    >>> sl.ops.choose_kernel(sl.patterns.block_diagonal([(16, 16)] * 8))
    'block'
    >>> sl.ops.choose_kernel(sl.patterns.random((1000, 1000), density=0.01, seed=0))
    'csr'
    """
    if pattern.nnz == 0:
        return "block"
    blocks = detect_blocks(pattern)
    if blocks.mean_area >= BLOCK_MIN_AREA:
        return "block"
    band = detect_band(pattern)
    if band is not None and band.width >= BAND_MIN_WIDTH:
        return "banded"
    if pattern.density >= DENSE_MIN_DENSITY and fits_dense(pattern):
        return "dense"
    return "csr"


def fits_dense(pattern: SparsityPattern) -> bool:
    return pattern.shape[0] * pattern.shape[1] <= DENSE_MAX_ENTRIES


def choose_jit_kernel(pattern: SparsityPattern, preferred: str) -> str:
    """A kernel XLA can compile: ``preferred`` if it can, else dense or gather."""
    from sparselayers.ops import KERNELS

    if KERNELS[preferred].supports_jit:
        return preferred
    return "dense" if fits_dense(pattern) else "gather"
