"""The ``kernel="auto"`` rule: pick by structure, density and size.

The thresholds are the crossovers measured by ``benchmarks/crossovers.py``
(training step, 4096 x 4096, batch 256, float32, 2-core CPU: AMD EPYC, and
Intel Xeon where said); the figures quoted below are its medians in
milliseconds, structured kernel vs CSR.
"""

from __future__ import annotations

from sparselayers.sparsity_pattern import SparsityPattern
from sparselayers.structure import block_shape, detect_band

#: Mean entries per dense rectangle from which one batched matmul per block
#: shape beats CSR (2-core Intel Xeon, block kernel in (blocks, batch, rows)
#: layout): 2x2 blocks 13.8 vs 12.2, 4x4 blocks 9.9 vs 14.3, 8x8 blocks 8.4
#: vs 19.9, 16x1 blocks 3.5 vs 5.7.
BLOCK_MIN_AREA = 16
#: Mean rows per rectangle below which the split is really rows of a band
#: or of a random pattern, not blocks.
BLOCK_MIN_ROWS = 2
#: Band width (``lower + upper + 1``) from which the tiled banded kernel
#: beats CSR: width 17 12.1 vs 10.6, width 33 15.1 vs 15.8, width 65 21.5
#: vs 27.5.
BAND_MIN_WIDTH = 32
#: Band density from which the dense kernel beats the tiled banded one
#: (4096 x 4096, Intel Xeon): width 513 (12%) 538 vs 626, width 1025 (23%)
#: 940 vs 546, width 4097 (75%) 3528 vs 816.
BAND_MAX_DENSITY = 0.15
#: Density from which multiplying by the densified kernel beats CSR: at 5%
#: 87.2 vs 75.8, at 8% 86.3 vs 127.0.
DENSE_MIN_DENSITY = 0.06
#: Largest ``input_dim * units`` the dense kernel may materialise (256 MiB f32).
DENSE_MAX_ENTRIES = 2**26


def choose_kernel(pattern: SparsityPattern) -> str:
    """Name of the kernel that ``kernel="auto"`` uses for ``pattern``.

    In order:

    1. ``"block"`` for an empty pattern, or one made of dense rectangles of
       at least :data:`BLOCK_MIN_AREA` entries and :data:`BLOCK_MIN_ROWS`
       rows on average (block diagonal, block sparse, fully dense);
    2. ``"banded"`` for a full diagonal band of width at least
       :data:`BAND_MIN_WIDTH`, unless it is :data:`BAND_MAX_DENSITY` dense
       and the dense kernel fits;
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
    blocks = block_shape(pattern)
    if blocks.mean_area >= BLOCK_MIN_AREA and blocks.mean_rows >= BLOCK_MIN_ROWS:
        return "block"
    band = detect_band(pattern)
    if band is not None and band.width >= BAND_MIN_WIDTH:
        return "dense" if pattern.density >= BAND_MAX_DENSITY and fits_dense(pattern) else "banded"
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


#: Kernels whose ops every export format can express (LiteRT builtins or
#: ONNX operators); others are swapped for one of these at export.
EXPORTABLE = ("block", "banded", "dense", "gather")


def choose_export_kernel(pattern: SparsityPattern, preferred: str, *, forced: bool = False) -> str:
    """The kernel a layer traces with while Keras exports it.

    SavedModel keeps ``preferred``: TensorFlow serves every kernel. LiteRT and
    ONNX get ``preferred`` if they can express it, else the dense kernel
    (or gather, past :data:`DENSE_MAX_ENTRIES`). A kernel the user forced
    that the format cannot express raises ValueError before conversion.
    """
    from sparselayers.ops.context import export_format

    format = export_format()  # noqa: A001
    if format in (None, "tf_saved_model") or preferred in EXPORTABLE:
        return preferred
    if forced:
        raise ValueError(
            f"`kernel='{preferred}'` cannot be exported to {format}: its ops have no {format} "
            f"equivalent. Use kernel='auto' (swapped at export) or one of {list(EXPORTABLE)}. "
            f"Received: kernel='{preferred}'"
        )
    return "dense" if fits_dense(pattern) and pattern.density >= 0.05 else "gather"
