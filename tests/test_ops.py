"""Every kernel against the float64 dense reference: forward and all gradients."""

import os
import subprocess
import sys

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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@given(pattern=any_patterns, parts=st.integers(1, 5))
def test_dense_kernel_in_row_slices(pattern, parts):
    x, values = tf.constant(inputs_for(pattern)), tf.constant(values_for(pattern))
    upstream = np.random.default_rng(2).normal(size=(x.shape[0], pattern.shape[1]))
    kernel = sl.ops.DenseKernel(pattern, parts=parts)
    with tf.GradientTape() as tape:
        tape.watch([x, values])
        y = kernel(x, values)
        loss = tf.reduce_sum(y * upstream)
    d_x, d_values = tape.gradient(loss, [x, values])
    ref_dx, ref_dv, _ = reference.gradients(x.numpy(), pattern, values.numpy(), upstream)
    np.testing.assert_allclose(y.numpy(), reference.forward(x.numpy(), pattern, values.numpy()), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_x.numpy(), ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_values.numpy(), ref_dv, rtol=1e-4, atol=1e-4)


@given(any_patterns, st.integers(1, 9), st.integers(1, 40), st.integers(1, 5))
def test_grouped_sampled_product_matches_float64(pattern, group, chunk_entries, batch):
    """Every group size and chunking, padded groups and columns included."""
    from sparselayers.ops.sampled import GroupedSampledProduct

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, pattern.shape[0]))
    dy = rng.normal(size=(batch, pattern.shape[1]))
    product = GroupedSampledProduct(pattern, group=group, chunk_entries=chunk_entries)
    got = product(tf.constant(x, tf.float32), tf.constant(dy, tf.float32)).numpy()
    np.testing.assert_allclose(got, np.einsum("bk,bk->k", x[:, pattern.rows], dy[:, pattern.cols]), atol=1e-5)


def test_grouped_sampled_product_pads_little_with_hub_columns():
    """One column fed by every input, or Zipf-like column counts, must not set
    every group's padded size (the gather would grow with the hub)."""
    from sparselayers.ops.sampled import GroupedSampledProduct

    rng = np.random.default_rng(0)
    base = sl.patterns.random((2000, 2000), density=0.001, seed=0)
    hub = base | sl.SparsityPattern.from_coo(np.arange(2000), np.full(2000, 7), (2000, 2000))
    zipf = sl.SparsityPattern.from_edges(rng.integers(0, 2000, 30000), rng.zipf(1.5, 30000) % 2000, 2000, 2000)
    for pattern in (hub, zipf):
        product = GroupedSampledProduct(pattern)
        slots = product.tensors[0].shape[0] * product.padded
        assert slots <= 1.5 * pattern.nnz, (slots, pattern.nnz)
        x, dy = rng.normal(size=(3, 2000)), rng.normal(size=(3, 2000))
        got = product(tf.constant(x, tf.float32), tf.constant(dy, tf.float32)).numpy()
        np.testing.assert_allclose(got, np.einsum("bk,bk->k", x[:, pattern.rows], dy[:, pattern.cols]), atol=1e-5)


def test_csr_gathers_the_values_gradient_of_large_patterns(monkeypatch):
    """Past GROUPED_MAX_ENTRIES the csr kernel reads its own coordinates in a loop of gathers."""
    from sparselayers.ops import csr, sampled

    monkeypatch.setattr(csr, "GROUPED_MAX_ENTRIES", 10)
    pattern = sl.patterns.random((50, 40), density=0.3, seed=1)
    kernel = sl.ops.CSRKernel(pattern, chunk_entries=7)
    assert isinstance(kernel._sampled, sampled.GatheredSampledProduct)
    assert kernel._sampled.tensors[0] is kernel._indices
    x, values = tf.constant(inputs_for(pattern)), tf.constant(values_for(pattern))
    upstream = np.random.default_rng(3).normal(size=(x.shape[0], pattern.shape[1]))
    with tf.GradientTape() as tape:
        tape.watch([x, values])
        loss = tf.reduce_sum(kernel(x, values) * upstream)
    d_x, d_values = tape.gradient(loss, [x, values])
    ref_dx, ref_dv, _ = reference.gradients(x.numpy(), pattern, values.numpy(), upstream)
    np.testing.assert_allclose(d_x.numpy(), ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_values.numpy(), ref_dv, rtol=1e-4, atol=1e-4)


def test_csr_gradient_with_other_group_sizes():
    pattern = sl.patterns.random((50, 40), density=0.3, seed=0)
    x, values = tf.constant(inputs_for(pattern)), tf.constant(values_for(pattern))
    upstream = np.ones((x.shape[0], pattern.shape[1]))
    expected = reference.gradients(x.numpy(), pattern, values.numpy(), upstream)[1]
    for group in (1, 3, 64):
        kernel = sl.ops.CSRKernel(pattern, group=group)
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = tf.reduce_sum(kernel(x, values))
        np.testing.assert_allclose(tape.gradient(loss, values).numpy(), expected, rtol=1e-4, atol=1e-4)


@given(pattern=any_patterns, band=st.integers(1, 12), batch=st.integers(1, 3))
def test_csr_in_bands_of_rows_matches_dense_reference(pattern, band, batch):
    """A few entries per CSR matrix: bands split the rows; empty rows and rows longer than a band too."""
    from sparselayers.ops.csr import row_bands

    bands = row_bands(pattern, band)
    assert bands[0][2] == 0 and bands[-1][3] == pattern.shape[0] and bands[-1][1] == pattern.nnz
    for (start, end, first, last), following in zip(bands, bands[1:] + [None]):
        assert (start, end) == (pattern.row_pointers[first], pattern.row_pointers[last])
        assert end - start <= band or last == first + 1
        assert following is None or following[2] == last
    kernel = sl.ops.CSRKernel(pattern, band=band)
    x = tf.constant(inputs_for(pattern, batch, 0))
    values = tf.constant(values_for(pattern, 1))
    upstream = np.random.default_rng(2).normal(size=(batch, pattern.shape[1]))
    with tf.GradientTape() as tape:
        tape.watch([x, values])
        y = kernel(x, values)
        loss = tf.reduce_sum(y * tf.constant(upstream, y.dtype))
    d_x, d_values = tape.gradient(loss, [x, values])
    ref_dx, ref_dv, _ = reference.gradients(x.numpy(), pattern, values.numpy(), upstream)
    np.testing.assert_allclose(y.numpy(), reference.forward(x.numpy(), pattern, values.numpy()), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_x.numpy(), ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tf.convert_to_tensor(d_values).numpy(), ref_dv, rtol=1e-4, atol=1e-4)


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
        (sl.patterns.block_diagonal([(4, 4)] * 200), "block"),
        (sl.patterns.block_diagonal([(2, 2)] * 200), "csr"),
        (sl.patterns.dense((30, 20)), "block"),
        (sl.patterns.banded((500, 500), lower=16, upper=16), "banded"),
        (sl.patterns.banded((500, 500), lower=8, upper=8), "csr_dense_grad"),
        (sl.patterns.banded((4096, 4096), lower=2048, upper=2048), "dense"),
        (sl.patterns.banded((300, 300), lower=20, upper=20), "banded"),
        (sl.patterns.banded((500, 500), lower=1, upper=1), "csr"),
        (sl.patterns.random((500, 500), density=0.2, seed=0), "dense"),
        (sl.patterns.random((500, 500), density=0.01, seed=0), "csr"),
        (sl.patterns.random((500, 500), density=0.03, seed=0), "csr_dense_grad"),
        (sl.patterns.random((10000, 8000), density=0.06, seed=0), "csr"),
        (sl.SparsityPattern.from_coo([], [], (5, 5)), "block"),
    ],
    ids=["big-blocks", "8x8-blocks", "4x4-blocks", "2x2-blocks", "dense", "wide-band", "band-17", "75%-band", "13%-band", "narrow-band", "dense-ish", "sparse", "few-percent", "too-big-for-dense", "empty"],
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
        dense_fits = np.prod(pattern.shape) <= choose.DENSE_MAX_ENTRIES
        rule = "dense" if pattern.density >= choose.BAND_MAX_DENSITY and dense_fits else "banded"
    elif pattern.density >= choose.DENSE_MIN_DENSITY and np.prod(pattern.shape) <= choose.DENSE_MAX_ENTRIES:
        rule = "dense"
    elif pattern.density >= choose.CSR_DENSE_GRAD_MIN_DENSITY and np.prod(pattern.shape) <= choose.DENSE_MAX_ENTRIES:
        rule = "csr_dense_grad"
    else:
        rule = "csr"
    assert rule == expected


def test_empty_pattern_trains_and_predicts():
    # Issue 12.1: the block kernel's empty product, a zero-inner-dim matmul,
    # was fused with the bias add into a oneDNN op that aborts the process,
    # so the reproducers run in a subprocess.
    script = (
        "import numpy as np, keras, tensorflow as tf, sparselayers as sl\n"
        "p = sl.patterns.random((8, 4), density=0.0)\n"
        "kernel, bias = sl.ops.get_kernel('auto', p), tf.ones([4])\n"
        "@tf.function\n"
        "def step(x, v):\n"
        "    with tf.GradientTape() as tape:\n"
        "        tape.watch([x, v])\n"
        "        y = kernel(x, v) + bias\n"
        "        loss = tf.reduce_sum(y)\n"
        "    return (y, *tape.gradient(loss, [x, v]))\n"
        "y, dx, dv = step(tf.ones((32, 8)), tf.zeros([0]))\n"
        "assert np.all(y.numpy() == 1) and np.all(dx.numpy() == 0) and dv.shape == (0,)\n"
        "m = keras.Sequential([keras.Input((8,)), sl.SparseDense(p)])\n"
        "m.compile('adam', 'mse')\n"
        "m.fit(np.ones((32, 8), 'float32'), np.ones((32, 4), 'float32'), verbose=0)\n"
        "print(float(np.abs(m.predict(np.ones((3, 8), 'float32'), verbose=0)).max()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    # the output is the bias alone, moved off zero by the fit step
    assert 0 < float(done.stdout.split()[-1]) < 1.0


def relative_rms(y, reference_y):
    return float(np.sqrt(np.mean((y - reference_y) ** 2) / np.mean(reference_y**2)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ALL_KERNELS)
def test_low_precision_error_no_worse_than_dense_matmul(name, dtype):
    # Issue 12.6: blocks sharing output columns (the block kernel's segment
    # sum) and the gather kernel must accumulate in float32 like a matmul.
    # 32 blocks of 2 x 32 per output column, in row bands that alternate
    # between the two column halves: none merge, so their sums overlap
    pattern = sl.patterns.block_sparse(np.tile(np.eye(2, dtype=int), (32, 1)), (2, 32))
    if name == "banded":
        pattern = sl.patterns.banded((128, 64), lower=100, upper=40)
    x = inputs_for(pattern, batch=16, seed=3)
    values = values_for(pattern, seed=4)
    x_low = tf.cast(tf.constant(x), dtype)
    v_low = tf.cast(tf.constant(values), dtype)
    # the same rounded inputs for both, so only the accumulation differs
    x64 = tf.cast(x_low, tf.float64).numpy()
    v64 = tf.cast(v_low, tf.float64).numpy()
    expected = reference.forward(x64, pattern, v64)
    dense = tf.matmul(x_low, tf.cast(tf.constant(reference.dense_kernel(pattern, v64)), dtype))
    kernel_error = relative_rms(tf.cast(sl.ops.get_kernel(name, pattern)(x_low, v_low), tf.float64).numpy(), expected)
    dense_error = relative_rms(tf.cast(dense, tf.float64).numpy(), expected)
    assert kernel_error <= 1.5 * dense_error + 1e-6, (kernel_error, dense_error)


def test_index_dtype_is_int32_where_every_index_fits():
    from sparselayers.ops.base import index_dtype

    assert index_dtype(2**31 - 1) == tf.int32
    assert index_dtype(2**31) == tf.int64


def test_auto_prefers_dense_for_scattered_tiles_past_the_dense_threshold():
    rng = np.random.default_rng(0)
    outer = np.zeros((32, 32), int)
    outer.flat[rng.choice(32 * 32, 300, replace=False)] = 1  # 29% of the tiles
    tiles = sl.patterns.block_sparse(outer, (16, 16))
    assert tiles.density > sl.ops.choose.DENSE_MIN_DENSITY
    assert sl.ops.choose_kernel(tiles) == "dense"
    sparse_tiles = sl.patterns.block_sparse(np.eye(32, dtype=int) | np.eye(32, k=5, dtype=int), (16, 16))
    assert sparse_tiles.density < sl.ops.choose.DENSE_MIN_DENSITY
    assert sl.ops.choose_kernel(sparse_tiles) == "block"
    wide_blocks = sl.patterns.block_diagonal([(128, 128)] * 4)  # 25% dense, rectangles share nothing
    assert sl.ops.choose_kernel(wide_blocks) == "block"


@pytest.mark.parametrize("name", ALL_KERNELS)
def test_every_kernel_takes_an_empty_batch(name):
    # An empty batch (a last partial batch split across replicas, say) gives
    # an empty output and empty / zero gradients, eagerly and traced with an
    # unknown batch size.
    pattern = sl.patterns.banded((12, 7), lower=2, upper=2) if name == "banded" else sl.patterns.random((12, 7), density=0.3, seed=3)
    kernel = sl.ops.get_kernel(name, pattern)
    values = tf.constant(values_for(pattern, 1, "float32"))

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch([x, values])
            y = kernel(x, values)
            loss = tf.reduce_sum(y)
        d_x, d_values = tape.gradient(loss, [x, values])
        return y, d_x, tf.convert_to_tensor(d_values)

    traced = tf.function(run, input_signature=[tf.TensorSpec([None, 12], tf.float32)])
    for fn in (run, traced):
        y, d_x, d_values = fn(tf.zeros((0, 12)))
        assert y.shape == (0, 7) and d_x.shape == (0, 12)
        np.testing.assert_array_equal(d_values.numpy(), np.zeros(pattern.nnz, "float32"))
    # the traced function still computes non-empty batches
    x = inputs_for(pattern, 3, 0, "float32")
    y, _, _ = traced(tf.constant(x))
    np.testing.assert_allclose(y.numpy(), reference.forward(x, pattern, values.numpy()), rtol=1e-4, atol=1e-4)
