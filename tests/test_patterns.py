import numpy as np
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from tests.strategies import n_of_m_cases, shapes

block_lists = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=6)


@given(block_lists)
def test_block_diagonal_matches_scipy_block_diag(blocks):
    p = sl.patterns.block_diagonal(blocks)
    expected = scipy.sparse.block_diag([np.ones(b) for b in blocks]).toarray()
    np.testing.assert_array_equal(p.to_dense(), expected)


@given(shapes(15), st.integers(0, 20), st.integers(0, 20))
def test_banded_matches_offset_mask(shape, lower, upper):
    i, j = np.indices(shape)
    expected = (j - i >= -lower) & (j - i <= upper)
    p = sl.patterns.banded(shape, lower=lower, upper=upper)
    np.testing.assert_array_equal(p.to_dense() != 0, expected)


@given(shapes(6), shapes(4), st.integers(0, 1000))
def test_block_sparse_matches_kron(outer, block, seed):
    mask = np.random.default_rng(seed).random(outer) < 0.5
    p = sl.patterns.block_sparse(mask, block)
    np.testing.assert_array_equal(p.to_dense(), np.kron(mask, np.ones(block)))


@given(shapes(20), st.integers(1, 25))
def test_local_windows(shape, window):
    n, m = shape
    p = sl.patterns.local(shape, window=window)
    dense = p.to_dense()
    width = min(window, n)
    assert (dense.sum(axis=0) == width).all()
    for j in range(m):
        rows = np.flatnonzero(dense[:, j])
        assert (np.diff(rows) == 1).all()  # one contiguous window
        centre = int((j + 0.5) * n / m)
        assert rows[0] <= centre <= rows[-1] or width < 2


@given(shapes(30), st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]), st.integers(0, 2**16))
def test_random_density_gives_exact_count(shape, density, seed):
    p = sl.patterns.random(shape, density=density, seed=seed)
    assert p.nnz == round(density * shape[0] * shape[1])
    assert p == sl.patterns.random(shape, density=density, seed=seed)


@given(shapes(30), st.data())
def test_random_fan_in_is_exact(shape, data):
    k = data.draw(st.integers(0, shape[0]))
    p = sl.patterns.random(shape, fan_in=k, seed=data.draw(st.integers(0, 100)))
    np.testing.assert_array_equal(p.to_dense().sum(axis=0), np.full(shape[1], k))


def test_random_fan_in_large_path():
    p = sl.patterns.random((5000, 4000), fan_in=3, seed=0)
    assert (p.fan_in == 3).all() and p.nnz == 12000


def test_random_is_uniform_enough():
    p = sl.patterns.random((100, 100), density=0.3, seed=0)
    # Every row's count is Binomial-like around 30: none absurdly off.
    assert p.fan_out.min() > 10 and p.fan_out.max() < 50


def test_dense_pattern():
    np.testing.assert_array_equal(sl.patterns.dense((3, 2)).to_dense(), np.ones((3, 2)))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: sl.patterns.random((4, 4), density=1.5), ValueError, r"Received: density=1.5"),
        (lambda: sl.patterns.random((4, 4), density=-0.1), ValueError, "density"),
        (lambda: sl.patterns.random((4, 4), density=float("nan")), ValueError, "density"),
        (lambda: sl.patterns.random((4, 4), density="x"), TypeError, "density"),
        (lambda: sl.patterns.random((4, 4), fan_in=5), ValueError, r"Received: fan_in=5"),
        (lambda: sl.patterns.random((4, 4), fan_in=-1), ValueError, "fan_in"),
        (lambda: sl.patterns.random((4, 4), fan_in=1.5), TypeError, "fan_in"),
        (lambda: sl.patterns.random((4, 4)), ValueError, "exactly one"),
        (lambda: sl.patterns.random((4, 4), density=0.1, fan_in=1), ValueError, "exactly one"),
        (lambda: sl.patterns.random((4, 4), density=0.1, seed="a"), TypeError, "seed"),
        (lambda: sl.patterns.block_diagonal([]), TypeError, "blocks"),
        (lambda: sl.patterns.block_diagonal([(2, 0)]), ValueError, r"blocks\[0\]"),
        (lambda: sl.patterns.block_diagonal([(2, 2), 3]), TypeError, r"blocks\[1\]"),
        (lambda: sl.patterns.banded((3, 3), lower=-1), ValueError, r"Received: lower=-1"),
        (lambda: sl.patterns.banded((0, 3)), ValueError, "shape"),
        (lambda: sl.patterns.local((3, 3), window=0), ValueError, "window"),
        (lambda: sl.patterns.block_sparse([[1]], (0, 2)), ValueError, "block_shape"),
        (lambda: sl.patterns.n_of_m((8, 3), 5, 4), ValueError, r"`n` must be at most `m`.*Received: n=5, m=4"),
        (lambda: sl.patterns.n_of_m((8, 3), 0, 4), ValueError, r"Received: n=0"),
        (lambda: sl.patterns.n_of_m((8, 3), 2, 0), ValueError, r"Received: m=0"),
        (lambda: sl.patterns.n_of_m((8, 3), 1.5, 4), TypeError, r"`n` must be an integer"),
        (lambda: sl.patterns.n_of_m((8, 3), 2, "4"), TypeError, r"`m` must be an integer"),
        (lambda: sl.patterns.n_of_m((10, 3), 2, 4), ValueError, r"`m` must divide.*Received: shape=\(10, 3\), m=4"),
        (lambda: sl.patterns.n_of_m((8, 3), 2, 4, seed="a"), TypeError, "seed"),
    ],
)
def test_bad_generator_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_random_fan_in_past_the_vectorised_size_keeps_its_stream():
    """Large shapes draw each column with rng.choice; filling in place keeps the same pattern per seed."""
    n, m, k = 5000, 4000, 3  # n * m > 2**24: the per-column path
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.choice(n, size=k, replace=False) for _ in range(m)])
    expected = sl.SparsityPattern.from_coo(rows, np.repeat(np.arange(m), k), (n, m))
    assert sl.patterns.random((n, m), fan_in=k, seed=7) == expected


@given(n_of_m_cases())
def test_n_of_m_has_exactly_n_entries_in_every_group_of_every_column(case):
    shape, n, m, seed = case
    p = sl.patterns.n_of_m(shape, n, m, seed=seed)
    counts = (p.to_dense() != 0).reshape(shape[0] // m, m, shape[1]).sum(axis=1)
    np.testing.assert_array_equal(counts, np.full((shape[0] // m, shape[1]), n))
    assert p == sl.patterns.n_of_m(shape, n, m, seed=seed)


def test_n_of_m_draws_each_group_independently_and_uniformly():
    p = sl.patterns.n_of_m((8, 4000), 1, 4, seed=0)
    # Each of a group's 4 rows is picked with probability 1/4 in each column
    # (binomial: 1000 +- 27), not one choice repeated across columns or groups.
    assert p.fan_out.min() > 850 and p.fan_out.max() < 1150
    dense = p.to_dense() != 0
    assert not np.array_equal(dense[:4], dense[4:])


def test_n_of_m_drawn_in_chunks_is_the_pattern_of_one_draw(monkeypatch):
    """Large shapes draw their keys a few groups at a time; the pattern per seed does not depend on it."""
    whole = sl.patterns.n_of_m((60, 7), 2, 5, seed=3)
    monkeypatch.setattr(sl.patterns, "_CHUNK_CELLS", 2 * 7 * 5 - 1)  # one group per chunk
    assert sl.patterns.n_of_m((60, 7), 2, 5, seed=3) == whole


def test_n_of_m_is_an_equal_fan_in_that_ell_stores_without_padding():
    from sparselayers.ops.export_kernels import EllKernel

    p = sl.patterns.n_of_m((48, 20), 3, 8, seed=1)
    np.testing.assert_array_equal(p.fan_in, np.full(20, 3 * 48 // 8))
    assert EllKernel(p).slots == p.nnz
