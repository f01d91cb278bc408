"""sl.knowledge.read_topology on hand-written files in GenNet's topology.csv format."""

import io

import keras
import numpy as np
import pandas as pd
import pytest

import sparselayers as sl

# Three levels, GenNet's padding, rows shuffled (not in layer0_node order), a `chr` column.
THREE_LEVELS = """chr,layer0_node,layer0_name,layer1_node,layer1_name,layer2_node,layer2_name
1,3,SNP3       ,1,BRCA2      ,0,Causal_path
0,1,SNP1       ,0,HERC2      ,0,Causal_path
2,5,SNP5       ,2,VEGFA      ,1,Control_path
0,0,SNP0       ,0,HERC2      ,0,Causal_path
1,2,SNP2       ,1,BRCA2      ,0,Causal_path
2,4,SNP4       ,2,VEGFA      ,1,Control_path
"""


def _write(tmp_path, text):
    path = tmp_path / "topology.csv"
    path.write_text(text)
    return path


def _edges(pattern):
    return {(pattern.input_names[r], pattern.output_names[c]) for r, c in zip(pattern.rows, pattern.cols)}


def test_three_levels_padded_and_shuffled(tmp_path):
    path = _write(tmp_path, THREE_LEVELS)
    tables = sl.knowledge.read_topology(path)
    assert len(tables) == 2
    assert tables[0].input_names == ("SNP0", "SNP1", "SNP2", "SNP3", "SNP4", "SNP5")
    assert tables[0].output_names == ("HERC2", "BRCA2", "VEGFA") == tables[1].input_names
    assert tables[1].output_names == ("Causal_path", "Control_path")
    # independent reference: the edges as the rows state them, stripped by hand
    frame = pd.read_csv(path)
    strip = lambda column: [name.strip() for name in frame[column]]  # noqa: E731
    assert _edges(tables[0]) == set(zip(strip("layer0_name"), strip("layer1_name")))
    assert _edges(tables[1]) == set(zip(strip("layer1_name"), strip("layer2_name")))
    assert tables[1].nnz == 3  # a gene -> pathway edge repeated on every path is one entry
    assert sl.knowledge.read_topology(frame)[0] == tables[0]


def test_chain_reads_the_genotype_columns_as_they_are(tmp_path):
    layers = sl.knowledge.chain(sl.knowledge.read_topology(_write(tmp_path, THREE_LEVELS)), activation=None)
    model = keras.Sequential([keras.Input((6,)), *layers])
    rng = np.random.default_rng(0)
    for layer in layers:
        layer.values.assign(rng.normal(size=layer.values.shape).astype("float32"))
        layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    x = rng.normal(size=(4, 6))
    # reference: dense matrices from the file's rows, column j of x is SNP j (layer0_node j)
    frame = pd.read_csv(_write(tmp_path, THREE_LEVELS))
    genes = {"HERC2": 0, "BRCA2": 1, "VEGFA": 2}
    w0 = np.zeros((6, 3))
    w1 = np.zeros((3, 2))
    for _, row in frame.iterrows():
        w0[row.layer0_node, genes[row.layer1_name.strip()]] = 1
        w1[genes[row.layer1_name.strip()], row.layer2_node] = 1
    dense0 = layers[0].to_scipy().toarray()
    np.testing.assert_array_equal(dense0 != 0, w0 != 0)
    expected = x @ dense0 @ layers[1].to_scipy().toarray()
    np.testing.assert_allclose(model.predict(x.astype("float32"), verbose=0), expected, rtol=1e-5, atol=1e-6)


BAD = [
    ("layer0_node,layer0_name,target\n0,a,b\n", "at least two levels"),
    ("layer0_node,layer0_name,layer1_node\n0,a,0\n", "both layer1_node and layer1_name"),
    ("layer0_node,layer1_node,layer1_name\n0,0,g\n", "both layer0_node and layer0_name"),
    ("layer0_node,layer0_name,layer1_node,layer1_name\n0,a,0,g\n0,b,0,g\n", "layer0_node 0 has two names"),
    ("layer0_node,layer0_name,layer1_node,layer1_name\n0,a,0,g\n1,b,1,g\n", "layer1_name 'g' has two nodes"),
    ("layer0_node,layer0_name,layer1_node,layer1_name\n0,a,0,g\n2,b,0,g\n", "1 missing columns"),
    ("layer0_node,layer0_name,layer1_node,layer1_name\n", "at least one path"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_topologies(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        sl.knowledge.read_topology(_write(tmp_path, text))


def test_not_a_path_or_frame():
    with pytest.raises(TypeError, match="`path_or_frame` must be a path to topology.csv or a pandas DataFrame"):
        sl.knowledge.read_topology(42)


HEADER = "layer0_node,layer0_name,layer1_node,layer1_name\n"


def test_names_are_read_as_text(tmp_path):
    # Names a CSV parser would take for numbers or missing values: 1.1 and 1.10, 0672 and 672, NA, nan.
    rows = [
        (0, "1.1", 0, "0672"), (1, "1.10", 1, "672"), (2, "rs3", 2, "NA"), (3, "nan", 2, "NA"), (4, "1e3", 0, "0672"),
    ]
    text = HEADER + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows)
    tables = sl.knowledge.read_topology(_write(tmp_path, text))
    assert tables[0].input_names == tuple(name for _, name, _, _ in rows)  # in layer0_node order
    assert tables[0].output_names == ("0672", "672", "NA")
    assert _edges(tables[0]) == {(name, gene) for _, name, _, gene in rows}
    # A frame read as text gives the same; one whose names pandas parsed is refused.
    as_text = pd.read_csv(tmp_path / "topology.csv", dtype=str, keep_default_na=False)
    assert sl.knowledge.read_topology(as_text)[0] == tables[0]
    parsed = pd.read_csv(tmp_path / "topology.csv")  # "nan" became NaN
    with pytest.raises(ValueError, match=r"row 3: layer0_name is missing.*pd.read_csv\(path, dtype=str"):
        sl.knowledge.read_topology(parsed)


BAD_ROWS = [
    (HEADER + "0,a,0,g\n1,,0,g\n", r"line 3: layer0_name is empty"),
    (HEADER + "0,a,0,g\n1,b,0,   \n", r"line 3: layer1_name is empty"),
    (HEADER + "0,a,0,g\n1,b,0,\n", r"line 3: layer1_name is empty"),
    (HEADER + "0,a,0,g\n1,b,1,h\n1.5,c,1,h\n", r"line 4: layer0_node must be a whole number >= 0\. Received: '1.5'"),
    (HEADER + "0,a,0,g\n1,b,-1,h\n", r"line 3: layer1_node must be a whole number >= 0. Received: '-1'"),
    (HEADER + "0,a,0,g\n,b,0,g\n", r"line 3: layer0_node must be a whole number >= 0. Received: ''"),
    (HEADER + "0,a,0,g\n1,a,0,g\n", r"line 3: layer0_name 'a' has two nodes. Received: 0 \(line 2\) and 1"),
    (HEADER + "0,a,0,g\n1,b,0,h\n", r"line 3: layer1_node 0 has two names. Received: 'g' \(line 2\) and 'h'"),
]


@pytest.mark.parametrize("text, message", BAD_ROWS)
def test_a_bad_row_is_named(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        sl.knowledge.read_topology(_write(tmp_path, text))


def test_a_frame_row_is_named_by_its_index():
    frame = pd.DataFrame(
        {"layer0_node": [0, 1], "layer0_name": ["a", None], "layer1_node": [0, 0], "layer1_name": ["g", "g"]},
        index=[10, 11],
    )
    with pytest.raises(ValueError, match=r"row 11: layer0_name is missing"):
        sl.knowledge.read_topology(frame)
    parsed = pd.read_csv(io.StringIO(HEADER + "0,1.1,0,g\n1,1.10,0,g\n"))  # pandas: both 1.1
    with pytest.raises(ValueError, match=r"layer0_name must hold names as text; pandas parsed row 0 into 1\.1 \("):
        sl.knowledge.read_topology(parsed)
