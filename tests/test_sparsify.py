"""`sl.sparsify` against an independent NumPy top-k reference (float64)."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from tests.strategies import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

densities = st.floats(min_value=0.01, max_value=1.0)


# The reference ------------------------------------------------------------


def reference_keep(weights, candidates, density):
    """Mask of the kept entries, by counting: an entry is kept iff fewer than
    ``k`` candidates beat it, where ``a`` beats ``b`` when ``|a| > |b|``, or
    ``|a| == |b|`` and ``a`` comes first in row-major order."""
    w = np.abs(np.asarray(weights, np.float64)).ravel()
    cand = np.asarray(candidates, bool).ravel()
    k = round(density * w.size)
    keep = np.zeros(w.size, bool)
    positions = np.flatnonzero(cand)
    for i in positions:
        beaten_by = sum(1 for j in positions if w[j] > w[i] or (w[j] == w[i] and j < i))
        keep[i] = beaten_by < k
    return keep.reshape(np.shape(weights))


def reference_keep_tiles(weights, candidates, density, block):
    """Mask of the kept entries with whole tiles, tile by tile in Python."""
    w = np.asarray(weights, np.float64)
    cand = np.asarray(candidates, bool)
    (n, m), (r, c) = w.shape, block
    k = round(density * n * m)
    tiles = []
    for ti, i in enumerate(range(0, n, r)):
        for tj, j in enumerate(range(0, m, c)):
            inside = np.zeros_like(cand)
            inside[i : i + r, j : j + c] = True
            inside &= cand
            if inside.any():
                tiles.append((-np.linalg.norm(w[inside]), ti, tj, inside))
    keep = np.zeros_like(cand)
    for _, _, _, inside in sorted(tiles, key=lambda t: t[:3]):
        if keep.sum() >= k:
            break
        keep |= inside
    return keep


def forward64(x, layers):
    """Float64 forward pass through ``[(kernel, bias, activation), ...]``."""
    h = np.asarray(x, np.float64)
    for kernel, bias, activation in layers:
        h = h @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
        if activation == "relu":
            h = np.maximum(h, 0)
    return h


# Helpers ------------------------------------------------------------------


def weights_for(shape, seed, ties):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct magnitudes, both signs: many exact ties
        return (rng.integers(-2, 3, size=shape) * 0.5).astype("float32")
    return rng.normal(size=shape).astype("float32")


def one_dense(shape, seed=0, ties=False, **kwargs):
    model = keras.Sequential([keras.Input((shape[0],)), keras.layers.Dense(shape[1], name="d", **kwargs)])
    layer = model.get_layer("d")
    layer.kernel.assign(weights_for(shape, seed, ties))
    if layer.use_bias:
        layer.bias.assign(np.random.default_rng(seed + 1).normal(size=shape[1]).astype("float32"))
    return model


def as_numpy(model, x):
    return np.asarray(model(np.asarray(x, "float32")), np.float64)


# Properties of the top-k choice ---------------------------------------------


@given(shape=shapes(12), density=densities, seed=st.integers(0, 2**16), ties=st.booleans())
def test_dense_layer_keeps_the_reference_top_k(shape, density, seed, ties):
    model = one_dense(shape, seed, ties)
    kernel = model.get_layer("d").kernel.numpy()
    bias = model.get_layer("d").bias.numpy()
    sparse = sl.sparsify(model, density=density)
    layer = sparse.get_layer("d")
    keep = reference_keep(kernel, np.ones(shape, bool), density)
    assert isinstance(layer, sl.SparseDense)
    assert layer.pattern.nnz == round(density * shape[0] * shape[1])
    np.testing.assert_array_equal(layer.pattern.to_dense() != 0, keep)
    np.testing.assert_array_equal(layer.to_dense(), np.where(keep, kernel, 0))
    x = np.random.default_rng(seed).normal(size=(3, shape[0]))
    expected = forward64(x, [(np.where(keep, kernel, 0), bias, None)])
    np.testing.assert_allclose(as_numpy(sparse, x), expected, rtol=1e-5, atol=1e-5)


@given(
    shape=shapes(20),
    density=densities,
    block=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_block_keeps_the_reference_tiles(shape, density, block, seed, ties):
    model = one_dense(shape, seed, ties)
    kernel = model.get_layer("d").kernel.numpy()
    layer = sl.sparsify(model, density=density, block=block).get_layer("d")
    keep = reference_keep_tiles(kernel, np.ones(shape, bool), density, block)
    kept = layer.pattern.to_dense() != 0
    np.testing.assert_array_equal(kept, keep)
    np.testing.assert_array_equal(layer.to_dense(), np.where(keep, kernel, 0))
    r, c = block
    for i in range(0, shape[0], r):  # whole tiles only, edge tiles partial
        for j in range(0, shape[1], c):
            assert kept[i : i + r, j : j + c].all() or not kept[i : i + r, j : j + c].any()
    assert layer.pattern.nnz >= round(density * kernel.size)


@given(
    shape=shapes(12),
    first=densities,
    shrink=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
    block=st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))),
)
def test_sparsifying_again_shrinks_within_the_pattern(shape, first, shrink, seed, ties, block):
    model = one_dense(shape, seed, ties)
    once = sl.sparsify(model, density=first)
    before = once.get_layer("d")
    current = before.to_dense()
    twice = sl.sparsify(once, density=first * shrink, block=block).get_layer("d")
    if block is None:
        keep = reference_keep(current, before.pattern.to_dense() != 0, first * shrink)
    else:
        keep = reference_keep_tiles(current, before.pattern.to_dense() != 0, first * shrink, block)
    np.testing.assert_array_equal(twice.pattern.to_dense() != 0, keep)
    assert (twice.pattern & before.pattern) == twice.pattern  # a subset
    np.testing.assert_array_equal(twice.to_dense(), np.where(keep, current, 0))


def test_ties_go_to_the_earlier_position_in_row_major_order():
    model = one_dense((3, 4), use_bias=False)
    model.get_layer("d").kernel.assign(np.array([[1, -2, 1, 1], [-1, 1, 2, 1], [1, 1, 1, -1]], "float32"))
    kept = sl.sparsify(model, density=0.5).get_layer("d").pattern.to_dense()
    # The two 2s, then the first four 1s in row-major order.
    np.testing.assert_array_equal(kept, [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])


def test_tied_tiles_go_to_the_earlier_tile_in_row_major_order():
    model = one_dense((5, 5), use_bias=False)
    model.get_layer("d").kernel.assign(np.ones((5, 5), "float32"))
    kept = sl.sparsify(model, density=0.5, block=(2, 2)).get_layer("d").pattern.to_dense()
    # k = round(12.5) = 12: three full 2x2 tiles (norm 2) beat the partial
    # edge tiles (norm sqrt(2) or 1); of the four full tiles, the first three.
    expected = np.zeros((5, 5))
    expected[:2, :4] = 1
    expected[2:4, :2] = 1
    np.testing.assert_array_equal(kept, expected)


def test_a_higher_density_never_adds_connections():
    once = sl.sparsify(one_dense((8, 6)), density=0.25)
    again = sl.sparsify(once, density=0.75)
    assert again.get_layer("d").pattern == once.get_layer("d").pattern


def test_block_result_keeps_tiles_and_the_kernel_follows_density():
    model = one_dense((72, 40))  # 16 divides neither side
    for block in [(16, 16), (8, 8)]:
        layer = sl.sparsify(model, density=0.25, block=block).get_layer("d")
        assert layer.pattern.structure.startswith("block")
    big = one_dense((512, 256))
    for block in [(16, 16), (32, 32)]:
        layer = sl.sparsify(big, density=0.04, block=block).get_layer("d")
        assert layer.kernel_name == "block", block
        # Past the dense threshold, tiles scattered over shared rows train
        # faster densified (measured in docs/finding-a-pattern.md).
        layer = sl.sparsify(big, density=0.25, block=block).get_layer("d")
        assert layer.kernel_name == "dense", block


# Models of every shape ------------------------------------------------------


def test_functional_model_with_branches_and_a_nested_model():
    rng = np.random.default_rng(0)
    inputs = keras.Input((6,))
    nested = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu", name="inner")], name="nested")
    left = keras.layers.Dense(4, activation="relu", name="left")(inputs)
    right = nested(inputs)
    merged = keras.layers.Concatenate(name="merge")([left, right])
    outputs = keras.layers.Dense(3, name="head")(merged)
    model = keras.Model(inputs, outputs, name="branches")
    for layer in (model.get_layer("left"), nested.get_layer("inner"), model.get_layer("head")):
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))

    sparse = sl.sparsify(model, density=0.4)

    assert [layer.name for layer in sparse.layers] == [layer.name for layer in model.layers]
    assert sparse.name == "branches"
    masked = {}
    for name, source in [("left", model), ("inner", nested), ("head", model)]:
        kernel = source.get_layer(name).kernel.numpy()
        masked[name] = np.where(reference_keep(kernel, np.ones(kernel.shape, bool), 0.4), kernel, 0)
    sparse_nested = sparse.get_layer("nested")
    assert isinstance(sparse_nested.get_layer("inner"), sl.SparseDense)
    np.testing.assert_array_equal(sparse_nested.get_layer("inner").to_dense(), masked["inner"])
    x = rng.normal(size=(7, 6))
    bias = {name: (model if name != "inner" else nested).get_layer(name).bias.numpy() for name in masked}
    h_left = forward64(x, [(masked["left"], bias["left"], "relu")])
    h_right = forward64(x, [(masked["inner"], bias["inner"], "relu")])
    expected = forward64(np.concatenate([h_left, h_right], axis=1), [(masked["head"], bias["head"], None)])
    np.testing.assert_allclose(as_numpy(sparse, x), expected, rtol=1e-5, atol=1e-5)


def test_named_inputs_and_a_shared_layer_survive():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    shared = keras.layers.Dense(3, name="shared")
    model = keras.Model({"a": a, "b": b}, keras.layers.Add(name="add")([shared(a), shared(b)]))
    sparse = sl.sparsify(model, density=0.5)
    assert sorted(layer.name for layer in sparse.layers if isinstance(layer, keras.layers.InputLayer)) == ["a", "b"]
    layer = sparse.get_layer("shared")
    assert len(layer._inbound_nodes) == 2  # still one layer used twice
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("shared").get_weights())
    masked = np.where(reference_keep(kernel, np.ones(kernel.shape, bool), 0.5), kernel, 0)
    rng = np.random.default_rng(6)
    xa, xb = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    got = np.asarray(sparse({"a": xa.astype("float32"), "b": xb.astype("float32")}), np.float64)
    np.testing.assert_allclose(got, xa @ masked + xb @ masked + 2 * bias, rtol=1e-5, atol=1e-5)


def test_layers_by_name_prune_only_those_and_copy_the_rest():
    rng = np.random.default_rng(1)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(8, activation="relu", name="first"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(4, name="second"),
        ]
    )
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    sparse = sl.sparsify(model, density=0.3, layers=["second"])
    assert isinstance(sparse.get_layer("first"), keras.layers.Dense)
    assert isinstance(sparse.get_layer("second"), sl.SparseDense)
    for name in ["first", "norm"]:
        for new, old in zip(sparse.get_layer(name).get_weights(), model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(new, old)
    kernel = model.get_layer("second").kernel.numpy()
    keep = reference_keep(kernel, np.ones(kernel.shape, bool), 0.3)
    np.testing.assert_array_equal(sparse.get_layer("second").to_dense(), np.where(keep, kernel, 0))
    x = rng.normal(size=(5, 10))
    first = model.get_layer("first")
    h = forward64(x, [(first.kernel.numpy(), first.bias.numpy(), "relu")])
    gamma, beta = (w.astype(np.float64) for w in model.get_layer("norm").get_weights())
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-3) * gamma + beta
    expected = forward64(h, [(np.where(keep, kernel, 0), model.get_layer("second").bias.numpy(), None)])
    np.testing.assert_allclose(as_numpy(sparse, x), expected, rtol=1e-4, atol=1e-4)


def test_a_towers_layer_whose_patterns_moved_is_copied_with_its_patterns():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d"), sl.Towers(2, hidden_units=[3])])
    towers = model.layers[-1]
    moved = [sub for sub in towers._flatten_layers(recursive=True) if isinstance(sub, sl.SparseDense)][1]
    old = moved.pattern  # as RigL would: same nnz, other connections
    moved.set_pattern(sl.SparsityPattern.from_dense(np.flip(old.to_dense(), axis=1)))
    assert moved.pattern != old
    sparse = sl.sparsify(model, density=0.5, layers=["d"])
    kernel = model.get_layer("d").kernel.numpy()
    masked = np.where(reference_keep(kernel, np.ones(kernel.shape, bool), 0.5), kernel, 0)
    x = np.random.default_rng(7).normal(size=(4, 6))
    hidden = forward64(x, [(masked, model.get_layer("d").bias.numpy(), None)])
    np.testing.assert_allclose(as_numpy(sparse, x), as_numpy(towers, hidden), rtol=1e-5, atol=1e-5)


def test_dense_on_3d_inputs_has_a_2d_kernel_and_is_pruned():
    model = keras.Sequential([keras.Input((5, 6)), keras.layers.Dense(4, name="d")])
    kernel = model.get_layer("d").kernel.numpy()
    bias = model.get_layer("d").bias.numpy()
    sparse = sl.sparsify(model, density=0.5)
    keep = reference_keep(kernel, np.ones(kernel.shape, bool), 0.5)
    x = np.random.default_rng(2).normal(size=(2, 5, 6))
    np.testing.assert_allclose(as_numpy(sparse, x), forward64(x, [(np.where(keep, kernel, 0), bias, None)]),
                               rtol=1e-5, atol=1e-5)


def test_sequential_built_by_a_call_without_an_input():
    model = keras.Sequential([keras.layers.Dense(4, name="d")])
    x = np.random.default_rng(3).normal(size=(2, 7)).astype("float32")
    model(x)
    sparse = sl.sparsify(model, density=0.5)
    kernel = model.get_layer("d").kernel.numpy()
    keep = reference_keep(kernel, np.ones(kernel.shape, bool), 0.5)
    expected = forward64(x, [(np.where(keep, kernel, 0), model.get_layer("d").bias.numpy(), None)])
    np.testing.assert_allclose(as_numpy(sparse, x), expected, rtol=1e-5, atol=1e-5)


def test_original_model_is_untouched_and_independent():
    model = one_dense((6, 5), activation="relu")
    before = [w.copy() for w in model.get_weights()]
    sparse = sl.sparsify(model, density=0.2)
    sparse.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = np.random.default_rng(4).normal(size=(16, 6)).astype("float32")
    sparse.fit(x, np.ones((16, 5), "float32"), epochs=2, verbose=0)
    assert isinstance(model.get_layer("d"), keras.layers.Dense)
    for now, then in zip(model.get_weights(), before):
        np.testing.assert_array_equal(now, then)
    assert not np.array_equal(sparse.get_layer("d").bias.numpy(), before[1])


def test_layer_settings_carry_over():
    model = one_dense(
        (6, 4),
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.1),
        kernel_constraint=keras.constraints.MaxNorm(2.0),
        bias_regularizer=keras.regularizers.L1(0.2),
    )
    layer = sl.sparsify(model, density=0.5).get_layer("d")
    assert layer.activation is keras.activations.tanh
    assert isinstance(layer.values_regularizer, keras.regularizers.L2)
    assert layer.values_constraint is None  # MaxNorm needs the 2-D kernel
    assert isinstance(layer.bias_regularizer, keras.regularizers.L1)
    values = layer.values.numpy().astype(np.float64)
    np.testing.assert_allclose(float(layer.values_regularizer(layer.values)), 0.1 * np.sum(values**2), rtol=1e-5)
    no_bias = sl.sparsify(one_dense((6, 4), use_bias=False), density=0.5).get_layer("d")
    assert no_bias.bias is None


def test_sparse_dense_keeps_its_kernel_argument_when_it_fits():
    pattern = sl.patterns.banded((12, 12), lower=2, upper=2)
    for forced, expected in [("csr", "csr"), ("banded", "auto")]:
        model = keras.Sequential([keras.Input((12,)), sl.SparseDense(pattern, kernel=forced, name="s")])
        layer = sl.sparsify(model, density=0.2).get_layer("s")
        assert layer.get_config()["kernel"] == expected


def test_the_result_saves_and_loads(tmp_path):
    model = one_dense((8, 6))
    sparse = sl.sparsify(model, density=0.3, block=(2, 2))
    path = str(tmp_path / "sparse.keras")
    sparse.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(5).normal(size=(3, 8))
    np.testing.assert_array_equal(as_numpy(loaded, x), as_numpy(sparse, x))
    assert loaded.get_layer("d").pattern == sparse.get_layer("d").pattern


# Bad input ----------------------------------------------------------------


class RankThreeKernelDense(keras.layers.Dense):
    def build(self, input_shape):
        super().build(input_shape)
        self._kernel = self.add_weight(name="kernel3", shape=(input_shape[-1], self.units, 2))


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_density_outside_the_interval_is_refused(density):
    with pytest.raises(ValueError, match=r"`density` must be a number in \(0, 1\]. Received: density="):
        sl.sparsify(one_dense((4, 4)), density=density)


@pytest.mark.parametrize("block", [(0, 4), (4,), (2.5, 2), "ab", (True, 2), (2, -1), 4, (1, 2, 3)])
def test_block_must_be_two_positive_ints(block):
    with pytest.raises(ValueError, match="`block` must be a pair of positive integers"):
        sl.sparsify(one_dense((4, 4)), density=0.5, block=block)


def test_bad_layer_names_are_refused():
    inputs = keras.Input((6,))
    hidden = keras.layers.EinsumDense("ab,bc->ac", output_shape=3, name="einsum")(inputs)
    hidden = keras.layers.Dropout(0.1, name="drop")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(hidden))
    with pytest.raises(ValueError, match=r"`layers` names layers that are not in the model: \['nope'\]"):
        sl.sparsify(model, density=0.5, layers=["d", "nope"])
    supported = ", ".join(["Conv1D", "Conv2D", "Dense", "EinsumDense", "Embedding", "MultiHeadAttention",
                           "SeparableConv1D", "SeparableConv2D"])
    with pytest.raises(ValueError, match=rf"`layers` must name layers that sparsify converts \({supported} and the sparse layers\); 'drop'"):
        sl.sparsify(model, density=0.5, layers=["drop"])
    with pytest.raises(TypeError, match="`layers` must be a list of layer names"):
        sl.sparsify(model, density=0.5, layers=[1])
    assert type(sl.sparsify(model, density=0.5).get_layer("einsum")) is sl.SparseEinsumDense


def test_a_dense_kernel_of_rank_three_is_refused():
    model = keras.Sequential([keras.Input((4,)), RankThreeKernelDense(3, name="odd")])
    with pytest.raises(ValueError, match="`layers` selects RankThreeKernelDense 'odd', which cannot become sparse: its kernel has rank 3"):
        sl.sparsify(model, density=0.5)


def test_models_that_cannot_be_rebuilt_are_refused():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(TypeError, match="`model` must be a Sequential or Functional Keras model"):
        sl.sparsify(Subclassed(), density=0.5)
    with pytest.raises(TypeError, match="`model` must be a Sequential or Functional"):
        sl.sparsify(keras.layers.Dense(2), density=0.5)
    with pytest.raises(ValueError, match="`model` must be built"):
        sl.sparsify(keras.Sequential([keras.layers.Dense(2)]), density=0.5)


# The benchmark --------------------------------------------------------------


def test_pruning_benchmark_quick_mode_writes_table_and_plot(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "pruning.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "pruning.md").read_text()
    for method in ["dense", "static random", "one-shot sparsify", "gradual sparsify"]:
        assert f"| {method} |" in table
    assert (tmp_path / "pruning.png").stat().st_size > 0


def _functional_model():
    """Operators, keras.ops calls, a shared layer and a nested model: any Functional graph."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="x")
    shared = keras.layers.Dense(8, name="shared")
    h = keras.layers.Dense(8, name="d1")(inputs)
    h = keras.ops.relu(h) + inputs
    h = shared(shared(h))
    inner_inputs = keras.Input((8,))
    inner = keras.Model(inner_inputs, keras.layers.Dense(4, name="inner_d")(inner_inputs) * 2.0, name="inner")
    return keras.Model(inputs, keras.ops.tanh(inner(h)))


def _numpy_functional(kernels, biases, x):
    x = np.asarray(x, np.float64)
    h = np.maximum(x @ kernels["d1"] + biases["d1"], 0.0) + x
    for _ in range(2):
        h = h @ kernels["shared"] + biases["shared"]
    return np.tanh(2.0 * (h @ kernels["inner_d"] + biases["inner_d"]))


def test_any_functional_graph_goes_through_sparsify_and_strip_pruning():
    model = _functional_model()
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    full = sl.sparsify(model, density=1.0)
    np.testing.assert_array_equal(full(x), model(x))
    pruned = sl.sparsify(model, density=0.5)
    names = ("d1", "shared", "inner_d")
    layers = {layer.name: layer for layer in sl.sparse_layers(pruned)}
    assert sorted(layers) == sorted(names)
    kernels = {name: layers[name].to_dense().astype(np.float64) for name in names}
    biases = {name: layers[name].bias.numpy() for name in names}
    for name in names:
        dense = next(layer for layer in model._flatten_layers() if layer.name == name).kernel.numpy()
        kept = kernels[name] != 0
        assert kept.sum() == round(0.5 * dense.size)
        np.testing.assert_array_equal(kernels[name][kept], dense[kept])
    np.testing.assert_allclose(pruned(x), _numpy_functional(kernels, biases, x), rtol=1e-5, atol=1e-5)
    layers["d1"].values.assign(np.where(np.arange(layers["d1"].pattern.nnz) % 2, layers["d1"].values.numpy(), 0.0))
    stripped = sl.strip_pruning(pruned)
    assert stripped.get_layer("d1").pattern.nnz == layers["d1"].pattern.nnz // 2
    np.testing.assert_array_equal(stripped(x), pruned(x))
