"""The ``kernel="auto"`` rule: pick by structure, density and size.

The thresholds come from ``benchmarks/`` on a 2-core CPU (training step,
batch 256, float32); docs/kernels.md shows the measurements behind them.
"""

from __future__ import annotations

from sparselayers.sparsity_pattern import SparsityPattern
from sparselayers.structure import detect_band, detect_blocks

#: Mean entries per dense rectangle from which one batched matmul per block
#: shape beats CSR (measured: 4x4 blocks 7.2 ms vs 8.1 ms, 2x2 blocks
#: 8.8 ms vs 6.0 ms, training step at 4096 x 4096, batch 256).
BLOCK_MIN_AREA = 16
#: Mean rows per rectangle below which the split is really rows of a band
#: or of a random pattern, not blocks.
BLOCK_MIN_ROWS = 2
#: Band width (``lower + upper + 1``) from which the tiled banded kernel
#: beats CSR (measured: width 9 9.5 ms vs 9.2 ms, width 17 9.1 ms vs 13.0 ms).
BAND_MIN_WIDTH = 12
#: Density from which multiplying by the densified kernel is fastest
#: (measured: CSR 1.07x and dense 1.06x masked-dense speed at 3%,
#: CSR 0.28x and dense 1.02x at 10%).
DENSE_MIN_DENSITY = 0.05
#: Largest ``input_dim * units`` the dense kernel may materialise (256 MiB f32).
DENSE_MAX_ENTRIES = 2**26


def choose_kernel(pattern: SparsityPattern) -> str:
    """Name of the kernel that ``kernel="auto"`` uses for ``pattern``.

    In order:

    1. ``"block"`` for an empty pattern, or one made of dense rectangles of
       at least :data:`BLOCK_MIN_AREA` entries and :data:`BLOCK_MIN_ROWS`
       rows on average (block diagonal, block sparse, fully dense);
    2. ``"banded"`` for a full diagonal band of width at least
       :data:`BAND_MIN_WIDTH`;
    3. ``"dense"`` from a density of :data:`DENSE_MIN_DENSITY`, if the dense
       kernel fits in :data:`DENSE_MAX_ENTRIES`;
    4. ``"csr"`` otherwise.

    >>> import sparselayers as sl
    >>> sl.ops.choose_kernel(sl.patterns.block_diagonal([(16, 16)] * 8))
    'block'
    >>> sl.ops.choose_kernel(sl.patterns.random((1000, 1000), density=0.01, seed=0))
    'csr'
    """
    if pattern.nnz == 0:
        return "block"
    blocks = detect_blocks(pattern)
    if blocks.mean_area >= BLOCK_MIN_AREA and blocks.n_rows.mean() >= BLOCK_MIN_ROWS:
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
