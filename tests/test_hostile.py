"""Malformed patterns and inputs: a clear TypeError/ValueError, never a crash or a wrong result."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sparselayers as sl

bad_dtypes = st.sampled_from(["float32", "float64", "complex64", "bool", "U3", "object"])


@given(hnp.arrays(dtype=bad_dtypes, shape=st.integers(1, 5)))
def test_non_integer_indices_raise_type_error(rows):
    cols = np.zeros(rows.shape[0], dtype=np.int64)
    with pytest.raises(TypeError, match="rows"):
        sl.SparsityPattern.from_coo(rows, cols, (4, 4))


@given(st.lists(st.one_of(st.integers(-10, 10), st.floats(allow_nan=True), st.lists(st.integers(0, 3), max_size=2)),
                min_size=1, max_size=5))
def test_mixed_and_ragged_index_lists_never_crash(rows):
    cols = [0] * len(rows)
    try:
        p = sl.SparsityPattern.from_coo(rows, cols, (4, 4))
    except (TypeError, ValueError) as error:
        assert "rows" in str(error)
    else:
        assert all(isinstance(r, int) and 0 <= r < 4 for r in rows)
        assert p.nnz == len(rows)


@given(st.one_of(
    st.tuples(st.integers(-5, 0), st.integers(1, 5)),
    st.tuples(st.integers(2**31, 2**63 - 1), st.integers(1, 5)),
    st.tuples(st.floats(allow_nan=True), st.integers(1, 5)),
    st.lists(st.integers(1, 5), min_size=3, max_size=4).map(tuple),
    st.none(),
    st.text(max_size=3),
))
def test_bad_shapes_raise(shape):
    with pytest.raises((TypeError, ValueError), match="shape"):
        sl.SparsityPattern.from_coo([0], [0], shape)


@given(st.integers(2**31, 2**40))
def test_huge_dimension_is_refused_by_generators(n):
    with pytest.raises(ValueError, match="shape"):
        sl.patterns.random((n, 2), density=0.0)


@given(st.integers(0, 3), st.sampled_from([np.nan, np.inf, -np.inf]), st.sampled_from(sorted(sl.ops.KERNELS)))
def test_nan_and_inf_inputs_reach_every_connected_output(row, bad, kernel):
    pattern = sl.patterns.banded((4, 5), lower=1, upper=1)
    layer = sl.SparseDense(pattern, kernel=kernel, values_initializer="ones", use_bias=False)
    x = np.ones((2, 4), "float32")
    x[0, row] = bad
    y = layer(x).numpy()
    # scipy's sparse product is the reference for the connected outputs
    expected = pattern.to_scipy(np.ones(pattern.nnz)).T @ x[0].astype(np.float64)
    connected = pattern.cols[pattern.rows == row]
    np.testing.assert_array_equal(np.isnan(y[0, connected]), np.isnan(expected[connected]))
    np.testing.assert_array_equal(np.isinf(y[0, connected]), np.isinf(expected[connected]))
    np.testing.assert_array_equal(y[0, connected], expected[connected].astype("float32"))
    assert np.isfinite(y[1]).all()  # other rows of the batch are untouched
    unconnected = np.setdiff1d(np.arange(5), connected)
    # Kernels that multiply stored entries only leave unconnected outputs
    # alone; "dense" and "banded" (zero-padded tiles) multiply zeros too and,
    # like a masked Dense, may spread NaN through them.
    if kernel not in ("dense", "banded"):
        np.testing.assert_array_equal(y[0, unconnected], expected[unconnected])


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        (np.ones(4, "float32"), ValueError, "ndim"),
        (np.ones((2, 3), "float32"), ValueError, "4"),
        (tf.constant([["a", "b", "c", "d"]]), (TypeError, ValueError), ""),
    ],
    ids=["rank-1", "wrong-last-dim", "strings"],
)
def test_bad_layer_inputs(inputs, error, message):
    layer = sl.SparseDense(sl.patterns.dense((4, 2)))
    with pytest.raises(error, match=message):
        layer(inputs)


def test_gather_kernel_refuses_a_batch_beyond_int32_before_running():
    pattern = sl.patterns.random((2**17, 2**14), density=0.0005, seed=0)  # ~1M entries
    layer = sl.SparseDense(pattern, kernel="gather")
    layer.build((None, pattern.shape[0]))
    with pytest.raises(ValueError, match=r"batch \* nnz.*Received: batch=4096"):
        tf.function(layer).get_concrete_function(tf.TensorSpec((4096, pattern.shape[0])))  # traces, runs nothing


# Hostile files: loading never inflates more than the layer can hold --------

_MEASURE = textwrap.dedent('''
    import json, sys
    import keras, numpy as np
    import sparselayers as sl
    from tests import peak_memory
    from tests.hostile_files import {maker}
    target, load = {maker}(sys.argv[1])
    before = peak_memory.start()
    try:
        load(target)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({{"error": error, "growth_mib": peak_memory.growth_kib(before) / 1024}}))
''')


def _measure(maker, tmp_path):
    """Runs ``tests.hostile_files.<maker>`` in a fresh process: the peak memory growth of the load, and its error."""
    script = _MEASURE.format(maker=maker)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("maker, message", [
    ("weights_file_declaring_1e8_entries", r"shape \(10000, 10000\).*\(12, 8\)"),
    ("weights_file_declaring_1e8_entries_of_the_layers_shape", r"nnz=100000000.*nnz=20"),
    ("keras_file_with_a_names_bomb", r"input_names.*over \d+ bytes"),
])
def test_hostile_files_raise_before_inflating(maker, message, tmp_path):
    result = _measure(maker, tmp_path)
    assert result["error"] is not None and re.search(message, result["error"], re.DOTALL), result
    assert result["growth_mib"] < 512, result
