"""Relevance through BatchNormalization and branching models, against NumPy float64."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparselayers as sl

SNP_GENE_A = (["rs1", "rs2", "rs3"], ["A1", "A1", "A2"])
SNP_GENE_B = (["rs1", "rs2", "rs3"], ["B1", "B2", "B2"])


def _randomise(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for weight in layer.weights:
            if "variance" in weight.path:
                weight.assign(rng.uniform(0.5, 2.0, weight.shape).astype(weight.dtype))
            else:
                weight.assign(rng.normal(size=weight.shape).astype(weight.dtype))


def _dense(layer):
    if isinstance(layer, sl.SparseDense):
        return layer.to_scipy().toarray().astype(np.float64)
    return np.asarray(layer.kernel, dtype=np.float64)


def _bn_scale(layer):
    return np.asarray(layer.gamma, np.float64) / np.sqrt(np.asarray(layer.moving_variance, np.float64) + layer.epsilon)


def _branching(merge):
    x = keras.Input((3,), name="snps")
    a, b = (sl.SparseDense(sl.SparsityPattern.from_edges(*t), activation="tanh", name=n)
            for t, n in ((SNP_GENE_A, "genes_a"), (SNP_GENE_B, "genes_b")))
    joined = merge()([a(x), b(x)])
    model = keras.Model(x, keras.layers.Dense(3, name="out")(joined))
    _randomise(model, 1)
    return model, a, b


@pytest.mark.parametrize("merge", [keras.layers.Add, keras.layers.Subtract, keras.layers.Average])
def test_path_weights_sum_over_merged_branches(merge):
    model, a, b = _branching(merge)
    out = _dense(model.get_layer("out"))
    sign = {keras.layers.Add: (1, 1), keras.layers.Subtract: (1, -1), keras.layers.Average: (0.5, 0.5)}[merge]
    expected = sign[0] * _dense(a) @ out + sign[1] * _dense(b) @ out
    for output in range(3):
        got = sl.knowledge.path_weights(model, output=output).sort_values("position")
        np.testing.assert_allclose(got["relevance"], expected[:, output], rtol=1e-6, atol=1e-7)
        assert list(got["unit"]) == ["rs1", "rs2", "rs3"]


def test_path_weights_through_concatenate_and_a_covariate_input():
    genotype = keras.Input((3,), name="snps")
    covariates = keras.Input((2,), name="covariates")
    genes = sl.SparseDense(sl.SparsityPattern.from_edges(*SNP_GENE_A), name="genes")
    norm = keras.layers.BatchNormalization(name="bn")
    joined = keras.layers.Concatenate()([norm(genes(genotype)), keras.layers.LayerNormalization()(covariates)])
    model = keras.Model([genotype, covariates], keras.layers.Dense(1, name="out")(joined))
    _randomise(model, 2)
    out = _dense(model.get_layer("out"))
    expected = _dense(genes) @ (_bn_scale(norm)[:, None] * out[:2])
    got = sl.knowledge.path_weights(model).sort_values("position")
    np.testing.assert_allclose(got["relevance"], expected[:, 0], rtol=1e-6, atol=1e-7)
    genes_level = sl.knowledge.path_weights(model, level="genes").sort_values("position")
    np.testing.assert_allclose(genes_level["relevance"], _bn_scale(norm) * out[:2, 0], rtol=1e-6)
    assert list(genes_level["unit"]) == ["A1", "A2"]
    # the LayerNormalization on the covariate branch blocks only relevance that passes through it
    with pytest.raises(TypeError, match="layer 'layer_normalization.*' of type LayerNormalization"):
        sl.knowledge.path_weights(model, level="covariates")


def test_batch_norm_is_folded_in_a_gennet_chain():
    layers = sl.knowledge.chain([SNP_GENE_A, (["A1", "A2"], ["P"] * 2)], activation="tanh")
    norms = [keras.layers.BatchNormalization(), keras.layers.BatchNormalization()]
    model = keras.Sequential([keras.Input((3,)), layers[0], norms[0], layers[1], norms[1], keras.layers.Dense(1)])
    _randomise(model, 3)
    expected = (
        _dense(layers[0]) @ np.diag(_bn_scale(norms[0])) @ _dense(layers[1]) @ np.diag(_bn_scale(norms[1]))
        @ _dense(model.layers[-1])
    )
    got = sl.knowledge.path_weights(model).sort_values("position")
    np.testing.assert_allclose(got["relevance"], expected[:, 0], rtol=1e-6)


@pytest.mark.parametrize("level", ["snps", "genes_a"])
def test_gradient_x_input_on_a_branching_model_matches_autodiff(level):
    model, a, b = _branching(keras.layers.Add)
    x = np.random.default_rng(4).normal(size=(7, 3)).astype("float32")
    got = sl.knowledge.gradient_x_input(model, x, level=level, output=1, absolute=False).sort_values("position")
    # independent reference: float64 NumPy forward of the same weights, gradient by central differences
    wa, wb, wo = _dense(a), _dense(b), _dense(model.get_layer("out"))
    ba, bb = (np.asarray(layer.bias, np.float64) for layer in (a, b))
    bo = np.asarray(model.get_layer("out").bias, np.float64)
    x64 = x.astype(np.float64)
    if level == "snps":
        f = lambda h: (np.tanh(h @ wa + ba) + np.tanh(h @ wb + bb)) @ wo[:, 1] + bo[1]  # noqa: E731
        h0 = x64
    else:
        other = np.tanh(x64 @ wb + bb)
        f = lambda h: (h + other) @ wo[:, 1] + bo[1]  # noqa: E731
        h0 = np.tanh(x64 @ wa + ba)
    eps = 1e-6
    grad = np.stack(
        [(f(h0 + eps * np.eye(h0.shape[1])[i]) - f(h0 - eps * np.eye(h0.shape[1])[i])) / (2 * eps) for i in range(h0.shape[1])],
        axis=1,
    )
    np.testing.assert_allclose(got["relevance"], (h0 * grad).mean(axis=0), rtol=1e-4, atol=1e-5)


def test_gradient_x_input_with_batch_norm_and_two_inputs():
    genotype = keras.Input((3,), name="snps")
    covariates = keras.Input((2,), name="covariates")
    genes = sl.SparseDense(sl.SparsityPattern.from_edges(*SNP_GENE_A), activation="relu", name="genes")
    norm = keras.layers.BatchNormalization()
    joined = keras.layers.Concatenate()([norm(genes(genotype)), covariates])
    model = keras.Model([genotype, covariates], keras.layers.Dense(1, name="out")(joined))
    _randomise(model, 5)
    rng = np.random.default_rng(6)
    x, c = rng.normal(size=(9, 3)).astype("float32"), rng.normal(size=(9, 2)).astype("float32")
    got = sl.knowledge.gradient_x_input(model, [x, c], batch_size=4, absolute=False).sort_values("position")
    wg, bg = _dense(genes), np.asarray(genes.bias, np.float64)
    scale = _bn_scale(norm)
    z = x.astype(np.float64) @ wg + bg
    d_h = ((z > 0) * (scale * _dense(model.get_layer("out"))[:2, 0])) @ wg.T  # relu' then the BN scale
    np.testing.assert_allclose(got["relevance"], (x * d_h).mean(axis=0), rtol=1e-4, atol=1e-6)
    dataset = tf.data.Dataset.from_tensor_slices(((x, c), np.zeros(9))).batch(4)
    from_dataset = sl.knowledge.gradient_x_input(model, dataset, absolute=False).sort_values("position")
    np.testing.assert_allclose(from_dataset["relevance"], got["relevance"], rtol=1e-5)


def test_unreadable_layers_are_named():
    x = keras.Input((3,))
    genes = sl.SparseDense(sl.SparsityPattern.from_edges(*SNP_GENE_A), name="genes")(x)
    model = keras.Model(x, keras.layers.Dense(1)(keras.layers.Multiply(name="gate")([genes, genes])))
    with pytest.raises(TypeError, match="layer 'gate' of type Multiply"):
        sl.knowledge.path_weights(model)
    with pytest.raises(ValueError, match="`level` must name a layer or an input"):
        sl.knowledge.path_weights(model, level="nope")


def test_input_names_are_read_through_weightless_layers():
    genes = sl.SparseDense(sl.SparsityPattern.from_edges(*SNP_GENE_A), name="genes")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5), genes, keras.layers.Dense(1)])
    _randomise(model, 7)
    got = sl.knowledge.path_weights(model).sort_values("position")
    assert list(got["unit"]) == ["rs1", "rs2", "rs3"]
    np.testing.assert_allclose(got["relevance"], (_dense(genes) @ _dense(model.layers[-1]))[:, 0], rtol=1e-6)


def test_numbered_levels_need_a_chain():
    model, _, _ = _branching(keras.layers.Add)
    with pytest.raises(ValueError, match="not one chain \\(layer 'genes_.' is on another branch\\)"):
        sl.knowledge.path_weights(model, level=1)
    with pytest.raises(ValueError, match="not one chain"):
        sl.knowledge.gradient_x_input(model, np.ones((2, 3), "float32"), level=1)
    assert len(sl.knowledge.path_weights(model, level="genes_b")) == 2
