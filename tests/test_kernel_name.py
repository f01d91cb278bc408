"""`kernel_name` names the kernel that computed the last call, whatever took it."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl
from tests import reference


def test_compiled_block_forced_on_a_pattern_it_does_not_accept_names_its_twin():
    pattern = sl.patterns.banded((12, 12), lower=1, upper=1)
    layer = sl.SparseDense(pattern, kernel="compiled_block", use_bias=False)
    x = np.random.default_rng(0).normal(size=(3, 12)).astype("float32")
    y = layer(x).numpy()
    np.testing.assert_allclose(y, reference.forward(x, pattern, layer.values.numpy()), rtol=1e-5, atol=1e-5)
    assert layer.kernel_name == sl.ops.compiled.pure_tf_kernel("compiled_block", pattern) == "block"


def test_a_sparse_batch_names_the_sparse_input_product_and_autotune_says_so():
    pattern = sl.patterns.random((20, 6), density=0.3, seed=0)
    layer = sl.SparseDense(pattern, use_bias=False)
    dense = np.random.default_rng(1).normal(size=(4, 20)).astype("float32") * (np.random.default_rng(2).random((4, 20)) < 0.2)
    batch = tf.sparse.from_dense(dense)
    np.testing.assert_allclose(layer(batch), reference.forward(dense, pattern, layer.values.numpy()), rtol=1e-5, atol=1e-5)
    assert layer.kernel_name == "sparse_input"
    report = sl.autotune(layer, batch, rounds=1, cache=False)
    assert report[0].source.startswith("a sparse batch")
    layer(dense)
    assert layer.kernel_name != "sparse_input"


@pytest.mark.parametrize("kernel", ["compiled_csr", "csr", "dense"])
def test_a_forced_kernel_that_runs_names_itself(kernel):
    pattern = sl.patterns.random((30, 8), density=0.2, seed=0)
    layer = sl.SparseDense(pattern, kernel=kernel)
    layer(np.ones((2, 30), "float32"))
    fused = kernel != "compiled_csr" or sl.ops.compiled.available()
    assert layer.kernel_name == (kernel if fused else sl.ops.compiled.pure_tf_kernel(kernel, pattern))
