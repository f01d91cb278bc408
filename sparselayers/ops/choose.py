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
#: Density from which CSR products with the values gradient read from the
#: dense ``x.T @ dy`` (one GEMM) beat the grouped sampled product (2-core
#: Intel Xeon, under load, csr vs csr_dense_grad: 1% 64.0 vs 90.4, 2% 117.7
#: vs 110.8, 3% 113.1 vs 73.2, 5% 282.1 vs 165.0; the dense kernel 225.0 at
#: 5%, 229.1 at 10% where csr_dense_grad took 247.9). The cost ratio of the
#: two depends on the density alone, not on shape or batch.
CSR_DENSE_GRAD_MIN_DENSITY = 0.02
#: Largest ``input_dim * units`` the dense kernel may materialise (256 MiB f32).
DENSE_MAX_ENTRIES = 2**26
#: Kernels that materialise a dense ``input_dim x units`` matrix: the
#: kernel itself (``dense``) or the values gradient (``csr_dense_grad``).
DENSE_PRODUCT_KERNELS = ("dense", "csr_dense_grad")
#: Largest ``input_dim * units`` a forced ``dense`` or ``csr_dense_grad`` kernel
#: may materialise (8 GiB in float32): beyond it a training step would
#: exhaust the memory of most hosts, so the layer refuses at construction.
DENSE_HARD_LIMIT = 2**31


def choose_kernel(pattern: SparsityPattern) -> str:
    """Name of the kernel that ``kernel="auto"`` uses for ``pattern``.

    In order:

    1. ``"block"`` for an empty pattern, or one made of dense rectangles of
       at least :data:`BLOCK_MIN_AREA` entries and :data:`BLOCK_MIN_ROWS`
       rows on average (block diagonal, block sparse, fully dense); but
       ``"dense"`` when such rectangles share rows or columns (scattered
       tiles) from a density of :data:`DENSE_MIN_DENSITY`, if it fits;
    2. ``"banded"`` for a full diagonal band of width at least
       :data:`BAND_MIN_WIDTH`, unless it is :data:`BAND_MAX_DENSITY` dense
       and the dense kernel fits;
    3. ``"dense"`` from a density of :data:`DENSE_MIN_DENSITY`, if the dense
       kernel fits in :data:`DENSE_MAX_ENTRIES`;
    4. ``"csr_dense_grad"`` from a density of
       :data:`CSR_DENSE_GRAD_MIN_DENSITY`, if the dense product fits;
    5. ``"csr"`` otherwise.

    >>> import sparselayers as sl
    >>> sl.ops.choose_kernel(sl.patterns.block_diagonal([(16, 16)] * 8))
    'block'
    >>> sl.ops.choose_kernel(sl.patterns.random((1000, 1000), density=0.01, seed=0))
    'csr'
    """
    if pattern.nnz == 0:
        return "block"
    blocks = block_shape(pattern)
    dense_fits = pattern.density >= DENSE_MIN_DENSITY and fits_dense(pattern)
    if blocks.mean_area >= BLOCK_MIN_AREA and blocks.mean_rows >= BLOCK_MIN_ROWS:
        # Scattered tiles (sl.sparsify(block=...)) make the block kernel
        # gather each input row once per tile in its row: past the dense
        # threshold the dense kernel wins (2048 x 2048, batch 256, Intel Xeon:
        # 16x16 tiles at 10% 67 vs 23 ms, at 30% 185 vs 26 ms; 32x32 tiles at
        # 5% 19.7 vs 19.8 ms).
        return "dense" if blocks.shares_lines and dense_fits else "block"
    band = detect_band(pattern)
    if band is not None and band.width >= BAND_MIN_WIDTH:
        return "dense" if pattern.density >= BAND_MAX_DENSITY and fits_dense(pattern) else "banded"
    if dense_fits:
        return "dense"
    if pattern.density >= CSR_DENSE_GRAD_MIN_DENSITY and fits_dense(pattern):
        return "csr_dense_grad"
    return "csr"


def fits_dense(pattern: SparsityPattern) -> bool:
    return pattern.shape[0] * pattern.shape[1] <= DENSE_MAX_ENTRIES


def choose_jit_kernel(pattern: SparsityPattern, preferred: str) -> str:
    """A kernel XLA can compile: ``preferred`` if it can, else dense or gather."""
    from sparselayers.ops import KERNELS
    from sparselayers.ops.compiled import pure_tf_kernel

    preferred = pure_tf_kernel(preferred, pattern)
    if KERNELS[preferred].supports_jit:
        return preferred
    return "dense" if fits_dense(pattern) else "gather"


#: Kernels a user may force and still export to LiteRT and ONNX: each has
#: an export form (:mod:`sparselayers.ops.export_kernels`) reading the same
#: values with ops both formats express. TF's CSR ops have none.
EXPORTABLE = ("block", "banded", "dense", "gather")
#: Density from which an export inside ``sl.export.densified()`` multiplies
#: by its densified kernel, as in training. At batch 1 (``benchmarks/export.py``, 2048 x 2048, one
#: thread) the ELL form beat the dense artifact 2.3x or more up to 1% (LiteRT
#: and onnxruntime), tied at 3%, and at 5% tied on LiteRT but was 2.3x
#: slower on onnxruntime, if 10x smaller. From here on the artifact stores
#: the dense kernel, 4 bytes per cell.
EXPORT_DENSE_MIN_DENSITY = 0.06
#: Largest ratio of ELL slots (``units * width``, ``width`` the fullest
#: column) to ``nnz + units`` for which export uses the ELL kernel rather than
#: gather and segment sum (which onnxruntime runs slowly): the artifact stays
#: within a few times the entries, and columns may be uneven, as at low
#: densities, where a column holds a few entries more than the mean.
ELL_MAX_PADDING = 3.0


def choose_export_kernel(pattern: SparsityPattern, preferred: str, *, forced: bool = False) -> str:
    """The kernel a layer traces with while Keras exports it.

    SavedModel keeps ``preferred``: TensorFlow serves every kernel. For
    LiteRT and ONNX, a block or banded kernel keeps its structure, and a
    kernel the user forced keeps its computation (dense or gather). Other
    patterns get, by default, ``"dense"``: the kernel with exact zeros,
    which the converter stores in its own sparse format
    (:mod:`sparselayers.ops.sparse_storage`), so the file follows ``nnz``
    and the runtime multiplies at dense speed or faster. Two blocks change
    that layout for runtimes without sparse tensors:

    * :func:`sparselayers.export.gather_graph`: a graph of index constants,
      gathers and sums, whose size follows ``nnz`` on any runtime:
      ``"ell"``, or ``"gather"`` when the columns are too uneven for ELL
      (:data:`ELL_MAX_PADDING`), and ``"dense"`` only where it is the
      smaller artifact (from a density of about 1/2). Patterns whose dense
      kernel would not fit in :data:`DENSE_MAX_ENTRIES` always take it.
    * :func:`sparselayers.export.densified`: ``"dense"`` stored dense from a
      density of :data:`EXPORT_DENSE_MIN_DENSITY`, the gather graph below.

    A forced kernel that the format cannot express raises ValueError before
    conversion.

    >>> import sparselayers as sl
    >>> from sparselayers.ops.context import exporting
    >>> p = sl.patterns.random((1024, 1024), density=0.1, seed=0)
    >>> with exporting("onnx"):
    ...     sl.ops.choose_export_kernel(p, "dense")
    'dense'
    >>> with exporting("onnx"), sl.export.gather_graph():
    ...     sl.ops.choose_export_kernel(p, "dense")
    'ell'
    """
    from sparselayers.ops.compiled import pure_tf_kernel
    from sparselayers.ops.context import export_densified, export_format, export_gather_graph

    format = export_format()  # noqa: A001
    if format in (None, "tf_saved_model"):
        return pure_tf_kernel(preferred, pattern)
    if forced:
        if preferred not in EXPORTABLE:
            raise ValueError(
                f"`kernel='{preferred}'` cannot be exported to {format}: its ops have no {format} "
                f"equivalent. Use kernel='auto' (swapped at export) or one of {list(EXPORTABLE)}. "
                f"Received: kernel='{preferred}'"
            )
        return preferred
    preferred = pure_tf_kernel(preferred, pattern)
    if preferred == "banded" and pattern.nnz:
        return preferred
    if preferred == "block" and pattern.nnz and not (_scattered_tiles(pattern) and not export_gather_graph()):
        return preferred
    if not fits_dense(pattern):
        return _gather_graph_kernel(pattern)
    if export_densified():
        return "dense" if pattern.density >= EXPORT_DENSE_MIN_DENSITY else _gather_graph_kernel(pattern)
    if export_gather_graph():
        return _gather_graph_kernel(pattern)
    return "dense"


def _scattered_tiles(pattern: SparsityPattern) -> bool:
    """Whether ``pattern`` is tiles that share rows or columns (``sl.sparsify(block=...)``), and fits dense.

    The block kernel gathers every input row once per tile: at batch 1 that
    graph is slower even than a dense product, while the kernel stored
    sparse runs at dense speed, or faster where LiteRT multiplies its 1x4
    blocks sparse (LiteRT, MLP 1024-1024-1024-10 with 16x1 tiles at 5%,
    Intel Xeon: 735 us as blocks, 22 us stored sparse).
    """
    return fits_dense(pattern) and block_shape(pattern).shares_lines


def _gather_graph_kernel(pattern: SparsityPattern) -> str:
    """``"ell"``, ``"gather"`` or ``"dense"``: the smallest artifact without sparse tensors."""
    units = pattern.shape[1]
    ell_slots = units * pattern.fan_in.max(initial=0)
    sparse = "ell" if ell_slots <= ELL_MAX_PADDING * (pattern.nnz + units) else "gather"
    # Artifact bytes (benchmarks/export.py): ELL an int32 row and a float32
    # weight per slot (converters fold the gather of the frozen values); gather
    # an int32 row and column and a float32 value per entry; dense a float32
    # per cell.
    sparse_bytes = 8 * ell_slots if sparse == "ell" else 12 * pattern.nnz
    if fits_dense(pattern) and 4 * pattern.shape[0] * units < sparse_bytes:
        return "dense"
    return sparse
