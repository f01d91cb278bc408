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
    assert p.indices.dtype == np.int32 and p.nnz == len(cells)
    assert p.density == len(cells) / n_cells
    assert not p.indices.flags.writeable


def test_indices_are_int32_up_to_the_largest_shape():
    """Every dimension is at most 2**31 - 1, so int32 holds every index; flat positions need int64."""
    big = 2**31 - 1
    rows, cols = [big - 1, 0, big - 1, 5], [big - 1, big - 2, 0, 7]
    p = sl.SparsityPattern.from_coo(rows, cols, shape=(big, big))
    assert p.indices.dtype == np.int32 and sl.sparsity_pattern.INDEX_DTYPE.itemsize == 4
    assert p.indices.tolist() == [[0, big - 2], [5, 7], [big - 1, 0], [big - 1, big - 1]]
    # Positions past 2**31 (int32 arithmetic would wrap to negative numbers).
    expected = [r * big + c for r, c in sorted(zip(rows, cols))]
    assert p.linear.dtype == np.int64 and p.linear.tolist() == expected
    assert p.transpose().indices.tolist() == sorted([c, r] for r, c in zip(rows, cols))
    assert sl.SparsityPattern.from_config(p.get_config()) == p
    q = sl.SparsityPattern.from_coo([1], [big - 1], shape=(2, big)).kron(sl.patterns.dense((1, 1)))
    assert q.linear.tolist() == [2 * big - 1]
    with pytest.raises(ValueError, match=r"`shape` must be two integers in \[1, 2147483647\]"):
        sl.SparsityPattern.from_coo([0], [0], shape=(2**31, 2))


@given(any_patterns)
def test_fingerprint_hashes_the_entries_as_int64(p):
    """The digest of int32 indices equals the digest of the same entries as int64 (autotune cache keys)."""
    import hashlib

    digest = hashlib.sha256(repr(p.shape).encode())
    digest.update(np.asarray(p.indices, np.int64).tobytes())
    assert p.fingerprint == digest.hexdigest()[:16]


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
    (config_with_gaps([0, 1], "uint8", input_names=base64.b64encode(zlib.compress(b" " * 30000)).decode()),
     "input_names.*over 20480 bytes"),
    ({**config_with_gaps([0, 1], "uint8"), "gap_dtype": "i4,i4"}, "gap_dtype"),
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


# Named patterns from edge lists (issue 11) ----------------------------------

names = st.sampled_from([f"u{k}" for k in range(8)])


def first_appearance(items):
    order = []
    for item in items:
        if item not in order:
            order.append(item)
    return order


@given(st.lists(st.tuples(names, names), min_size=1, max_size=30), st.booleans())
def test_from_edges_matches_a_dense_reference(edges, give_lists):
    sources, targets = [s for s, _ in edges], [t for _, t in edges]
    inputs = sorted(set(sources)) + ["unused"] if give_lists else first_appearance(sources)
    outputs = sorted(set(targets), reverse=True) if give_lists else first_appearance(targets)
    dense = np.zeros((len(inputs), len(outputs)))
    for s, t in edges:
        dense[inputs.index(s), outputs.index(t)] = 1  # repeated edges merge
    p = sl.SparsityPattern.from_edges(sources, targets, inputs if give_lists else None, outputs if give_lists else None)
    assert p == sl.SparsityPattern.from_dense(dense)
    assert p.input_names == tuple(inputs) and p.output_names == tuple(outputs)


def test_from_edges_integer_positions_and_mixed_sides():
    p = sl.SparsityPattern.from_edges(np.array([3, 0, 3]), [1, 0, 1])
    assert p.shape == (4, 2) and p.indices.tolist() == [[0, 0], [3, 1]]
    assert p.input_names is None and p.output_names is None
    q = sl.SparsityPattern.from_edges([2, 0], ["B", "A"], inputs=5, outputs=["A", "B", "C"])
    assert q.shape == (5, 3) and q.indices.tolist() == [[0, 0], [2, 1]]
    assert q.input_names is None and q.output_names == ("A", "B", "C")
    r = sl.SparsityPattern.from_edges([1, 0], ["B", "A"], inputs=["x", "y"])  # positions into named inputs
    assert r.input_names == ("x", "y") and r.output_names == ("B", "A") and r.indices.tolist() == [[0, 1], [1, 0]]
    empty = sl.SparsityPattern.from_edges([], [], inputs=["x"], outputs=2)
    assert empty.shape == (1, 2) and empty.nnz == 0


BAD_EDGES = [
    ((["a", "b"], ["x"]), {}, ValueError, r"same length.*len\(sources\)=2, len\(targets\)=1"),
    ((["a", "zz", "b", "yy", "zz"], ["x"] * 5), {"inputs": ["a", "b"]}, ValueError,
     r"`sources` holds 2 names not in `inputs`: 'zz', 'yy'. Received: 3 edges"),
    ((["a"] * 7, [f"g{k}" for k in range(7)]), {"outputs": ["x"]}, ValueError,
     r"7 names not in `outputs`: 'g0', 'g1', 'g2', 'g3', 'g4', \.\.\. \(7 in all\)"),
    ((["a", 1], ["x", "y"]), {}, TypeError, r"one kind only.*sources\[1\]=1"),
    ((["a", None], ["x", "y"]), {}, TypeError, r"sources\[1\]=None"),
    ((["a", float("nan")], ["x", "y"]), {}, TypeError, r"sources\[1\]=nan"),
    (([0.5], ["x"]), {}, TypeError, r"sources\[0\]=0.5"),
    (([True], ["x"]), {}, TypeError, "sources"),
    (("abc", ["x"]), {}, TypeError, "sequence of names"),
    (([0, 5], ["x", "y"]), {"inputs": 3}, ValueError, r"sources.*\[0, 3\).*sources\[1\]=5"),
    (([0, -1], ["x", "y"]), {}, ValueError, r"sources\[1\]=-1"),
    ((["a"], ["x"]), {"inputs": 3}, TypeError, "holds names.*inputs"),
    ((["a"], ["x"]), {"inputs": ["a", "b", "a"]}, ValueError, r"`inputs` must be unique.*'a'"),
    ((["a"], ["x"]), {"inputs": ["a", 2]}, TypeError, r"inputs\[1\]=2"),
    (([], []), {}, ValueError, "without edges needs"),
    (([0], [0]), {"inputs": 0}, ValueError, "inputs` must be >= 1"),
]


@pytest.mark.parametrize("args, kwargs, error, message", BAD_EDGES)
def test_bad_edges(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        sl.SparsityPattern.from_edges(*args, **kwargs)


def test_from_frame_and_from_csv_match_from_edges(tmp_path):
    pd = pytest.importorskip("pandas")
    table = pd.DataFrame({"snp": ["rs3", "rs1", "rs3", "rs7"], "gene": ["B", "A", "A", "B"], "score": [1, 2, 3, 4]})
    expected = sl.SparsityPattern.from_edges(["rs3", "rs1", "rs3", "rs7"], ["B", "A", "A", "B"])
    p = sl.SparsityPattern.from_frame(table, "snp", "gene")
    assert p == expected and p.input_names == ("rs3", "rs1", "rs7") and p.output_names == ("B", "A")
    table.to_csv(tmp_path / "map.csv", index=False)
    q = sl.SparsityPattern.from_csv(tmp_path / "map.csv", "snp", "gene", outputs=["A", "B"])
    assert q.output_names == ("A", "B") and q.input_names == p.input_names
    assert q == sl.SparsityPattern.from_edges(table.snp, table.gene, outputs=["A", "B"])
    (tmp_path / "map.tsv").write_text("gene\tsnp\n007\trs1\n\n007\trs2\n")
    r = sl.SparsityPattern.from_csv(tmp_path / "map.tsv", "snp", "gene", delimiter="\t")
    assert r.output_names == ("007",) and r.input_names == ("rs1", "rs2")
    with pytest.raises(ValueError, match=r"`target` must be a column.*'genes'.*'snp', 'gene', 'score'"):
        sl.SparsityPattern.from_frame(table, "snp", "genes")
    with pytest.raises(ValueError, match="`source` must be a column"):
        sl.SparsityPattern.from_csv(tmp_path / "map.csv", "SNP", "gene")
    (tmp_path / "excel.csv").write_text("snp,gene\nrs1,A\n", encoding="utf-8-sig")  # Excel's byte-order mark
    assert sl.SparsityPattern.from_csv(tmp_path / "excel.csv", "snp", "gene").input_names == ("rs1",)
    (tmp_path / "short.csv").write_text("snp,gene\nrs1\n")
    with pytest.raises(ValueError, match="line 2: expected 2 fields"):
        sl.SparsityPattern.from_csv(tmp_path / "short.csv", "snp", "gene")


def named(shape=(4, 3), seed=0):
    p = sl.patterns.random(shape, density=0.5, seed=seed)
    return p.with_names([f"in{k}" for k in range(shape[0])], [f"out{k}" for k in range(shape[1])])


def test_names_survive_config_and_transpose():
    p = named()
    q = sl.SparsityPattern.from_config(p.get_config())
    assert q == p and q.input_names == p.input_names and q.output_names == p.output_names
    t = p.transpose()
    assert t.input_names == p.output_names and t.output_names == p.input_names
    assert t == sl.SparsityPattern.from_dense(p.to_dense().T)
    odd = p.with_names(["ä", "b\n,\"", "", "\x00"], None)
    assert sl.SparsityPattern.from_config(odd.get_config()).input_names == ("ä", "b\n,\"", "", "\x00")
    assert "output_names" not in odd.get_config() and "input_names" not in sl.patterns.dense((2, 2)).get_config()
    plain = {**p.get_config(), "input_names": ["a", "b", "c", "d"]}  # a hand-written config
    assert sl.SparsityPattern.from_config(plain).input_names == ("a", "b", "c", "d")


def test_config_of_many_names_is_compact():
    # benchmarks/genomics.py measures a million; 200,000 keeps the suite fast.
    snps = [f"rs{k}" for k in np.random.default_rng(0).choice(10**8, 2 * 10**5, replace=False)]
    p = sl.SparsityPattern.from_edges(snps, [f"G{k // 50}" for k in range(len(snps))])
    size = len(json.dumps(p.get_config()))
    raw = sum(len(s) + 3 for s in snps)  # the names as a JSON list
    assert size < 0.6 * raw, (size, raw)


def test_equality_and_hash_ignore_names():
    p = named()
    assert p == sl.SparsityPattern(p.indices, p.shape) and hash(p) == hash(sl.SparsityPattern(p.indices, p.shape))
    assert p.with_names(None, list("abc")) == p


def test_union_and_intersection_keep_agreeing_names():
    p, q = named(seed=1), named(seed=2)
    for result in (p | q, p & q, p | q.with_names(None, None), q.with_names(None, q.output_names) & p):
        assert result.input_names == p.input_names and result.output_names == p.output_names
    assert (p | q) == sl.SparsityPattern.from_dense((p.to_dense() + q.to_dense()) > 0)
    other = q.with_names(["in0", "in1", "x", "in3"], q.output_names)
    with pytest.raises(ValueError, match=r"`\|` needs patterns whose input_names agree. Received: input_names\[2\]='in2' and 'x'"):
        p | other
    with pytest.raises(ValueError, match="`&`.*output_names"):
        p & q.with_names(None, ["a", "b", "c"])
    assert p.kron(p).input_names is None


def test_repr_and_summary_show_a_few_names():
    p = sl.SparsityPattern.from_edges([f"rs{k}" for k in range(10)], ["A"] * 9 + ["B"], outputs=["A", "B", "C"])
    assert "inputs=['rs0', 'rs1', 'rs2', 'rs3', 'rs4', ... (10 in all)], outputs=['A', 'B', 'C']" in repr(p)
    assert "outputs with no input (bias only): 1: 'C'" in p.summary()
    assert "inputs=" not in repr(sl.patterns.dense((2, 2)))


def test_names_survive_keras_save_and_load(tmp_path):
    keras = pytest.importorskip("keras")
    p = named((6, 4))
    model = keras.Sequential([keras.Input((6,)), sl.SparseDense(p, name="sparse")])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras").get_layer("sparse")
    assert loaded.pattern == p and loaded.pattern.input_names == p.input_names
    assert loaded.pattern.output_names == p.output_names
    np.testing.assert_array_equal(loaded.to_dense(), model.get_layer("sparse").to_dense())


@pytest.mark.parametrize("build, arg", [
    (lambda bad: sl.SparsityPattern.from_edges(["rs1", bad], ["A", "A"]), "sources"),
    (lambda bad: sl.SparsityPattern.from_edges(["rs1", "rs2"], ["A", bad]), "targets"),
    (lambda bad: sl.SparsityPattern.from_edges(["rs1"], ["A"], inputs=["rs1", bad]), "inputs"),
    (lambda bad: sl.patterns.banded((2, 2)).with_names(["rs1", bad], None), "input_names"),
    (lambda bad: sl.patterns.banded((2, 2)).with_names(None, [bad, "B"]), "output_names"),
])
def test_names_must_be_utf8_text(build, arg):
    # A lone surrogate, as os.fsdecode or open(errors="surrogateescape") makes from a stray byte.
    bad = b"rs\x801".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match=rf"`{arg}` must be valid UTF-8 text.*Received: {arg}\[\d\]='rs\\udc801'"):
        build(bad)


def test_saving_a_named_model_never_truncates_an_existing_file(tmp_path):
    import keras

    path = tmp_path / "m.keras"
    keras.Sequential([keras.Input((2,)), sl.SparseDense(sl.patterns.banded((2, 2)))]).save(path)
    size = path.stat().st_size
    bad = b"rs\x801".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="UTF-8"):
        sl.SparseDense(sl.SparsityPattern.from_edges(["rs1", bad], ["A", "B"]))
    assert path.stat().st_size == size


def _config_naming(raw_names: bytes, dim: int) -> dict:
    """An unnamed-looking config of shape ``(dim, 1)`` whose input names are ``raw_names`` (JSON bytes)."""
    return {"shape": [dim, 1], "nnz": 0, "gap_dtype": "uint8", "gaps": base64.b64encode(zlib.compress(b"")).decode(),
            "input_names": base64.b64encode(zlib.compress(raw_names, 9)).decode()}


def test_encoded_names_inflate_a_bounded_multiple_of_their_size():
    # 16 MiB of JSON in ~16 KB: the declared dimension would allow 4096 bytes a name.
    raw = b"[" + b'"a",' * 2**22 + b'"b"]'
    with pytest.raises(ValueError, match=r"`input_names`.*over \d+ bytes of names for \d+ compressed bytes"):
        sl.SparsityPattern.from_config(_config_naming(raw, 2**22 + 1))


def test_encoded_names_hold_a_bounded_number_of_names_per_byte():
    # Inflates 39 times only, but to 10 names per compressed byte: json would make 2e6 Python str.
    n = 2_000_000
    letters = np.where(np.random.default_rng(0).random(n) < 0.1, ord("b"), ord("a")).astype(np.uint8)
    body = np.frombuffer(b'"a",' * n, np.uint8).copy()
    body[1::4] = letters
    raw = b"[" + body.tobytes()[:-1] + b"]"
    with pytest.raises(ValueError, match=rf"`input_names`.*up to {n} names in \d+ compressed bytes"):
        sl.SparsityPattern.from_config(_config_naming(raw, n))


def test_real_name_lists_decode_within_the_bounds():
    names = [f"chr1:ENSG000001234567_transcript_variant_{i:07d}" for i in range(200_000)]  # inflates ~20x
    pattern = sl.SparsityPattern.from_coo([0], [0], (len(names), 1)).with_names(names, ["y"])
    assert sl.SparsityPattern.from_config(pattern.get_config()).input_names == tuple(names)


def test_config_declaring_more_entries_than_any_layer_holds_is_refused():
    config = {"shape": [2**31 - 1, 4], "nnz": 2**31, "gap_dtype": "uint8", "gaps": ""}
    with pytest.raises(ValueError, match=r"`nnz` must be an integer in \[0, 2147483647\]. Received: nnz=2147483648"):
        sl.SparsityPattern.from_config(config)
