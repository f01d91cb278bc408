"""The pattern as layer state: `set_pattern` and the pattern in weights files."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers import pattern_state
from tests import reference
from tests.strategies import any_patterns, inputs_for, values_for


def same_nnz_pattern(pattern, seed):
    """Another pattern of ``pattern``'s shape and nnz, drawn independently."""
    n, m = pattern.shape
    linear = np.sort(np.random.default_rng(seed).choice(n * m, pattern.nnz, replace=False))
    return sl.SparsityPattern.from_coo(linear // m, linear % m, shape=(n, m))


@settings(max_examples=15)
@given(pattern=any_patterns, seed=st.integers(0, 2**16),
       kernel=st.sampled_from(["auto", "csr", "dense", "gather", "sparse_dense_matmul"]))
def test_set_pattern_then_weights_file_round_trip_match_the_reference(tmp_path_factory, pattern, seed, kernel):
    new = same_nnz_pattern(pattern, seed)
    values = values_for(new, seed)
    layer = sl.SparseDense(pattern, kernel=kernel)
    layer.build((None, pattern.shape[0]))
    layer.set_pattern(new, values=values)
    x = inputs_for(pattern, 4)
    want = reference.forward(x, new, values, layer.bias.numpy())
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-5)

    path = str(tmp_path_factory.mktemp("w") / "m.weights.h5")
    keras.Sequential([keras.Input(pattern.shape[:1]), layer]).save_weights(path)
    fresh = sl.SparseDense(pattern, kernel=kernel)
    model = keras.Sequential([keras.Input(pattern.shape[:1]), fresh])
    model.load_weights(path)
    assert fresh.pattern == new
    np.testing.assert_allclose(fresh(x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_set_pattern_keeps_the_variables_and_the_parameter_count():
    layer = sl.SparseDense(sl.patterns.random((20, 10), density=0.3, seed=0))
    layer.build((None, 20))
    values, count = layer.values, layer.count_params()
    layer.set_pattern(same_nnz_pattern(layer.pattern, 1))
    assert layer.values is values and layer.count_params() == count == layer.pattern.nnz + 10
    assert [w.name for w in layer.trainable_weights] == ["values", "bias"]


def test_a_forced_kernel_that_no_longer_fits_falls_back_to_auto(tmp_path):
    layer = sl.SparseDense(sl.patterns.banded((16, 16), lower=2, upper=2), kernel="banded")
    model = keras.Sequential([keras.Input((16,)), layer])
    layer.set_pattern(same_nnz_pattern(layer.pattern, 0))
    assert layer.kernel_name == sl.ops.check_kernel_name("auto", layer.pattern)
    assert layer.get_config()["kernel"] == "auto"  # the config must rebuild the new pattern
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.layers[0].pattern == layer.pattern


def test_loading_refuses_unit_names_in_another_order(tmp_path):
    # The reproducer: the file's layer read its data as rs1, rs2, rs3; this one reads rs3, rs2, rs1.
    edges = (["rs1", "rs2", "rs3"], ["A", "A", "B"])
    saved = sl.SparsityPattern.from_edges(*edges, inputs=["rs1", "rs2", "rs3"], outputs=["A", "B"])
    source = keras.Sequential([keras.Input((3,)), sl.SparseDense(saved, name="s")])
    source.save_weights(tmp_path / "m.weights.h5")
    layer = sl.SparseDense(sl.SparsityPattern.from_edges(*edges, inputs=["rs3", "rs2", "rs1"], outputs=["A", "B"]),
                           name="s")
    target = keras.Sequential([keras.Input((3,)), layer])
    before = layer.pattern
    with pytest.raises(ValueError, match=r"input_names.*'rs1'.*'rs3'.*same order"):
        target.load_weights(tmp_path / "m.weights.h5")
    assert layer.pattern is before  # neither names nor connections replaced

    checkpoint = tf.train.Checkpoint(model=source).save(str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"input_names.*same order"):
        tf.train.Checkpoint(model=target).restore(checkpoint)
    assert layer.pattern is before


def test_loading_an_evolved_named_pattern_keeps_the_names(tmp_path):
    names = dict(inputs=["rs1", "rs2", "rs3", "rs4"], outputs=["A", "B", "C"])
    start = sl.SparsityPattern.from_edges(["rs1", "rs2", "rs3"], ["A", "B", "C"], **names)
    trained = sl.SparseDense(start, name="s")
    source = keras.Sequential([keras.Input((4,)), trained])
    evolved = sl.SparsityPattern.from_edges(["rs4", "rs2", "rs1"], ["A", "C", "C"], **names)
    trained.set_pattern(evolved, values=[1.0, 2.0, 3.0])
    source.save_weights(tmp_path / "m.weights.h5")
    fresh = sl.SparseDense(start, name="s")
    keras.Sequential([keras.Input((4,)), fresh]).load_weights(tmp_path / "m.weights.h5")
    assert pattern_state.identical(fresh.pattern, trained.pattern)
    x = inputs_for(evolved, 3)
    want = reference.forward(x, trained.pattern, trained.values.numpy(), trained.bias.numpy())
    np.testing.assert_allclose(fresh(x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_loading_keeps_the_layers_names_when_the_file_has_none(tmp_path):
    unnamed = sl.patterns.banded((3, 2), upper=1)
    source = keras.Sequential([keras.Input((3,)), sl.SparseDense(unnamed, name="s")])
    source.save_weights(tmp_path / "m.weights.h5")
    named = unnamed.with_names(["a", "b", "c"], ["X", "Y"])
    target = sl.SparseDense(named, name="s")
    keras.Sequential([keras.Input((3,)), target]).load_weights(tmp_path / "m.weights.h5")
    assert target.pattern.input_names == ("a", "b", "c") and target.pattern.output_names == ("X", "Y")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"pattern": sl.patterns.banded((5, 4))}, ValueError, r"shape \(4, 4\).*Received: pattern with shape \(5, 4\)"),
    ({"pattern": sl.patterns.banded((4, 4), upper=1)}, ValueError, "nnz=4.*Received: pattern with nnz=7"),
    ({"pattern": sl.patterns.banded((4, 4)).T, "values": [1.0, 2.0]}, ValueError, r"\(4,\).*shape \(2,\)"),
    ({"pattern": "diagonal"}, TypeError, "Received: pattern of type str"),
])
def test_bad_set_pattern_arguments(kwargs, error, message):
    layer = sl.SparseDense(sl.patterns.banded((4, 4)))
    layer.build((None, 4))
    with pytest.raises(error, match=message):
        layer.set_pattern(**kwargs)


def test_corrupt_pattern_in_a_weights_file_fails_loudly(tmp_path):
    import h5py

    model = keras.Sequential([keras.Input((6,)), sl.SparseDense(sl.patterns.banded((6, 6), lower=1), name="s")])
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    with h5py.File(path, "r+") as f:
        key = [k for k in _datasets(f) if k.endswith("/pattern")][0]
        data = f[key][()]
        del f[key]
        f[key] = data[: len(data) // 2]
    with pytest.raises(ValueError, match="Corrupt pattern"):
        model.load_weights(path)


def _datasets(group, prefix=""):
    for name, item in group.items():
        if hasattr(item, "items"):
            yield from _datasets(item, f"{prefix}/{name}")
        else:
            yield f"{prefix}/{name}"


def test_checkpoint_restore_moves_pattern_and_optimizer_slots_together(tmp_path):
    x = np.random.default_rng(0).normal(size=(16, 12)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((12,)), sl.SparseDense(sl.patterns.random((12, 3), density=0.5, seed=0))])
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return m

    trained = model()
    trained.layers[0].set_pattern(same_nnz_pattern(trained.layers[0].pattern, 5))
    trained.fit(x, y, epochs=2, verbose=0)
    path = tf.train.Checkpoint(model=trained, optimizer=trained.optimizer).save(str(tmp_path / "c"))
    fresh = model()
    fresh.train_on_batch(x[:1], y[:1])  # creates the slots the checkpoint overwrites
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path)
    sl.reset_compiled_functions(fresh)
    assert fresh.layers[0].pattern == trained.layers[0].pattern
    for a, b in zip(fresh.optimizer.variables, trained.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trained.fit(x, y, epochs=1, verbose=0, shuffle=False)
    fresh.fit(x, y, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(fresh.layers[0].values.numpy(), trained.layers[0].values.numpy(), rtol=1e-6)
