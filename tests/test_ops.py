"""Every kernel against the float64 dense reference: forward and all gradients."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.structure import detect_band
from tests import reference
from tests.strategies import any_patterns, banded_patterns, block_sparse_patterns, inputs_for, values_for

ALL_KERNELS = sorted(sl.ops.KERNELS)


def kernels_for(pattern):
    return [k for k in ALL_KERNELS if k != "banded" or detect_band(pattern) is not None]


def check_kernel(name, pattern, batch=4, seed=0, dtype="float32", tol=1e-4):
    x = tf.constant(inputs_for(pattern, batch, seed, dtype))
    values = tf.constant(values_for(pattern, seed + 1, dtype))
    upstream = np.random.default_rng(seed + 2).normal(size=(batch, pattern.shape[1]))
    kernel = sl.ops.get_kernel(name, pattern)
    with tf.GradientTape() as tape:
        tape.watch([x, values])
        y = kernel(x, values)
        loss = tf.reduce_sum(y * tf.constant(upstream, y.dtype))
    d_x, d_values = tape.gradient(loss, [x, values])
    d_values = tf.convert_to_tensor(d_values) if d_values is not None else tf.zeros_like(values)
    ref_dx, ref_dv, _ = reference.gradients(x.numpy(), pattern, values.numpy(), upstream)
    assert y.dtype == x.dtype and y.shape == (batch, pattern.shape[1])
    np.testing.assert_allclose(y.numpy(), reference.forward(x.numpy(), pattern, values.numpy()), rtol=tol, atol=tol)
    np.testing.assert_allclose(d_x.numpy(), ref_dx, rtol=tol, atol=tol)
    np.testing.assert_allclose(d_values.numpy(), ref_dv, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ALL_KERNELS)
@given(pattern=any_patterns, batch=st.integers(1, 5))
def test_kernel_matches_dense_reference(name, pattern, batch):
    if name not in kernels_for(pattern):
        return
    check_kernel(name, pattern, batch)


@pytest.mark.parametrize("name", ["block", "csr", "gather", "dense", "sparse_dense_matmul"])
@given(pattern=block_sparse_patterns())
def test_kernels_on_block_sparse(name, pattern):
    check_kernel(name, pattern)


@given(pattern=banded_patterns(), tile=st.integers(1, 9))
def test_banded_any_tile_width(pattern, tile):
    kernel = sl.ops.BandedKernel(pattern, tile=tile)
    x = inputs_for(pattern)
    values = values_for(pattern)
    np.testing.assert_allclose(kernel(tf.constant(x), tf.constant(values)).numpy(),
                               reference.forward(x, pattern, values), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "pattern",
    [
        sl.patterns.block_diagonal([(3, 2), (3, 2), (2, 4), (3, 2), (1, 1)]),
        sl.patterns.banded((40, 25), lower=3, upper=9),
        sl.patterns.random((60, 30), density=0.1, seed=0),
        sl.SparsityPattern.from_coo([], [], (4, 3)),
        sl.patterns.dense((1, 1)),
    ],
    ids=["mixed-blocks", "banded", "random", "empty", "1x1"],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_in_both_dtypes(pattern, dtype):
    tol = 1e-4 if dtype == "float32" else 1e-10
    for name in kernels_for(pattern):
        check_kernel(name, pattern, dtype=dtype, tol=tol)


def test_csr_gradient_in_several_chunks():
    pattern = sl.patterns.random((50, 40), density=0.3, seed=0)
    kernel = sl.ops.CSRKernel(pattern, chunk=7)
    x, values = tf.constant(inputs_for(pattern)), tf.constant(values_for(pattern))
    with tf.GradientTape() as tape:
        tape.watch(values)
        loss = tf.reduce_sum(kernel(x, values))
    upstream = np.ones((x.shape[0], pattern.shape[1]))
    np.testing.assert_allclose(tape.gradient(loss, values).numpy(),
                               reference.gradients(x.numpy(), pattern, values.numpy(), upstream)[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [k for k in ALL_KERNELS if sl.ops.KERNELS[k].supports_jit])
def test_jit_kernels_compile_with_xla(name):
    pattern = sl.patterns.banded((30, 20), lower=2, upper=5)
    kernel = sl.ops.get_kernel(name, pattern)
    x, values = tf.constant(inputs_for(pattern)), tf.constant(values_for(pattern))

    @tf.function(jit_compile=True)
    def step(x, values):
        with tf.GradientTape() as tape:
            tape.watch(values)
            y = kernel(x, values)
        return y, tape.gradient(tf.reduce_sum(y), values)

    y, _ = step(x, values)
    np.testing.assert_allclose(y.numpy(), reference.forward(x.numpy(), pattern, values.numpy()), rtol=1e-4, atol=1e-4)


def test_sparse_matmul_function_and_bad_kernel_name():
    p = sl.patterns.random((10, 8), density=0.3, seed=0)
    x, v = inputs_for(p), values_for(p)
    np.testing.assert_allclose(sl.ops.sparse_matmul(x, p, v).numpy(), reference.forward(x, p, v), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="Received: kernel='fast'"):
        sl.ops.get_kernel("fast", p)
    with pytest.raises(ValueError, match="banded"):
        sl.ops.get_kernel("banded", p)


@pytest.mark.parametrize(
    "pattern, expected",
    [
        (sl.patterns.block_diagonal([(64, 64)] * 8), "block"),
        (sl.patterns.block_diagonal([(8, 8)] * 200), "block"),
        (sl.patterns.block_diagonal([(4, 4)] * 200), "csr"),
        (sl.patterns.block_diagonal([(2, 2)] * 200), "csr"),
        (sl.patterns.dense((30, 20)), "block"),
        (sl.patterns.banded((500, 500), lower=16, upper=16), "banded"),
        (sl.patterns.banded((500, 500), lower=8, upper=8), "csr"),
        (sl.patterns.banded((500, 500), lower=1, upper=1), "csr"),
        (sl.patterns.random((500, 500), density=0.2, seed=0), "dense"),
        (sl.patterns.random((500, 500), density=0.01, seed=0), "csr"),
        (sl.patterns.random((10000, 8000), density=0.06, seed=0), "csr"),
        (sl.SparsityPattern.from_coo([], [], (5, 5)), "block"),
    ],
    ids=["big-blocks", "8x8-blocks", "4x4-blocks", "2x2-blocks", "dense", "wide-band", "band-17", "narrow-band", "dense-ish", "sparse", "too-big-for-dense", "empty"],
)
def test_auto_follows_the_documented_rule(pattern, expected):
    from sparselayers.ops import choose

    assert sl.ops.choose_kernel(pattern) == expected
    # the rule as documented, recomputed from the thresholds
    blocks = sl.structure.detect_blocks(pattern)
    band = detect_band(pattern)
    if pattern.nnz == 0 or (blocks.mean_area >= choose.BLOCK_MIN_AREA
                            and blocks.n_rows.mean() >= choose.BLOCK_MIN_ROWS):
        rule = "block"
    elif band is not None and band.width >= choose.BAND_MIN_WIDTH:
        rule = "banded"
    elif pattern.density >= choose.DENSE_MIN_DENSITY and np.prod(pattern.shape) <= choose.DENSE_MAX_ENTRIES:
        rule = "dense"
    else:
        rule = "csr"
    assert rule == expected
