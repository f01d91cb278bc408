"""Every layer of the package through the same checks (in the spirit of Sonnet's).

The registry below lists each layer configuration once; each check runs over
all of them: Keras files, checkpoints with optimizer state, SavedModel export
served without sparselayers, tf.function retracing, XLA, mixed precision,
float64 and determinism.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference
import sparselayers as sl

INPUT_DIM = 24

LAYERS = {
    "block": lambda: sl.SparseDense(sl.patterns.block_diagonal([(8, 8)] * 3), activation="relu"),
    "banded": lambda: sl.SparseDense(sl.patterns.banded((INPUT_DIM, 20), lower=4, upper=5)),
    "csr": lambda: sl.SparseDense(sl.patterns.random((INPUT_DIM, 16), density=0.2, seed=0), kernel="csr"),
    "csr_gather": lambda: sl.SparseDense(
        sl.patterns.random((INPUT_DIM, 16), density=0.2, seed=5), kernel="csr_gather"),
    "csr_dense_grad": lambda: sl.SparseDense(
        sl.patterns.random((INPUT_DIM, 16), density=0.2, seed=6), kernel="csr_dense_grad"),
    "dense": lambda: sl.SparseDense(sl.patterns.random((INPUT_DIM, 16), density=0.4, seed=1), kernel="dense"),
    "gather": lambda: sl.SparseDense(sl.patterns.random((INPUT_DIM, 16), density=0.2, seed=2), kernel="gather"),
    "sparse_dense_matmul": lambda: sl.SparseDense(
        sl.patterns.random((INPUT_DIM, 16), density=0.2, seed=3), kernel="sparse_dense_matmul"),
    "compiled_csr": lambda: sl.SparseDense(
        sl.patterns.random((INPUT_DIM, 16), density=0.2, seed=7), kernel="compiled_csr"),
    "auto-random": lambda: sl.SparseDense(sl.patterns.random((INPUT_DIM, 64), density=0.02, seed=4)),
    "towers": lambda: sl.Towers(5, hidden_units=[3, 2], output_units=2),
}
NAMES = sorted(LAYERS)


def make_model(name, dtype=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((INPUT_DIM,), dtype=dtype)
    layer = LAYERS[name]()
    if dtype is not None:
        layer = type(layer).from_config({**layer.get_config(), "dtype": dtype})
    outputs = keras.layers.Dense(3, dtype=dtype, name="head")(layer(inputs))
    return keras.Model(inputs, outputs)


def data(n=64, dtype="float32"):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, INPUT_DIM)).astype(dtype), rng.normal(size=(n, 3)).astype(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_and_weights_file(name, tmp_path):
    model = make_model(name)
    x, _ = data()
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    fresh = make_model(name)
    keras.utils.set_random_seed(7)
    fresh.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("name", NAMES)
def test_truncated_keras_file_fails_loudly(name, tmp_path):
    model = make_model(name)
    path = tmp_path / "m.keras"
    model.save(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(Exception):
        keras.models.load_model(path)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_restores_optimizer_and_continues_identically(name, tmp_path):
    x, y = data()

    def trained(steps_before, restore_from=None, save_to=None, steps_after=0):
        model = make_model(name)
        optimizer = keras.optimizers.Adam(0.01)
        model.compile(optimizer=optimizer, loss="mse")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        if restore_from:
            model.train_on_batch(x[:1], y[:1])  # create optimizer slots, then overwrite them
            checkpoint.restore(restore_from).assert_existing_objects_matched()
        for _ in range(steps_before):
            model.train_on_batch(x, y)
        saved = checkpoint.save(save_to) if save_to else None
        for _ in range(steps_after):
            model.train_on_batch(x, y)
        return model, saved

    uninterrupted, _ = trained(6)
    _, path = trained(3, save_to=str(tmp_path / "ckpt"))
    resumed, _ = trained(3, restore_from=path)
    for a, b in zip(uninterrupted.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def sparse_layers(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, sl.SparseDense):
            found.append(layer)
        found.extend(getattr(layer, "tower_layers", []))
    return found


def evolve(model, seed):
    """Moves every SparseDense to another pattern of the same nnz, with new values."""
    rng = np.random.default_rng(seed)
    for layer in sparse_layers(model):
        n, m = layer.pattern.shape
        linear = np.sort(rng.choice(n * m, layer.pattern.nnz, replace=False))
        pattern = sl.SparsityPattern.from_coo(linear // m, linear % m, shape=(n, m))
        layer.set_pattern(pattern, values=rng.normal(size=pattern.nnz))


@pytest.mark.parametrize("name", NAMES)
def test_the_pattern_travels_with_the_values_in_every_save_path(name, tmp_path):
    x, _ = data(9)
    model = make_model(name)
    model.predict(x, verbose=0)
    evolve(model, seed=1)
    sl.reset_compiled_functions(model)
    expected = model.predict(x, verbose=0)
    for layer in sparse_layers(model):  # the evolved layer still equals its dense reference
        inputs = np.random.default_rng(2).normal(size=(5, layer.input_dim))
        bias = layer.bias.numpy() if layer.bias is not None else None
        want = reference.forward(inputs, layer.pattern, layer.values.numpy(), bias)
        if layer.activation is keras.activations.relu:
            want = np.maximum(want, 0)
        np.testing.assert_allclose(layer(inputs.astype("float32")).numpy(), want, rtol=1e-5, atol=1e-5)
    patterns = [layer.pattern for layer in sparse_layers(model)]

    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    checkpoint_path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))

    from_weights = make_model(name)
    from_weights.load_weights(tmp_path / "m.weights.h5")
    from_keras = keras.models.load_model(tmp_path / "m.keras")
    from_checkpoint = make_model(name)
    tf.train.Checkpoint(model=from_checkpoint).restore(checkpoint_path).assert_existing_objects_matched()
    for restored in (from_weights, from_keras, from_checkpoint):
        assert [layer.pattern for layer in sparse_layers(restored)] == patterns
        np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)
        assert restored.count_params() == model.count_params()


def test_a_saved_pattern_of_another_nnz_is_refused(tmp_path):
    def model(density):
        layer = sl.SparseDense(sl.patterns.random((32, 32), density=density, seed=1), name="sparse")
        return keras.Sequential([keras.Input((32,)), layer])

    small, large = model(0.1), model(0.2)
    small.save_weights(tmp_path / "s.weights.h5")
    with pytest.raises(ValueError, match="nnz="):
        large.load_weights(tmp_path / "s.weights.h5")
    path = tf.train.Checkpoint(model=small).save(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError):
        tf.train.Checkpoint(model=large).restore(path)


def test_the_issue_reproducer_now_restores_the_saved_connections(tmp_path):
    a = keras.Sequential([keras.Input((32,)), sl.SparseDense(sl.patterns.random((32, 32), density=0.1, seed=1))])
    b = keras.Sequential([keras.Input((32,)), sl.SparseDense(sl.patterns.random((32, 32), density=0.1, seed=2))])
    a.save_weights(tmp_path / "a.weights.h5")
    b.load_weights(tmp_path / "a.weights.h5")
    x = np.random.default_rng(0).normal(size=(4, 32)).astype("float32")
    layer = a.layers[-1]
    want = reference.forward(x, layer.pattern, layer.values.numpy(), layer.bias.numpy())
    np.testing.assert_allclose(b(x).numpy(), want, rtol=1e-5, atol=1e-6)
    assert b.layers[-1].pattern == layer.pattern


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("jit", [False, True])
def test_a_function_traced_before_a_pattern_change_fails_loudly_until_rebuilt(name, jit):
    x, _ = data(9)
    model = make_model(name)
    model.compile(loss="mse", jit_compile=jit)
    model.predict(x, verbose=0)
    evolve(model, seed=3)
    if model.jit_compile:  # XLA drops asserts: the stale compiled graph gives NaN
        assert np.isnan(model.predict(x, verbose=0)).all()
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="changed after this function was traced"):
            model.predict(x, verbose=0)
    sl.reset_compiled_functions(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), model(x).numpy(), rtol=1e-5, atol=1e-6)


SERVE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    out = {}
    for name, path in json.loads(sys.argv[1]).items():
        served = tf.saved_model.load(path)
        x = np.load(path + ".x.npy")
        out[name] = float(np.abs(served.serve(x).numpy() - np.load(path + ".y.npy")).max())
    assert "sparselayers" not in sys.modules
    print(json.dumps(out))
    """
)


def test_saved_model_export_serves_without_sparselayers(tmp_path):
    x, _ = data(7)
    paths, twins = {}, set()
    for name in NAMES:
        model = make_model(name)
        if getattr(model.layers[1], "kernel_name", "").startswith("compiled_"):
            twins.add(name)  # exported with its pure-TF twin: equal up to float rounding
        path = str(tmp_path / name)
        model.export(path, verbose=False)
        np.save(path + ".x.npy", x)
        np.save(path + ".y.npy", model.predict(x, verbose=0))
        paths[name] = path
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", SERVE, json.dumps(paths)], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == set(NAMES)
    assert max(errors[name] for name in set(NAMES) - twins) == 0.0, errors
    assert max((errors[name] for name in twins), default=0.0) < 1e-5, errors


@pytest.mark.parametrize("name", NAMES)
def test_changing_batch_sizes_do_not_retrace(name):
    model = make_model(name)
    traces = []

    @tf.function(reduce_retracing=True)
    def predict(x):
        traces.append(1)
        return model(x)

    x, _ = data(9)
    for batch in (1, 2, 3, 5, 8, 9):
        np.testing.assert_allclose(predict(x[:batch]).numpy(), model(x[:batch]).numpy(), rtol=1e-5, atol=1e-6)
    assert len(traces) <= 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("jit", [True, "auto"])
def test_jit_compile_trains_like_uncompiled(name, jit):
    x, y = data()
    weights = []
    for setting in (False, jit):
        model = make_model(name)
        model.compile(optimizer="sgd", loss="mse", jit_compile=setting)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_xla_really_compiles_forward_and_gradients(name):
    """jit_compile=True compiles every layer (forced XLA-less kernels swap in an XLA kernel)."""
    model = make_model(name)
    x = tf.constant(data(16)[0])

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x) ** 2)
        return loss, tape.gradient(loss, [x, *model.trainable_variables])

    compiled = tf.function(step, jit_compile=True)
    assert "HloModule" in compiled.experimental_get_compiler_ir(x)(stage="hlo")
    for got, want in zip(tf.nest.flatten(compiled(x)), tf.nest.flatten(step(x))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile == all(layer.supports_jit for layer in sparse_layers(model))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(name, policy):
    x, y = data()
    keras.config.set_dtype_policy(policy)
    try:
        model = make_model(name)
        model.compile(optimizer="adam", loss="mse")
        layer = model.layers[1]
        assert all(v.dtype == "float32" for v in layer.trainable_variables)
        low = policy.split("_")[1]
        assert layer(x).dtype == low
        if policy == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        before = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=3, batch_size=16, verbose=0)
        assert model.evaluate(x, y, verbose=0) < before
        full = make_model(name)
        full.set_weights(model.get_weights())
    finally:
        keras.config.set_dtype_policy("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0).astype("float32"), full.predict(x, verbose=0),
                               rtol=0.1, atol=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_float64_layers(name):
    x, y = data(dtype="float64")
    model = make_model(name, dtype="float64")
    assert all(v.dtype == "float64" for v in model.trainable_variables)
    out = model(x)
    assert out.dtype == tf.float64
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, epochs=1, verbose=0)


DETERMINISM = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf, keras
    tf.config.experimental.enable_op_determinism()
    sys.path.insert(0, sys.argv[1])
    from tests.test_conformance import NAMES, data, make_model
    x, y = data(256)
    same = {}
    for name in NAMES:
        runs = []
        for _ in range(2):
            model = make_model(name)
            model.compile(optimizer="adam", loss="mse")
            model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
            runs.append(model.get_weights())
        same[name] = all(np.array_equal(a, b) for a, b in zip(*runs))
    print(json.dumps(same))
    """
)


def test_op_determinism_gives_bit_identical_training():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", DETERMINISM, root], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    same = json.loads(done.stdout.strip().splitlines()[-1])
    assert same == {name: True for name in NAMES}
