"""Hypothesis strategies for patterns, shared by every test module."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import sparselayers as sl

dims = st.integers(min_value=1, max_value=12)


@st.composite
def shapes(draw, max_dim: int = 12):
    return (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)))


@st.composite
def random_patterns(draw, max_dim: int = 12):
    """Any pattern: each cell present with a drawn probability (empty and full included)."""
    shape = draw(shapes(max_dim))
    density = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**16))
    mask = np.random.default_rng(seed).random(shape) < density
    return sl.SparsityPattern.from_dense(mask)


@st.composite
def block_diagonal_patterns(draw):
    blocks = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=5))
    return sl.patterns.block_diagonal(blocks)


@st.composite
def block_sparse_patterns(draw):
    outer = draw(shapes(4))
    seed = draw(st.integers(0, 2**16))
    mask = np.random.default_rng(seed).random(outer) < 0.5
    block = draw(shapes(4))
    return sl.patterns.block_sparse(mask.astype(int), block)


@st.composite
def banded_patterns(draw):
    shape = draw(shapes(20))
    return sl.patterns.banded(shape, lower=draw(st.integers(0, 6)), upper=draw(st.integers(0, 6)))


any_patterns = st.one_of(
    random_patterns(), block_diagonal_patterns(), block_sparse_patterns(), banded_patterns()
)


def values_for(pattern, seed: int = 0, dtype="float32") -> np.ndarray:
    return np.random.default_rng(seed).normal(size=pattern.nnz).astype(dtype)


def inputs_for(pattern, batch: int = 3, seed: int = 1, dtype="float32") -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, pattern.shape[0])).astype(dtype)


@st.composite
def n_of_m_cases(draw):
    """``(shape, n, m, seed)`` of an N:M pattern: ``m`` divides the rows, ``1 <= n <= m``."""
    m = draw(st.integers(1, 8))
    shape = (m * draw(st.integers(1, 5)), draw(st.integers(1, 12)))
    return shape, draw(st.integers(1, m)), m, draw(st.integers(0, 2**16))
