import base64
import json
import zipfile
import zlib

import numpy as np
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from tests.strategies import any_patterns, random_patterns, shapes


@given(st.data())
def test_from_coo_is_canonical_whatever_the_order(data):
    shape = data.draw(shapes())
    n_cells = shape[0] * shape[1]
    cells = data.draw(st.lists(st.integers(0, n_cells - 1), unique=True, max_size=n_cells))
    rows, cols = np.divmod(np.array(cells, np.int64), shape[1])
    p = sl.SparsityPattern.from_coo(rows, cols, shape)
    expected = sorted(zip(rows.tolist(), cols.tolist()))
    assert p.indices.tolist() == [list(e) for e in expected]
    assert p.indices.dtype == np.int64 and p.nnz == len(cells)
    assert p.density == len(cells) / n_cells
    assert not p.indices.flags.writeable


@given(any_patterns)
def test_scipy_round_trip(p):
    values = np.arange(1, p.nnz + 1, dtype=np.float64)
    m = p.to_scipy(values)
    assert m.format == "csr" and m.shape == p.shape
    assert sl.SparsityPattern.from_scipy(m) == p
    dense = np.zeros(p.shape)
    dense[tuple(p.indices.T)] = values
    np.testing.assert_array_equal(m.toarray(), dense)
    np.testing.assert_array_equal(p.to_dense(values), dense)


@given(random_patterns())
def test_from_dense_matches_numpy_nonzero(p):
    mask = p.to_dense()
    q = sl.SparsityPattern.from_dense(mask)
    assert q == p
    assert sorted(map(tuple, q.indices.tolist())) == list(zip(*np.nonzero(mask)))


FORMATS = ["coo", "csr", "csc", "bsr", "dia", "lil", "dok"]


def stored_positions(m):
    """The stored coordinates of ``m`` read from its own format's arrays (no tocoo)."""
    n, k = m.shape
    if m.format == "dia":  # data[d, j] is stored at (j - offsets[d], j)
        return {(j - off, j) for off in m.offsets for j in range(min(k, m.data.shape[1])) if 0 <= j - off < n}
    if m.format == "dok":
        return set(m.keys())
    if m.format == "lil":
        return {(i, j) for i, row in enumerate(m.rows) for j in row}
    if m.format in ("csr", "csc", "bsr"):
        r, c = m.blocksize if m.format == "bsr" else (1, 1)
        cells = {
            (major, int(m.indices[t]))
            for major in range(len(m.indptr) - 1)
            for t in range(m.indptr[major], m.indptr[major + 1])
        }
        if m.format == "csc":
            return {(i, j) for j, i in cells}
        return {(i * r + a, j * c + b) for i, j in cells for a in range(r) for b in range(c)}
    return set(zip(*(m.coords if hasattr(m, "coords") else (m.row, m.col))))


@pytest.mark.parametrize("kind", ["matrix", "array"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_from_scipy_every_format(fmt, kind):
    dense = np.array([[0, 2.0, 0, 0], [1.0, 0, 0, 3.0], [0, 0, 4.0, 0]])
    constructor = getattr(scipy.sparse, f"{fmt}_{kind}")
    m = constructor(scipy.sparse.csr_array(dense)) if fmt != "dia" else constructor(dense)
    p = sl.SparsityPattern.from_scipy(m)
    assert p.nnz == m.nnz
    assert set(map(tuple, p.indices.tolist())) == stored_positions(m)
    if fmt != "dia":  # DIA stores whole diagonals, padding zeros included
        assert p == sl.SparsityPattern.from_dense(dense)


@pytest.mark.parametrize("kind", ["matrix", "array"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_from_scipy_keeps_zero_initialised_structures(fmt, kind):
    """A structure whose stored values are all 0 keeps every stored entry, in every format."""
    expected = sl.patterns.banded((6, 5), lower=1, upper=1) | sl.SparsityPattern.from_coo([5, 0], [0, 4], (6, 5))
    zeros = scipy.sparse.csr_array(
        (np.zeros(expected.nnz), expected.cols.copy(), expected.row_pointers.copy()), shape=(6, 5)
    )
    constructor = getattr(scipy.sparse, f"{fmt}_{kind}")
    m = constructor(zeros)
    p, data = sl.SparsityPattern._from_scipy_with_data(m)
    assert p.nnz == m.nnz and set(map(tuple, p.indices.tolist())) == stored_positions(m)
    assert not data.any()
    if fmt != "dia":
        assert p == expected
    else:  # the stored diagonals of the band and the two corners, all in shape
        assert set(map(tuple, expected.indices.tolist())) <= stored_positions(m)


def test_from_scipy_dia_keeps_zeros():
    zeros = scipy.sparse.diags_array([np.zeros(3), np.zeros(4), np.zeros(3)], offsets=[-1, 0, 1])
    assert zeros.nnz == 10 and sl.SparsityPattern.from_scipy(zeros).nnz == 10
    assert sl.SparsityPattern.from_scipy(zeros) == sl.patterns.banded((4, 4), lower=1, upper=1)
    one_zero = scipy.sparse.dia_array(([[1.0, 0.0, 3.0]], [0]), shape=(3, 3))
    p, data = sl.SparsityPattern._from_scipy_with_data(one_zero)
    assert p.indices.tolist() == [[0, 0], [1, 1], [2, 2]] and data.tolist() == [1.0, 0.0, 3.0]
    wide = scipy.sparse.dia_matrix((np.arange(1.0, 13.0).reshape(2, 6), [2, -1]), shape=(3, 5))
    p, data = sl.SparsityPattern._from_scipy_with_data(wide)
    np.testing.assert_array_equal(p.to_dense(data), wide.toarray())
    assert p.nnz == wide.nnz


def test_from_scipy_keeps_explicit_zeros_and_merges_duplicates():
    m = scipy.sparse.coo_array(
        ([1.0, 0.0, 2.0, 5.0], ([0, 1, 0, 2], [1, 0, 1, 2])), shape=(3, 3)
    )
    p, data = sl.SparsityPattern._from_scipy_with_data(m)
    reference = m.tocsr()  # scipy's own merge
    reference.sum_duplicates()
    assert p.indices.tolist() == [[0, 1], [1, 0], [2, 2]]
    np.testing.assert_array_equal(data, reference.data)


@given(any_patterns, any_patterns)
def test_union_and_intersection_match_dense_logic(p, q):
    if p.shape != q.shape:
        q = sl.SparsityPattern.from_dense(np.ones(p.shape) * (np.random.default_rng(q.nnz).random(p.shape) < 0.4))
    a, b = p.to_dense() != 0, q.to_dense() != 0
    assert (p | q) == sl.SparsityPattern.from_dense(a | b)
    assert (p & q) == sl.SparsityPattern.from_dense(a & b)


@given(any_patterns)
def test_transpose_matches_dense_transpose(p):
    assert p.transpose() == sl.SparsityPattern.from_dense(p.to_dense().T)
    assert p.T.T == p


@given(random_patterns(max_dim=4), random_patterns(max_dim=4))
def test_kron_matches_numpy_kron(p, q):
    assert p.kron(q) == sl.SparsityPattern.from_dense(np.kron(p.to_dense(), q.to_dense()))


@given(any_patterns)
def test_config_round_trip_and_equality_and_hash(p):
    q = sl.SparsityPattern.from_config(p.get_config())
    assert q == p and hash(q) == hash(p)


def test_config_of_a_large_pattern_is_compact():
    p = sl.patterns.random((2000, 1000), density=0.5, seed=0)
    size = len(p.get_config()["gaps"])
    assert size < 3 * p.nnz  # a JSON list of indices would take over 10 bytes per entry


def test_corrupt_config_is_refused():
    config = sl.patterns.banded((5, 5), lower=1).get_config()
    with pytest.raises(ValueError, match="nnz"):
        sl.SparsityPattern.from_config({**config, "nnz": config["nnz"] + 1})
    with pytest.raises(ValueError, match="Corrupt"):
        sl.SparsityPattern.from_config({**config, "gaps": "not base64!"})


def test_fans_match_dense_sums():
    p = sl.patterns.random((30, 20), density=0.3, seed=3)
    np.testing.assert_array_equal(p.fan_in, p.to_dense().sum(axis=0))
    np.testing.assert_array_equal(p.fan_out, p.to_dense().sum(axis=1))


BAD_COO = [
    (([0, 1], [0], (2, 2)), ValueError, "same length"),
    (([0, 2], [0, 1], (2, 2)), ValueError, r"rows\[1\]=2"),
    (([0, -1], [0, 1], (2, 2)), ValueError, r"rows\[1\]=-1"),
    (([0, 1], [0, 5], (2, 2)), ValueError, r"cols\[1\]=5"),
    (([0, 1, 0], [1, 0, 1], (2, 2)), ValueError, r"duplicate entry \(row=0, col=1\) at position 2"),
    (([0.5, 1], [0, 1], (2, 2)), TypeError, "rows.*integers"),
    (([np.nan, 1], [0, 1], (2, 2)), TypeError, "rows.*integers"),
    (([0, 1], [0, np.inf], (2, 2)), TypeError, "cols.*integers"),
    (([[0], [1, 2]], [0, 1], (2, 2)), TypeError, "ragged"),
    ((np.array([0, 1], dtype=object), [0, 1], (2, 2)), TypeError, "rows"),
    (([True, False], [0, 1], (2, 2)), TypeError, "rows"),
    (([0], [0], (0, 2)), ValueError, r"shape.*Received: shape=\(0, 2\)"),
    (([0], [0], (-1, 2)), ValueError, "shape"),
    (([0], [0], (2,)), ValueError, "exactly two"),
    (([0], [0], (2.0, 2)), TypeError, "shape"),
    (([0], [0], (2**40, 2)), ValueError, "shape"),
    (([0], [0], "ab"), TypeError, "shape"),
]


@pytest.mark.parametrize("args, error, message", BAD_COO)
def test_bad_coo_input(args, error, message):
    with pytest.raises(error, match=message):
        sl.SparsityPattern.from_coo(*args)


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (np.ones(3), ValueError, r"2-D.*shape \(3,\)"),
        (np.ones((2, 2, 2)), ValueError, "2-D"),
        (np.zeros((0, 3)), ValueError, "mask.shape"),
        ([[1, 0], [1]], TypeError, "rectangular"),
        (np.array([["a", "b"]]), TypeError, "numeric"),
    ],
)
def test_bad_mask(mask, error, message):
    with pytest.raises(error, match=message):
        sl.SparsityPattern.from_dense(mask)


def test_from_scipy_refuses_non_sparse():
    with pytest.raises(TypeError, match="scipy.sparse"):
        sl.SparsityPattern.from_scipy(np.eye(3))


def test_values_of_wrong_length_are_refused():
    with pytest.raises(ValueError, match=r"Received: values with shape \(2,\)"):
        sl.patterns.dense((2, 2)).to_dense([1.0, 2.0])


def test_empty_pattern_is_valid():
    p = sl.SparsityPattern.from_coo([], [], (3, 4))
    assert p.nnz == 0 and p.to_dense().sum() == 0 and p.to_scipy().nnz == 0


# Malformed data is refused at construction (issue 12.5) ---------------------


def config_with_gaps(gaps, dtype, shape=(5, 5), **extra):
    payload = zlib.compress(np.asarray(gaps, dtype=dtype).tobytes())
    config = {"shape": list(shape), "nnz": len(gaps), "gap_dtype": np.dtype(dtype).name,
              "gaps": base64.b64encode(payload).decode("ascii")}
    return {**config, **extra}


@pytest.mark.parametrize("dtype", ["int16", ">u4", "uint64"])
def test_config_with_handmade_gaps_matches_cumsum(dtype):
    p = sl.SparsityPattern.from_config({**config_with_gaps([2, 1, 5, 10], dtype), "gap_dtype": dtype})
    assert p.linear.tolist() == [2, 3, 8, 18]


BAD_CONFIGS = [
    (config_with_gaps([0, 1.5, 2], "float32"), "gap_dtype.*integer.*float32"),
    (config_with_gaps([0, 1, 2], "complex64"), "gap_dtype"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "gap_dtype": "str"}, "gap_dtype"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "gap_dtype": "no-such-dtype"}, "gap_dtype"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "gap_dtype": None}, "gap_dtype"),
    (config_with_gaps([0, 3, -1], "int8"), r"sorted and unique.*gaps\[2\]=-1"),
    (config_with_gaps([-2, 3, 1], "int8"), r"gaps\[0\]=-2"),
    (config_with_gaps([0, 1, 0], "uint8"), r"gaps\[2\]=0"),
    (config_with_gaps([0, 2**63 + 5], "uint64"), r"gaps\[1\]=-"),
    (config_with_gaps([4, 20, 1], "uint8"), r"run past shape=\(5, 5\)"),
    (config_with_gaps([0, 2**62, 2**62], "int64"), "run past"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "nnz": 4}, "declares nnz=4 but `gaps` holds 3"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "nnz": 2}, "declares nnz=2"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "nnz": 2.5}, "nnz"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "nnz": "3"}, "nnz"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "nnz": 26}, "nnz"),
    (config_with_gaps([0, 1, 2], "uint16", shape=(0, 5)), "shape"),
    ({**config_with_gaps([0, 1, 2], "uint8"), "gaps": "not base64!"}, "decode"),
    ({k: v for k, v in config_with_gaps([0], "uint8").items() if k != "gaps"}, r"missing \['gaps'\]"),
    (config_with_gaps([0, 1], "uint8", input_names=["a", "b"]), "input_names.*5"),
    (config_with_gaps([0, 1], "uint8", output_names=["a", "b", "c", "d", "a"]), "output_names.*unique.*'a'"),
    (config_with_gaps([0, 1], "uint8", input_names=[1, 2, 3, 4, 5]), "input_names.*str"),
    (config_with_gaps([0, 1], "uint8", input_names="eJzLSMzJAQ=="), "input_names"),
    ("not a dict", "dict"),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS)
def test_malformed_config_is_refused(config, message):
    with pytest.raises(ValueError, match=message):
        sl.SparsityPattern.from_config(config)


def test_inflating_payload_is_refused_without_inflating_it():
    bomb = base64.b64encode(zlib.compress(bytes(50_000_000))).decode("ascii")
    with pytest.raises(ValueError, match=r"declares nnz=3 but `gaps` holds 4\+ entries"):
        sl.SparsityPattern.from_config({"shape": [5, 5], "nnz": 3, "gap_dtype": "uint8", "gaps": bomb})


BAD_INDICES = [
    ([[0.0, 1.0]], (2, 2), TypeError, "integers.*float64"),
    ([[True, False]], (2, 2), TypeError, "integers"),
    ([[0, 1, 2]], (2, 3), ValueError, r"\(nnz, 2\)"),
    ([0, 1], (2, 2), ValueError, r"\(nnz, 2\)"),
    ([[0, 1], [2, 0]], (2, 2), ValueError, r"rows must lie in \[0, 2\).*indices\[1\]=\[2, 0\]"),
    ([[0, -1]], (2, 2), ValueError, r"cols must lie"),
    ([[1, 0], [0, 1]], (2, 2), ValueError, r"sorted and unique.*indices\[1\]=\[0, 1\] after \[1, 0\]"),
    ([[0, 1], [0, 1]], (2, 2), ValueError, "sorted and unique"),
    ([[0, 1]], (2, 0), ValueError, "shape"),
]


@pytest.mark.parametrize("indices, shape, error, message", BAD_INDICES)
def test_constructor_refuses_non_canonical_indices(indices, shape, error, message):
    with pytest.raises(error, match=message):
        sl.SparsityPattern(np.asarray(indices), shape)


@given(any_patterns)
def test_constructor_accepts_canonical_indices(p):
    assert sl.SparsityPattern(p.indices, p.shape) == p


@pytest.mark.parametrize(
    "gaps, dtype, message",
    [([0, 3, -1], "int8", r"gaps\[2\]=-1"), ([0, 1, 0], "uint8", r"gaps\[2\]=0"), ([0, 1, 2], "float64", "gap_dtype")],
)
def test_edited_keras_file_is_refused(tmp_path, gaps, dtype, message):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((5,)), sl.SparseDense(sl.patterns.banded((5, 5)), name="sparse")])
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    layer = next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == "sparse")
    layer["config"]["pattern"].update(config_with_gaps(gaps, dtype))
    files["config.json"] = json.dumps(config).encode()
    edited = tmp_path / "edited.keras"
    with zipfile.ZipFile(edited, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    # Keras re-raises deserialization errors as TypeError, quoting ours.
    with pytest.raises((ValueError, TypeError), match="Corrupt SparsityPattern config.*" + message):
        keras.saving.load_model(edited)
