import numpy as np
import pytest
from hypothesis import given

import sparselayers as sl
from sparselayers.structure import _block_shape, block_shape, detect_band, detect_blocks
from tests.strategies import any_patterns, banded_patterns, block_diagonal_patterns


@given(any_patterns)
def test_blocks_tile_the_pattern_exactly(p):
    blocks = detect_blocks(p)
    if p.nnz == 0:
        assert blocks is None
        return
    cover = np.zeros(p.shape, int)
    for r0, nr, c0, nc in zip(blocks.row_start, blocks.n_rows, blocks.col_start, blocks.n_cols):
        cover[r0 : r0 + nr, c0 : c0 + nc] += 1
    np.testing.assert_array_equal(cover, p.to_dense())  # disjoint, complete, nothing extra
    # row_offset: position of the rectangle's first entry inside each of its rows
    for k in range(blocks.count):
        row = blocks.row_start[k]
        row_cols = p.cols[p.row_pointers[row] : p.row_pointers[row + 1]]
        assert row_cols[blocks.row_offset[k]] == blocks.col_start[k]


@given(block_diagonal_patterns())
def test_block_diagonal_is_found_as_few_rectangles(p):
    blocks = detect_blocks(p)
    assert blocks.is_diagonal
    assert blocks.count <= p.shape[0]


def test_equal_blocks_are_found_whole():
    blocks = detect_blocks(sl.patterns.block_diagonal([(8, 4)] * 5))
    assert blocks.count == 5 and set(blocks.n_rows) == {8} and set(blocks.n_cols) == {4}


@given(banded_patterns())
def test_band_found_for_banded_patterns(p):
    band = detect_band(p)
    offsets = p.cols - p.rows
    assert band is not None
    assert (band.min_offset, band.max_offset) == (offsets.min(), offsets.max())


@given(any_patterns)
def test_band_detection_agrees_with_dense_check(p):
    band = detect_band(p)
    if p.nnz == 0:
        assert band is None
        return
    i, j = np.indices(p.shape)
    d = (p.cols - p.rows)
    full = ((j - i) >= d.min()) & ((j - i) <= d.max())
    assert (band is not None) == bool(np.array_equal(full, p.to_dense() != 0))


@given(pattern=any_patterns)
def test_block_shape_summarises_detect_blocks(pattern):
    shape = block_shape(pattern)
    blocks = detect_blocks(pattern)
    if blocks is None:
        assert (shape.mean_area, shape.mean_rows) == (0.0, 0.0)
    else:
        # independent: the rectangles' own sizes, averaged in NumPy
        assert shape.mean_area == pytest.approx(np.mean(blocks.n_rows * blocks.n_cols))
        assert shape.mean_rows == pytest.approx(np.mean(blocks.n_rows))
        assert np.sum(blocks.n_rows * blocks.n_cols) == pattern.nnz
        shares = blocks.n_rows.sum() > pattern.shape[0] or blocks.n_cols.sum() > pattern.shape[1]
        assert shape.shares_lines == shares
    # Read a few entries at a time, chunks split rows and runs: the same summary.
    assert _block_shape(pattern, chunk=3) == shape
