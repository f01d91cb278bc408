"""Products of a sparse convolution kernel with an image: patches (im2col) and the direct convolution.

A convolution's kernel is a sparse matrix over its 2-D view ``(prod(kernel_size)
* in_channels, filters)`` (taps in C order, channels within a tap). Two
formulations compute its product with a ``channels_last`` image:

* :func:`patches` lays the image out as the patch matrix, which any kernel of
  :mod:`sparselayers.ops` multiplies. Pure TF: it runs in every context (XLA,
  export, SavedModel) and with every kernel, and it is the twin of
* :class:`DirectConv`, the compiled direct sparse convolution (Park et al.,
  ICLR 2017): each pattern entry adds its value times the input shifted by
  its tap, read in place. It runs where the compiled kernels may
  (:func:`direct_conv`), for unit strides; the patches are its twin.

A layer whose kernel is a dense form convolves instead (:func:`dense_conv`):
at high densities in training, and while Keras exports to LiteRT or ONNX,
where the runtime then runs its own convolution (``CONV_2D``, ``Conv``)
with the kernel stored sparse.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import tensorflow as tf

from sparselayers.ops.base import Kernel, constant
from sparselayers.ops.compiled import build
from sparselayers.ops.compiled.kernels import OP_DTYPES, compiled_allowed
from sparselayers.ops.dense import DenseKernel
from sparselayers.ops.export_kernels import DenseExportKernel, ExportKernel
from sparselayers.sparsity_pattern import SparsityPattern

#: Density below which ``kernel="auto"`` convolves with :class:`DirectConv`
#: (``benchmarks/conv.py``, 2-core Intel Xeon, quiet, 3x3 conv, input
#: (32, 32, 32, 128), 128 filters, training step, Keras / direct: 1% 4.9x,
#: 5% 3.0x, 10% 2.3x, 20% 1.5x; the dense convolution 1.0x at 30%; im2col
#: with compiled_csr 0.34x at 10%).
DIRECT_MAX_DENSITY = 0.25


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A convolution's window: per spatial axis its size, stride and dilation, and the padding."""

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation_rate: tuple[int, ...]
    padding: str

    def pads(self, spatial: list[Any]) -> list[list[Any]]:
        """``[before, after]`` per spatial axis of lengths ``spatial`` (ints or scalar tensors), as Keras pads."""
        pads = []
        for n, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate):
            reach = d * (k - 1)
            if self.padding == "causal":
                pads.append([reach, 0])
            elif self.padding == "same":
                total = (-(-n // s) - 1) * s + reach + 1 - n
                total = tf.maximum(total, 0) if isinstance(total, tf.Tensor) else max(total, 0)
                pads.append([total // 2, total - total // 2])
            else:
                pads.append([0, 0])
        return pads

    def outputs(self, padded: list[Any]) -> list[Any]:
        """Output lengths over the padded spatial lengths ``padded``."""
        return [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(padded, self.kernel_size, self.strides, self.dilation_rate)]


def _spatial(x: tf.Tensor) -> list[Any]:
    return [x.shape[a] if x.shape[a] is not None else tf.shape(x)[a] for a in range(1, x.shape.rank - 1)]


def patches(x: tf.Tensor, geometry: ConvGeometry) -> tf.Tensor:
    """``(batch, *out_spatial, prod(kernel_size) * in_channels)``: the image patches, taps in Keras' kernel order.

    >>> import numpy as np
    >>> g = ConvGeometry((2,), (1,), (1,), "valid")
    >>> patches(tf.constant(np.arange(3.0).reshape(1, 3, 1)), g).numpy()[0].tolist()
    [[0.0, 1.0], [1.0, 2.0]]
    """
    rank = x.shape.rank - 2
    x = tf.pad(x, [[0, 0], *geometry.pads(_spatial(x)), [0, 0]])
    outs = geometry.outputs(_spatial(x))
    taps = []
    for offsets in np.ndindex(*geometry.kernel_size):
        begin = [0] + [o * d for o, d in zip(offsets, geometry.dilation_rate)] + [0]
        end = [0] + [b + (m - 1) * s + 1 for b, m, s in zip(begin[1:], outs, geometry.strides)] + [0]
        edges = 1 | 2 ** (rank + 1)  # the batch and channel axes: whole
        taps.append(tf.strided_slice(x, begin, end, [1, *geometry.strides, 1], begin_mask=edges, end_mask=edges))
    return taps[0] if len(taps) == 1 else tf.concat(taps, axis=-1)


def dense_conv(
    select_kernel: Any, geometry: ConvGeometry, kernel_shape: tuple[int, ...], *, pointwise: bool = False
) -> Kernel | None:
    """The layer's product as one dense convolution, where its kernel is a dense form; else None.

    ``select_kernel`` is the layer's seam (``_select_kernel``). When it
    gives a dense form, the image is convolved with that kernel, reshaped
    to ``kernel_shape`` (Keras' layout), instead of multiplying the patch
    matrix by it: the same multiply-adds without a patch matrix
    ``prod(kernel_size)`` times the image. While Keras exports to LiteRT or
    ONNX (scattered patterns take the dense export form by default), the
    runtime then runs its own convolution (``CONV_2D``, ``Conv``; XNNPACK's
    sparse 1x1 path needs one) with the kernel stored sparse
    (:class:`ConvExport`). In training and under XLA it is what the
    ``"dense"`` kernel runs (:class:`DenseConv`), which ``kernel="auto"``
    takes at high densities; a ``pointwise`` product (1x1, unit strides)
    keeps ``SparseDense``'s kernels there. Other kernels (block, banded, the
    gather graph of :func:`sparselayers.export.gather_graph`) multiply the
    patches.
    """
    kernel = select_kernel()
    if isinstance(kernel, DenseExportKernel):
        return ConvExport(kernel, geometry, kernel_shape)
    if isinstance(kernel, DenseKernel) and not pointwise:
        return DenseConv(kernel, geometry, kernel_shape)
    return None


def _convolve(x: tf.Tensor, weights: tf.Tensor, g: ConvGeometry) -> tf.Tensor:
    """Keras' convolution of ``x`` with ``weights`` in Keras' layout (``"causal"``: pad the reach, then ``VALID``)."""
    if g.padding == "causal":
        x = tf.pad(x, [[0, 0], *g.pads([None] * len(g.kernel_size)), [0, 0]])
    padding = "SAME" if g.padding == "same" else "VALID"
    return tf.nn.convolution(x, weights, strides=g.strides, padding=padding, dilations=g.dilation_rate)


class DenseConv(Kernel):
    """``x`` convolved with the ``"dense"`` kernel's scattered weights: one ``tf.nn.convolution``."""

    name = "dense"
    supports_jit = True

    def __init__(self, kernel: DenseKernel, geometry: ConvGeometry, kernel_shape: tuple[int, ...]):
        super().__init__(kernel.pattern)
        self.kernel, self.geometry, self.kernel_shape = kernel, geometry, kernel_shape

    def __call__(self, x, values):
        return _convolve(x, tf.reshape(self.kernel.weights(values), self.kernel_shape), self.geometry)


class ConvExport(ExportKernel):
    """``x`` convolved with the dense export kernel's weights: one ``tf.nn.convolution``."""

    def __init__(self, kernel: DenseExportKernel, geometry: ConvGeometry, kernel_shape: tuple[int, ...]):
        super().__init__(kernel.pattern)
        self.kernel, self.geometry, self.kernel_shape = kernel, geometry, kernel_shape
        self.name = kernel.name

    def compute(self, x, values):
        return _convolve(x, tf.reshape(self.kernel.weights(values), self.kernel_shape), self.geometry)

    def __repr__(self) -> str:
        return f"ConvExport({self.kernel!r}, {self.geometry})"


def direct_conv(pattern: SparsityPattern, geometry: ConvGeometry, x: tf.Tensor, *, auto: bool) -> DirectConv | None:
    """The direct convolution for this call, or None where the patches compute it.

    It runs for a ``kernel="auto"`` layer (a forced kernel is honoured on
    the patches) whose pattern is below :data:`DIRECT_MAX_DENSITY`, with
    unit strides, an input of known spatial size and a non-empty output,
    where the compiled ops may run (:func:`compiled_allowed`: not under XLA,
    export or SavedModel saving) and are built.
    """
    if not auto or max(geometry.strides) > 1 or pattern.density >= DIRECT_MAX_DENSITY:
        return None
    spatial = tuple(x.shape[1:-1])
    if None in spatial or not compiled_allowed() or not build.available():
        return None
    padded = [n + sum(p) for n, p in zip(spatial, geometry.pads(list(spatial)))]
    if min(geometry.outputs(padded)) < 1:
        return None
    return _direct_conv(pattern, geometry, spatial)


def source_blocks(source_rows: int, rows: int, nnz: int, reach: int) -> int:
    """How many blocks of source rows a direct op takes in turn (entries are sorted by block).

    A tile of positions (the ops' ``TileLength``: ``max(4 * reach, 256)``,
    at most 256 KiB of float32 per side) is transposed into a buffer of
    ``source_rows`` lines; every output row then reads lines of it at
    random. Taken a block at a time, the lines one block reads stay in L1
    (48 KiB on recent Xeons and EPYCs) instead of L2: 1.3x faster ops for
    the 3x3 conv at 10% density (``benchmarks/conv.py``). A block adds a
    pass over the output tile, so each (block, row) keeps four entries or
    more on average.

    >>> source_blocks(128, 128, 14746, 70), source_blocks(128, 128, 300, 70)
    (4, 1)
    """
    widest = max(source_rows, rows, 1)
    tile = max(128, min(max(4 * reach, 256), (256 * 1024) // (4 * widest)) // 128 * 128)
    wanted = -(-source_rows * (tile + reach) * 4 // (48 * 1024))
    return int(max(1, min(wanted, nnz // (4 * max(rows, 1)), source_rows // 8)))


@functools.lru_cache(maxsize=16)
def _direct_conv(pattern: SparsityPattern, geometry: ConvGeometry, spatial: tuple[int, ...]) -> DirectConv:
    return DirectConv(pattern, geometry, spatial)


class DirectConv:
    """The compiled direct sparse convolution of one pattern, window and input size (unit strides).

    Positions run over the padded grid of every image in C order; a tap
    moves output position ``i`` to input position ``i + shift``, the flat
    offset of the tap. Three ops, each the others' gradient (as in
    ``compiled_csr``), so gradients of any order run compiled: the
    convolution (``SparselayersConvForward``, entries grouped by filter),
    the input gradient (``SparselayersConvInputGrad``, grouped by channel,
    shifts reversed) and the values gradient
    (``SparselayersConvValuesGrad``). Each reads and writes the
    ``channels_last`` tensors in place, a tile of positions at a time
    transposed into a buffer in cache: no padded, transposed or patch copy
    of the image exists. A 1-D convolution is a 2-D one of height 1.
    Float16 and bfloat16 are computed in float32.
    """

    name = "compiled_conv"

    def __init__(self, pattern: SparsityPattern, geometry: ConvGeometry, spatial: tuple[int, ...]):
        self.pattern, self.geometry = pattern, geometry
        rank = len(spatial)
        pads = geometry.pads(list(spatial))
        padded = [n + sum(p) for n, p in zip(spatial, pads)]
        self.outputs = geometry.outputs(padded)
        # A 1-D convolution as a 2-D one of height 1.
        grid = [1] * (2 - rank) + padded
        window = [1] * (2 - rank) + list(geometry.kernel_size)
        dilation = [1] * (2 - rank) + list(geometry.dilation_rate)
        size = [1] * (2 - rank) + list(spatial)
        corner = [0] * (2 - rank) + [p[0] for p in pads]
        out = [1] * (2 - rank) + self.outputs
        self.reach = (window[0] - 1) * dilation[0] * grid[1] + (window[1] - 1) * dilation[1]
        self.attr = [*size, *grid, *corner, *out, self.reach]
        self._shape4 = [*size, pattern.shape[0] // math.prod(geometry.kernel_size)]
        self._step = (dilation[0] * grid[1], dilation[1])
        self._window = window
        self._tables: tuple[tf.Tensor, ...] | None = None

    def _pattern_tensors(self) -> tuple[tf.Tensor, ...]:
        if self._tables is None:
            p = self.pattern
            channels, filters = self._shape4[-1], p.shape[1]
            rows, cols = p.indices[:, 0], p.indices[:, 1]
            tap, channel = np.divmod(rows, channels)
            tap_h, tap_w = np.divmod(tap, self._window[1])
            shift = tap_h * self._step[0] + tap_w * self._step[1]
            self.blocks = (source_blocks(channels, filters, p.nnz, self.reach), source_blocks(filters, channels, p.nnz, self.reach))

            def table(group, n, index, sources, shifts, blocks):
                """Entries by (block of ``index``, ``group``, ``index``): pointers per block and group, index, shift, order."""
                block = index * blocks // sources
                order = np.lexsort((index, group, block)).astype(np.int32)
                counts = np.bincount(block * n + group, minlength=blocks * n)
                pointers = np.zeros(blocks * n + 1, np.int64)
                np.cumsum(counts, out=pointers[1:])
                return (constant(pointers), constant(index[order].astype(np.int32)),
                        constant(shifts[order].astype(np.int32)), constant(order))

            self._tables = (*table(cols, filters, channel, channels, shift, self.blocks[0]),
                            *table(channel, channels, cols, filters, self.reach - shift, self.blocks[1]))
        return self._tables

    def __call__(self, x: tf.Tensor, values: tf.Tensor, bias: tf.Tensor | None = None) -> tf.Tensor:
        """``(batch, *out_spatial, filters)``: the convolution of ``x`` with the kernel of ``values``, plus ``bias``.

        The bias is added in the forward op's pass and its gradient summed in
        the values gradient's pass: no pass of their own over the output.
        """
        dtype = x.dtype
        compute = dtype if dtype in OP_DTYPES else tf.float32
        x, values = tf.cast(x, compute), tf.cast(values, compute)
        none = tf.zeros([0], compute)
        b = none if bias is None else tf.cast(bias, compute)
        ops, attr = build.library(), self.attr
        f_pointers, f_channel, f_shift, f_order, c_pointers, c_filter, c_shift, c_order = self._pattern_tensors()
        fb, cb = self.blocks
        f_table = (f_pointers, f_channel, f_shift, f_order)

        # forward(x, v, b) = y, input_grad(dy, v) and values_grad(dy, x) =
        # (dv, db): the three bilinear maps are each others' gradients.
        @tf.custom_gradient
        def forward(x4, v, b):
            def grad(g):
                dv, db = values_grad(g, x4)
                return input_grad(g, v), dv, none if bias is None else db

            return ops.sparselayers_conv_forward(x4, v, *f_table, b, geometry=attr, blocks=fb), grad

        @tf.custom_gradient
        def input_grad(g, v):
            def grad(h):
                return forward(h, v, none), values_grad(g, h)[0]

            return ops.sparselayers_conv_input_grad(g, v, c_pointers, c_filter, c_shift, c_order, geometry=attr, blocks=cb), grad

        @tf.custom_gradient
        def values_grad(g, x4):
            def grad(h_values, h_bias):
                h_values = tf.zeros_like(values) if h_values is None else h_values
                h_bias = none if h_bias is None else h_bias
                return forward(x4, h_values, h_bias), input_grad(g, h_values)

            dv, db = ops.sparselayers_conv_values_grad(g, x4, *f_table, geometry=attr, blocks=fb)
            return [dv, db], grad

        batch = tf.shape(x)[0]
        y = forward(tf.reshape(x, [batch, *self._shape4]), values, b)
        return tf.cast(tf.reshape(y, [batch, *self.outputs, self.pattern.shape[1]]), dtype)
