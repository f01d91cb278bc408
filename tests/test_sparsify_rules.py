"""`sl.sparsify`'s distributions (ERK, global) and criteria (random, SNIP) against NumPy and GradientTape references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.allocation import erk_densities


def reference_erk(shapes, density, power):
    """The RigL code's loop (sparse_utils.get_sparsities, erdos_renyi_kernel), in float64."""
    dense_layers = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for i, (n_in, n_out) in enumerate(shapes):
            n_param = n_in * n_out
            if i in dense_layers:
                rhs -= n_param * (1 - density)
            else:
                rhs += n_param * density
                raw[i] = ((n_in + n_out) / (n_in * n_out)) ** power
                divisor += raw[i] * n_param
        if not raw:
            return [1.0] * len(shapes)
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps <= 1:
            return [1.0 if i in dense_layers else eps * raw[i] for i in range(len(shapes))]
        dense_layers |= {i for i, p in raw.items() if p == top}


def mlp(widths, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((widths[0],))] + [keras.layers.Dense(w, name=f"d{i}") for i, w in enumerate(widths[1:])])
    return model


def kernels(model):
    return [layer.kernel.numpy().astype(np.float64) for layer in model.layers]


def kept_masks(sparse):
    return [layer.to_dense() != 0 for layer in sparse.layers]


def top_k_mask(scores, k):
    flat = scores.ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(scores.shape)


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(2, 40), min_size=2, max_size=4),
    density=st.floats(0.02, 1.0),
    power=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_erk_densities_follow_the_rigl_rule(widths, density, power):
    shapes = list(zip(widths[:-1], widths[1:]))
    ours = erk_densities(shapes, density, power)
    np.testing.assert_allclose(ours, reference_erk(shapes, density, power), rtol=1e-12)
    assert np.all(ours <= 1 + 1e-12)
    sizes = np.array([a * b for a, b in shapes])
    np.testing.assert_allclose((ours * sizes).sum(), density * sizes.sum(), rtol=1e-9)


def test_erk_sparsify_keeps_each_layers_count_and_top_magnitudes():
    model = mlp([64, 48, 24, 10])
    sparse = sl.sparsify(model, density=0.1, distribution="erk", erk_power=1.0)
    expected = reference_erk([(64, 48), (48, 24), (24, 10)], 0.1, 1.0)
    for kernel, mask, d in zip(kernels(model), kept_masks(sparse), expected):
        assert mask.sum() == round(d * kernel.size)
        np.testing.assert_array_equal(mask, top_k_mask(np.abs(kernel), round(d * kernel.size)))
    x = np.random.default_rng(0).normal(size=(5, 64))
    h = x
    for kernel, mask, layer in zip(kernels(model), kept_masks(sparse), model.layers):
        h = h @ (kernel * mask) + layer.bias.numpy()
    np.testing.assert_allclose(sparse(x.astype("float32")).numpy(), h, atol=1e-4)


def test_global_keeps_one_threshold_across_layers():
    model = mlp([30, 20, 5], seed=1)
    model.layers[1].kernel.assign(model.layers[1].kernel * 3.0)  # a layer of larger weights takes more
    sparse = sl.sparsify(model, density=0.2, distribution="global")
    weights = kernels(model)
    total = sum(w.size for w in weights)
    threshold = np.sort(np.concatenate([np.abs(w).ravel() for w in weights]))[::-1][round(0.2 * total) - 1]
    for w, mask in zip(weights, kept_masks(sparse)):
        np.testing.assert_array_equal(mask, np.abs(w) >= threshold)
    counts = [m.sum() for m in kept_masks(sparse)]
    assert sum(counts) == round(0.2 * total)
    assert counts[1] / 100 > counts[0] / 600  # not uniform


def test_snip_matches_a_gradient_tape_reference():
    model = mlp([12, 8, 3], seed=2)
    model.compile(loss="mse")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 12)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")
    w0, w1 = (tf.constant(layer.kernel.numpy()) for layer in model.layers)
    with tf.GradientTape() as tape:
        tape.watch([w0, w1])
        h = x @ w0 + model.layers[0].bias.numpy()
        out = h @ w1 + model.layers[1].bias.numpy()
        loss = tf.reduce_mean(tf.square(out - y))
    grads = tape.gradient(loss, [w0, w1])
    scores = [np.abs(w * g.numpy().astype(np.float64)) for w, g in zip(kernels(model), grads)]
    sparse = sl.sparsify(model, density=0.3, criterion="snip", data=(x, y))
    for score, mask in zip(scores, kept_masks(sparse)):
        np.testing.assert_array_equal(mask, top_k_mask(score, round(0.3 * score.size)))
    # SNIP is global in its paper: one threshold on the scores.
    both = sl.sparsify(model, density=0.3, criterion="snip", data=(x, y), distribution="global")
    threshold = np.sort(np.concatenate([s.ravel() for s in scores]))[::-1][round(0.3 * 120) - 1]
    for score, mask in zip(scores, kept_masks(both)):
        np.testing.assert_array_equal(mask, score >= threshold)
    # Within a SparseDense, SNIP scores only the current entries.
    both.compile(loss="mse")
    again = sl.sparsify(both, density=0.1, criterion="snip", data=(x, y))
    for before, after in zip(kept_masks(both), kept_masks(again)):
        assert not (after & ~before).any()


def test_random_is_seeded_keeps_sizes_and_values():
    model = mlp([20, 10, 4], seed=4)
    a = sl.sparsify(model, density=0.25, criterion="random", seed=7)
    b = sl.sparsify(model, density=0.25, criterion="random", seed=7)
    c = sl.sparsify(model, density=0.25, criterion="random", seed=8)
    for w, la, lb, lc in zip(kernels(model), a.layers, b.layers, c.layers):
        assert la.pattern == lb.pattern and la.pattern != lc.pattern
        assert la.pattern.nnz == round(0.25 * w.size)
        dense = la.to_dense()
        np.testing.assert_array_equal(dense[dense != 0], w[dense != 0].astype("float32"))
    # Not magnitude: random keeps some entries smaller than some it drops.
    w, mask = kernels(model)[0], kept_masks(a)[0]
    assert np.abs(w[mask]).min() < np.abs(w[~mask]).max()


def test_unit_names_are_kept():
    pattern = sl.SparsityPattern.from_edges(
        ["rs1", "rs2", "rs3", "rs1"], ["a", "a", "b", "b"], inputs=["rs1", "rs2", "rs3"], outputs=["a", "b"]
    )
    model = keras.Sequential([keras.Input((3,)), sl.SparseDense(pattern, name="named")])
    for kwargs in [{}, {"distribution": "erk"}, {"distribution": "global"}, {"criterion": "random", "seed": 0}]:
        layer = sl.sparsify(model, density=0.5, **kwargs).get_layer("named")
        assert layer.pattern.input_names == ("rs1", "rs2", "rs3")
        assert layer.pattern.output_names == ("a", "b")


def test_erk_gives_a_small_sparse_dense_no_new_connections():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(40, name="big"),
                              sl.SparseDense(sl.patterns.random((40, 2), density=0.25, seed=0), name="small")])
    sparse = sl.sparsify(model, density=0.3, distribution="erk")
    old = model.get_layer("small").to_dense() != 0
    new = sparse.get_layer("small").to_dense() != 0
    assert not (new & ~old).any() and new.sum() == old.sum()  # ERK asks for more: keeps them all


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"distribution": "erdos"}, ValueError, r"`distribution` must be one of \['uniform', 'erk', 'global'\]. Received: distribution='erdos'"),
        ({"distribution": None}, ValueError, "`distribution` must be one of"),
        ({"erk_power": 0}, ValueError, "`erk_power` must be a finite number > 0. Received: erk_power=0"),
        ({"erk_power": -1.0}, ValueError, "`erk_power` must be a finite number > 0"),
        ({"erk_power": float("inf")}, ValueError, "`erk_power` must be a finite number > 0"),
        ({"erk_power": "1"}, TypeError, "`erk_power` must be a number > 0. Received: erk_power='1'"),
        ({"criterion": "l1"}, ValueError, r"`criterion` must be one of \['magnitude', 'random', 'snip'\]. Received: criterion='l1'"),
        ({"criterion": "snip"}, ValueError, "pass `data=\\(x, y\\)`. Received: data=None"),
        ({"criterion": "snip", "data": (np.ones((2, 6)), np.ones((2, 3)))}, ValueError, "call `model.compile\\(loss=...\\)` first"),
        ({"block": (2, 2), "distribution": "global"}, ValueError, "`block` keeps tiles per layer"),
        ({"seed": -1, "criterion": "random"}, ValueError, "`seed` must be >= 0"),
        ({"seed": 1.5, "criterion": "random"}, TypeError, "`seed` must be an integer"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, text):
    model = mlp([6, 3])
    with pytest.raises(error, match=text):
        sl.sparsify(model, density=0.5, **kwargs)


def test_layers_and_block_are_keyword_only():
    with pytest.raises(TypeError):
        sl.sparsify(mlp([6, 3]), 0.5, None)
