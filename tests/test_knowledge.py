"""sl.knowledge: layers from mapping tables, read back with names, against NumPy float64."""

import matplotlib

matplotlib.use("Agg")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sparselayers as sl  # noqa: E402
from tests.strategies import random_patterns  # noqa: E402

pd = pytest.importorskip("pandas")

SNP_GENE = (["rs1", "rs2", "rs3", "rs4", "rs4", "rs5"], ["A", "A", "B", "B", "C", "C"])
GENE_PATHWAY = (["A", "B", "C", "C"], ["P1", "P1", "P1", "P2"])


def dense_from_table(sources, targets, inputs, outputs):
    """The independent reference: a 0/1 matrix filled edge by edge."""
    w = np.zeros((len(inputs), len(outputs)))
    for s, t in zip(sources, targets):
        w[inputs.index(s), outputs.index(t)] = 1
    return w


def test_chain_builds_named_layers_matching_the_tables():
    layers = sl.knowledge.chain([SNP_GENE, pd.DataFrame({"g": GENE_PATHWAY[0], "p": GENE_PATHWAY[1]})],
                                activation=["relu", None], names=["genes", "pathways"], use_bias=False)
    assert [layer.name for layer in layers] == ["genes", "pathways"]
    assert layers[0].activation is keras.activations.relu and not layers[1].use_bias
    snps, genes, pathways = ["rs1", "rs2", "rs3", "rs4", "rs5"], ["A", "B", "C"], ["P1", "P2"]
    np.testing.assert_array_equal(layers[0].pattern.to_dense(), dense_from_table(*SNP_GENE, snps, genes))
    np.testing.assert_array_equal(layers[1].pattern.to_dense(), dense_from_table(*GENE_PATHWAY, genes, pathways))
    assert layers[0].pattern.input_names == tuple(snps) and layers[1].pattern.input_names == tuple(genes)
    assert layers[1].pattern.output_names == tuple(pathways)
    model = keras.Sequential([keras.Input((5,)), *layers])
    assert model.output_shape == (None, 2)


def test_chain_aligns_a_named_pattern_given_in_another_order():
    genes_reordered = sl.SparsityPattern.from_edges(*GENE_PATHWAY, inputs=["C", "A", "B"])
    snp_gene = sl.SparsityPattern.from_edges(*SNP_GENE)
    layers = sl.knowledge.chain([snp_gene, genes_reordered])
    assert layers[0].pattern is snp_gene  # aligned already: used as it is
    assert layers[1].pattern.input_names == ("A", "B", "C")
    np.testing.assert_array_equal(
        layers[1].pattern.to_dense(), dense_from_table(*GENE_PATHWAY, ["A", "B", "C"], ["P1", "P2"])
    )


def test_tables_that_do_not_meet_are_reported_by_name():
    pathway_table = (["A", "B", "X", "Y", "X"], ["P1", "P1", "P1", "P2", "P2"])  # no C; X and Y unknown
    with pytest.raises(ValueError, match=(
        r"`tables\[0\]` ends at genes that `tables\[1\]` does not start from: 1 of its 3 outputs are not "
        r"sources of the next table \('C'\), and 2 sources of the next table are not its outputs \('X', 'Y'\)"
        r".*strict=False"
    )):
        sl.knowledge.chain([SNP_GENE, pathway_table], names=["genes", "pathways"])
    with pytest.warns(UserWarning) as record:
        layers = sl.knowledge.chain([SNP_GENE, pathway_table], names=["genes", "pathways"], strict=False)
    message = str(record[0].message)
    assert "level 1 (genes): 5 units; 2 without input (bias only): 'X', 'Y'; 1 without output (unused): 'C'" in message
    assert layers[0].pattern.output_names == ("A", "B", "C", "X", "Y")
    assert layers[0].pattern.fan_in.tolist() == [2, 2, 2, 0, 0] and layers[1].pattern.fan_out.tolist() == [1, 1, 0, 2, 1]


def test_dead_inputs_and_unknown_inputs():
    with pytest.warns(UserWarning, match=r"level 0 \(inputs\): 7 units; 2 without output \(unused\): 'rs0', 'rs9'"):
        layers = sl.knowledge.chain([SNP_GENE], inputs=["rs0", "rs1", "rs2", "rs3", "rs4", "rs5", "rs9"])
    assert layers[0].pattern.input_names[0] == "rs0" and layers[0].pattern.fan_out[[0, 6]].tolist() == [0, 0]
    report = sl.knowledge.check_chain([SNP_GENE], inputs=["rs0", "rs1", "rs2", "rs3", "rs4", "rs5", "rs9"])
    assert report.no_output[0] == ("rs0", "rs9") and report.has_dead_units
    with pytest.raises(ValueError, match=r"`tables\[0\]` \(level 0 -> level 1\): `sources` holds 2 names not in `inputs`: 'rs4', 'rs5'"):
        sl.knowledge.check_chain([SNP_GENE], inputs=["rs1", "rs2", "rs3"])


@pytest.mark.parametrize(
    "tables, kwargs, error, message",
    [
        ([], {}, ValueError, "non-empty list"),
        ([sl.patterns.dense((2, 2))], {}, ValueError, r"tables\[0\]` must be a named pattern"),
        ([42], {}, TypeError, r"tables\[0\]"),
        ([SNP_GENE], {"names": ["a", "b"]}, ValueError, "`names` must give one entry per table"),
        ([SNP_GENE], {"activation": ["relu", "relu"]}, ValueError, "`activation`"),
    ],
)
def test_bad_chains(tables, kwargs, error, message):
    with pytest.raises(error, match=message):
        sl.knowledge.chain(tables, **kwargs)


def test_to_frame_lists_every_entry_with_names_or_positions():
    layers = sl.knowledge.chain([SNP_GENE])
    layers[0].build((None, 5))
    values = np.arange(1.0, 7.0, dtype="float32")
    layers[0].values.assign(values)
    frame = layers[0].to_frame()
    assert list(frame.columns) == ["input", "output", "weight"]
    assert list(zip(frame.input, frame.output, frame.weight)) == list(zip(*SNP_GENE, values.tolist()))
    unnamed = sl.SparseDense(sl.patterns.banded((3, 3)))
    with pytest.raises(ValueError, match="build it"):
        unnamed.to_frame()
    unnamed.build((None, 3))
    frame = unnamed.to_frame()
    assert frame.input.tolist() == [0, 1, 2] and frame.output.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(frame.weight, unnamed.values.numpy())


def small_model(seed=0, activation="tanh"):
    layers = sl.knowledge.chain([SNP_GENE, GENE_PATHWAY], activation=activation)
    model = keras.Sequential([keras.Input((5,)), layers[0], keras.layers.Dropout(0.5), layers[1],
                              keras.layers.Dense(2, activation=None)])
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    return model


def kernels(model):
    return [layer.to_dense() if isinstance(layer, sl.SparseDense) else layer.kernel.numpy()
            for layer in model.layers if layer.weights]


def test_path_weights_equal_the_product_of_the_kernels():
    model = small_model()
    w1, w2, w3 = (w.astype(np.float64) for w in kernels(model))
    names = [("rs1", "rs2", "rs3", "rs4", "rs5"), ("A", "B", "C"), ("P1", "P2")]
    for level, product in enumerate([w1 @ w2 @ w3, w2 @ w3, w3]):
        for output in (0, 1):
            frame = sl.knowledge.path_weights(model, level=level, output=output)
            expected = product[:, output]
            assert list(frame.columns) == ["unit", "position", "relevance"]
            np.testing.assert_allclose(frame.relevance, expected[frame.position], rtol=1e-6)
            assert sorted(frame.position) == list(range(len(expected)))
            assert np.all(np.diff(np.abs(frame.relevance)) <= 0)  # sorted by |relevance|
            assert list(frame.unit) == [names[level][k] for k in frame.position]


@settings(max_examples=10)
@given(random_patterns(max_dim=6), st.integers(1, 6), st.integers(0, 2**16))
def test_path_weights_property(p, width, seed):
    rng = np.random.default_rng(seed)
    q = sl.SparsityPattern.from_dense(rng.random((p.shape[1], width)) < 0.5)
    layers = [sl.SparseDense(p), sl.SparseDense(q)]
    keras.Sequential([keras.Input((p.shape[0],)), *layers])
    for layer in layers:
        layer.values.assign(rng.normal(size=layer.pattern.nnz).astype("float32"))
    output = int(rng.integers(width))
    frame = sl.knowledge.path_weights(layers, output=output)
    expected = (layers[0].to_dense().astype(np.float64) @ layers[1].to_dense())[:, output]
    np.testing.assert_allclose(frame.sort_values("position").relevance, expected, rtol=1e-5, atol=1e-6)


def reference_gradient_x_input(model, x, level, output, absolute=True):
    """h * d y[output] / d h, in float64 by the chain rule (tanh layers, Dropout off)."""
    (w1, b1), (w2, b2), (w3, _) = [
        (k.astype(np.float64), layer.bias.numpy().astype(np.float64))
        for k, layer in zip(kernels(model), [layer for layer in model.layers if layer.weights])
    ]
    a1 = np.tanh(x @ w1 + b1)
    a2 = np.tanh(a1 @ w2 + b2)
    d_a2 = np.broadcast_to(w3[:, output], a2.shape)
    d_a1 = (d_a2 * (1 - a2**2)) @ w2.T
    d_x = (d_a1 * (1 - a1**2)) @ w1.T
    h, d_h = [(x, d_x), (a1, d_a1), (a2, d_a2)][level]
    product = h * d_h
    return (np.abs(product) if absolute else product).mean(axis=0)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_gradient_x_input_matches_the_chain_rule(level):
    model = small_model(seed=level)
    x = np.random.default_rng(3).integers(0, 3, (37, 5)).astype(np.float64)
    for output, absolute in ((1, True), (0, False)):
        frame = sl.knowledge.gradient_x_input(model, x.astype("float32"), level=level, output=output,
                                              batch_size=8, absolute=absolute)
        expected = reference_gradient_x_input(model, x, level, output, absolute)
        np.testing.assert_allclose(frame.relevance, expected[frame.position], rtol=1e-4, atol=1e-6)
        assert np.all(np.diff(np.abs(frame.relevance)) <= 0)


def test_gradient_x_input_reads_int8_memmaps_and_datasets(tmp_path):
    import tensorflow as tf

    model = small_model(seed=5)
    x = np.random.default_rng(4).integers(0, 3, (20, 5)).astype(np.int8)
    mapped = np.memmap(tmp_path / "g.int8", dtype=np.int8, mode="w+", shape=x.shape)
    mapped[:] = x
    expected = reference_gradient_x_input(model, x.astype(np.float64), 0, 0)
    from_memmap = sl.knowledge.gradient_x_input(model, mapped, batch_size=6)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros((20, 2), "float32"))).batch(7)
    from_dataset = sl.knowledge.gradient_x_input(model, dataset)
    for frame in (from_memmap, from_dataset):
        assert frame.unit.tolist() == [("rs1", "rs2", "rs3", "rs4", "rs5")[k] for k in frame.position]
        np.testing.assert_allclose(frame.relevance, expected[frame.position], rtol=1e-4, atol=1e-6)


def test_relevance_arguments_are_checked():
    model = small_model()
    with pytest.raises(ValueError, match=r"`level` must be an integer in \[0, 3\)"):
        sl.knowledge.path_weights(model, level=3)
    with pytest.raises(ValueError, match="`output` must be an output name or a position in \\[0, 2\\)"):
        sl.knowledge.path_weights(model, output=2)
    with pytest.raises(ValueError, match="`output` must be one of the model's output names"):
        sl.knowledge.path_weights(model, output="P1")
    with pytest.raises(ValueError, match="2-D array"):
        sl.knowledge.gradient_x_input(model, np.ones(5))
    with pytest.raises(ValueError, match="no samples"):
        sl.knowledge.gradient_x_input(model, np.ones((0, 5), "float32"))
    odd = keras.Sequential([keras.Input((5,)), keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(1)])
    with pytest.raises(TypeError, match="layer 'ln' of type LayerNormalization"):
        sl.knowledge.path_weights(odd)


def test_output_by_name():
    layers = sl.knowledge.chain([SNP_GENE, GENE_PATHWAY], activation=None)
    model = keras.Sequential([keras.Input((5,)), *layers])
    by_name = sl.knowledge.path_weights(model, output="P2")
    by_position = sl.knowledge.path_weights(model, output=1)
    assert by_name.equals(by_position)


def test_manhattan_plot_colours_units_by_their_group():
    from sparselayers.plotting import plot_manhattan

    model = small_model()
    frame = sl.knowledge.path_weights(model)
    ax = plot_manhattan(frame, model.layers[0], labels=2)
    points = ax.collections[0]
    np.testing.assert_array_equal(points.get_offsets()[:, 0], np.arange(5))
    np.testing.assert_allclose(points.get_offsets()[:, 1], np.abs(frame.sort_values("position").relevance))
    colours = [tuple(c) for c in points.get_facecolors()]
    # rs1, rs2 -> A; rs3, rs4 -> B (rs4 also feeds C); rs5 -> C: three runs, alternating shades
    assert colours[0] == colours[1] != colours[2] == colours[3] != colours[4] == colours[0]
    texts = [t.get_text() for t in ax.texts]
    top = frame.unit.iloc[0]
    assert len(texts) == 2 and texts[0].startswith(f"{top} (")
    assert len({text.split(" (")[1] for text in texts}) == 2  # one label per gene
    with pytest.raises(ValueError, match="columns unit, position"):
        plot_manhattan(pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="a row per plotted unit"):
        plot_manhattan(frame, sl.patterns.dense((2, 2)))
    assert plot_manhattan(frame).collections  # without groups


@pytest.mark.parametrize("kwargs, message", [
    ({"data": np.zeros((4, 6), "float32")}, r"`data` must have the model's 5 inputs.*Received: data with shape \(4, 6\)"),
    ({"data": np.zeros((4, 5), "float32"), "batch_size": 0}, r"`batch_size` must be >= 1. Received: batch_size=0"),
])
def test_gradient_x_input_checks_data_and_batch_size_first(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sl.knowledge.gradient_x_input(small_model(seed=0), **kwargs)
