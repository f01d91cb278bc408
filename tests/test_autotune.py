"""sl.autotune: chooses by its own timings, caches them safely, never changes results."""

import importlib
import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import sparselayers as sl
from tests import reference
from tests.strategies import inputs_for

autotune_module = importlib.import_module("sparselayers.autotune")

RANDOM = sl.patterns.random((24, 16), density=0.2, seed=0)
BAND = sl.patterns.banded((16, 16), lower=1, upper=1)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELAYERS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSELAYERS_AUTOTUNE_CACHE", raising=False)
    return tmp_path


def timer_from(table, calls=None):
    """A Timer reading ``table[kernel]`` (a number, or a list consumed round by round)."""

    def timer(layer, kernel, step):
        if calls is not None:
            calls.append((layer, kernel))
        value = table.get(kernel, 50.0)
        return value.pop(0) if isinstance(value, list) else value

    return timer


def one_layer_model(pattern, **kwargs):
    return keras.Sequential([keras.Input((pattern.shape[0],)), sl.SparseDense(pattern, **kwargs)])


def x_for(pattern, batch=8):
    return inputs_for(pattern, batch=batch)


def test_chooses_the_fastest_of_its_own_median_timings():
    model = one_layer_model(RANDOM)
    # gather has one slow outlier round, csr one fast one: the medians decide.
    table = {"gather": [2.0, 90.0, 2.0], "csr": [3.0, 0.5, 3.0], "dense": 4.0, "block": 5.0}
    report = sl.autotune(model, x_for(RANDOM), rounds=3, timer=timer_from(table))
    row = report[0]
    assert row.chosen == "gather" == model.layers[0].kernel_name
    assert row.ms["gather"] == 2.0 and row.ms["csr"] == 3.0 and row.ms["dense"] == 4.0
    assert "banded" in row.skipped and "banded" not in row.ms  # a random pattern is no band
    assert row.source == "measured" and row.batch == 8 and row.dtype == "float32"
    assert row.shape == (24, 16) and row.nnz == RANDOM.nnz and row.fingerprint == RANDOM.fingerprint


def test_a_kernel_far_slower_in_the_first_round_is_not_timed_again():
    calls = []
    table = {"sparse_dense_matmul": 100.0, "csr": 1.0, "gather": 2.0, "dense": 3.0, "block": 3.5}  # limit: 3x
    sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=4, timer=timer_from(table, calls))
    counted = {kernel: sum(k == kernel for _, k in calls) for kernel in table}
    assert counted == {"sparse_dense_matmul": 1, "csr": 4, "gather": 4, "dense": 4, "block": 1}


def test_every_sparse_dense_is_tuned_also_inside_towers_and_nested_models():
    inner = keras.Sequential([keras.Input((24,)), sl.SparseDense(RANDOM, name="first"), sl.Towers(4, [3], 2)])
    model = keras.Sequential([keras.Input((24,)), inner, sl.SparseDense(sl.patterns.random((8, 5), density=0.5, seed=1))])
    calls = []
    report = sl.autotune(model, x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}, calls))
    layers = [row.layer for row in report]
    assert len(layers) == 4 and len(set(layers)) == 4
    assert layers[0].endswith("first") and "tower_layer_0" in layers[1] and "tower_layer_1" in layers[2]
    assert {layer for layer, _ in calls} == set(layers)
    assert all(row.chosen == "gather" for row in report)
    towers = inner.layers[1]
    assert [layer.kernel_name for layer in towers.tower_layers] == ["gather", "gather"]


def test_report_prints_a_table_and_gives_plain_data():
    report = sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=1, timer=timer_from({"csr": 1.5}))
    text = str(report)
    assert "chosen" in text.splitlines()[1] and "csr" in text.splitlines()[2]
    assert "1.5" in text and report.device in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["chosen"] == "csr" and data["layers"][0]["ms"]["csr"] == 1.5
    assert data["tf_version"] == tf.__version__


def test_forced_kernels_are_left_alone():
    model = one_layer_model(RANDOM, kernel="csr")
    calls = []
    report = sl.autotune(model, x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}, calls))
    assert calls == [] and model.layers[0].kernel_name == "csr"
    assert report[0].source == "kernel='csr' forced" and report[0].chosen == "csr"


def test_cache_is_written_and_then_used_instead_of_timing(cache_dir):
    sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}))
    data = json.loads((cache_dir / "autotune.json").read_text())
    assert data["format"] == "sparselayers-autotune" and len(data["entries"]) == 1
    (entry,) = data["entries"].values()
    assert entry["kernel"] == "gather"

    calls = []
    fresh = one_layer_model(RANDOM)
    report = sl.autotune(fresh, x_for(RANDOM, batch=7), rounds=1, timer=timer_from({"csr": 1.0}, calls))
    assert calls == [] and report[0].source == "cache" and fresh.layers[0].kernel_name == "gather"

    report = sl.autotune(fresh, x_for(RANDOM), rounds=1, refresh=True, timer=timer_from({"csr": 1.0}, calls))
    assert calls and report[0].chosen == "csr" == fresh.layers[0].kernel_name
    (entry,) = json.loads((cache_dir / "autotune.json").read_text())["entries"].values()
    assert entry["kernel"] == "csr"


def test_the_cache_can_be_disabled(cache_dir, monkeypatch):
    monkeypatch.setenv("SPARSELAYERS_AUTOTUNE_CACHE", "0")
    for _ in range(2):
        calls = []
        sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}, calls))
        assert calls
    assert not (cache_dir / "autotune.json").exists()
    fresh = sl.SparseDense(RANDOM)
    fresh(x_for(RANDOM))
    assert fresh._select_kernel(tf.zeros((8, 24))).name == sl.ops.check_kernel_name("auto", RANDOM)


def test_a_fresh_auto_layer_uses_the_cached_choice_for_its_batch_bucket():
    static = sl.ops.check_kernel_name("auto", RANDOM)  # the static rule, compiled where built
    assert static != "gather"
    sl.autotune(one_layer_model(RANDOM), x_for(RANDOM, batch=6), rounds=1, timer=timer_from({"gather": 1.0}))

    layer = sl.SparseDense(RANDOM)
    layer.build((None, 24))

    def used(batch):
        return layer._select_kernel(tf.zeros((batch, 24))).name

    assert used(5) == used(8) == "gather"  # 5..8 share the bucket of 6
    assert used(4) == used(9) == static
    assert layer._select_kernel().name == static  # batch unknown: the static rule

    # In a trace, from the static batch; an unknown batch keeps the static rule.
    traced = []
    original = layer._select_kernel

    def spy(flat=None):
        kernel = original(flat)
        traced.append(kernel.name)
        return kernel

    layer._select_kernel = spy
    tf.function(layer)(tf.zeros((7, 24)))
    tf.function(layer, input_signature=[tf.TensorSpec((None, 24))])(tf.zeros((7, 24)))
    assert traced == ["gather", static]

    assert layer.get_config()["kernel"] == "auto"
    assert sl.SparseDense(RANDOM, kernel="csr")._select_kernel(tf.zeros((8, 24))).name == "csr"
    layer.set_kernel("csr")  # an explicit choice other than the static rule's beats the cache
    assert used(8) == "csr"


def test_tuned_models_save_kernel_auto(tmp_path):
    model = one_layer_model(RANDOM)
    sl.autotune(model, x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}))
    assert model.layers[0].kernel_name == "gather"
    assert model.layers[0].get_config()["kernel"] == "auto"
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.layers[0].get_config()["kernel"] == "auto"
    assert loaded.layers[0]._select_kernel(tf.zeros((8, 24))).name == "gather"  # from this device's cache


@pytest.mark.parametrize(
    "content",
    ["not json {", "[1, 2]", '{"some": "thing"}', '{"format": "sparselayers-autotune", "version": 99, "entries": {}}'],
    ids=["corrupt", "list", "foreign", "future-version"],
)
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(cache_dir, content):
    (cache_dir / "autotune.json").write_text(content)
    layer = sl.SparseDense(RANDOM)
    with pytest.warns(UserWarning, match="Ignoring the autotune cache"):
        y = layer(x_for(RANDOM))
    assert y.shape == (8, 16)
    calls = []
    report = sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}, calls))
    assert calls and report[0].source == "measured"
    data = json.loads((cache_dir / "autotune.json").read_text())  # replaced by a valid cache
    assert [entry["kernel"] for entry in data["entries"].values()] == ["gather"]


def test_cached_entries_naming_unknown_kernels_are_ignored(cache_dir):
    sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}))
    path = cache_dir / "autotune.json"
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["kernel"] = "no_such_kernel"
    data["entries"]["junk"] = {"kernel": 3}
    path.write_text(json.dumps(data))
    autotune_module._memory.clear()  # as a new process would
    layer = sl.SparseDense(RANDOM)
    layer.build((None, 24))
    assert layer._select_kernel(tf.zeros((8, 24))).name == sl.ops.check_kernel_name("auto", RANDOM)
    report = sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=1, timer=timer_from({"csr": 1.0}))
    assert report[0].source == "measured" and report[0].chosen == "csr"


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSELAYERS_CACHE_DIR", str(blocker / "sub"))
    model = one_layer_model(RANDOM)
    with pytest.warns(UserWarning, match="Could not write the autotune cache"):
        report = sl.autotune(model, x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}))
    assert report[0].chosen == "gather" == model.layers[0].kernel_name


def test_eager_calls_read_the_cache_file_once(monkeypatch):
    sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=1, timer=timer_from({"gather": 1.0}))
    autotune_module._memory.clear()
    reads = []
    original = autotune_module._read
    monkeypatch.setattr(autotune_module, "_read", lambda *a, **k: reads.append(1) or original(*a, **k))
    layer = sl.SparseDense(RANDOM)
    for _ in range(5):
        layer(x_for(RANDOM))
    assert len(reads) == 1


@given(content=st.one_of(st.binary(max_size=64), st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
).map(json.dumps).map(str.encode)))
def test_any_file_content_is_read_or_ignored_never_raised(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("c") / "autotune.json"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert autotune_module._read(path, warn=True) == {}


@pytest.mark.parametrize("kernel", ["sparse_dense_matmul", "csr", "block", "dense", "gather"])
def test_autotune_never_changes_results(kernel):
    """Whatever kernel the timings pick, outputs and gradients stay the float64 reference's."""
    model = one_layer_model(RANDOM)
    layer = model.layers[0]
    layer.bias.assign(np.random.default_rng(3).normal(size=16).astype("float32"))
    x = tf.constant(x_for(RANDOM))
    upstream = np.random.default_rng(4).normal(size=(8, 16))

    def outputs():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
            loss = tf.reduce_sum(y * upstream.astype("float32"))
        d_x, d_values = tape.gradient(loss, [x, layer.values])
        return y.numpy(), d_x.numpy(), tf.convert_to_tensor(d_values).numpy()

    before = outputs()
    sl.autotune(model, x, rounds=1, timer=timer_from({kernel: 0.1}))
    assert layer.kernel_name == kernel
    after = outputs()
    values, bias = layer.values.numpy(), layer.bias.numpy()
    ref_dx, ref_dv, _ = reference.gradients(x.numpy(), RANDOM, values, upstream)
    for got in (before, after):
        np.testing.assert_allclose(got[0], reference.forward(x.numpy(), RANDOM, values, bias), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], ref_dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[2], ref_dv, rtol=1e-5, atol=1e-5)
    # A compiled predict function follows the new kernel and the same numbers.
    np.testing.assert_allclose(model.predict(x, verbose=0), after[0], rtol=1e-6, atol=1e-6)


def test_banded_kernel_is_a_candidate_for_a_band():
    report = sl.autotune(one_layer_model(BAND), x_for(BAND), rounds=1, timer=timer_from({"banded": 0.5}))
    assert report[0].chosen == "banded" and set(report[0].ms) >= {"banded", "csr", "dense", "block"}


def test_real_timing_picks_its_own_fastest():
    report = sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=2, cache=False)
    row = report[0]
    assert row.chosen == min(row.ms, key=row.ms.get) and all(ms > 0 for ms in row.ms.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="`model` must contain at least one sparse layer"):
        sl.autotune(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), np.ones((2, 4), "float32"))
    with pytest.raises(TypeError, match="`model` must be a Keras model or layer"):
        sl.autotune(RANDOM, x_for(RANDOM))
    with pytest.raises(ValueError, match=r"`x` must be a batch that `model` accepts. Received: x with shape \(8, 5\)"):
        sl.autotune(one_layer_model(RANDOM), np.ones((8, 5), "float32"))
    with pytest.raises(ValueError, match="`x` must be a batch of at least one example"):
        sl.autotune(one_layer_model(RANDOM), np.ones((0, 24), "float32"))
    with pytest.raises(ValueError, match="`rounds` must be >= 1"):
        sl.autotune(one_layer_model(RANDOM), x_for(RANDOM), rounds=0)


def test_device_description_names_the_cpu():
    description = autotune_module.describe_device("/job:localhost/replica:0/task:0/device:CPU:0")
    assert description.startswith("CPU: ") and "threads" in description


def test_batch_counts_the_rows_of_the_flattened_input_and_dtype_is_part_of_the_key():
    sequences = keras.Sequential([keras.Input((5, 24)), sl.SparseDense(RANDOM)])
    report = sl.autotune(sequences, np.ones((2, 5, 24), "float32"), rounds=1, timer=timer_from({"gather": 1.0}))
    assert report[0].batch == 10
    half = keras.Sequential([keras.Input((24,)), sl.SparseDense(RANDOM, dtype="mixed_float16")])
    report = sl.autotune(half, np.ones((16, 24), "float32"), rounds=1, timer=timer_from({"csr": 1.0}))
    assert report[0].dtype == "float16" and report[0].chosen == "csr" and report[0].source == "measured"
    fresh = sl.SparseDense(RANDOM)
    fresh.build((None, 24))
    assert fresh._select_kernel(tf.zeros((16, 24))).name == "gather"  # the float32 measurement
    assert fresh._select_kernel(tf.zeros((16, 24), tf.float16)).name == "csr"


def test_a_kernel_variant_is_timed_like_any_kernel(monkeypatch):
    class CSRVariant(sl.ops.CSRKernel):
        name = "csr_variant"

    monkeypatch.setitem(sl.ops.KERNELS, "csr_variant", CSRVariant)
    monkeypatch.setattr(sl.ops.CSRKernel, "variants", ("csr_variant",), raising=False)
    model = one_layer_model(RANDOM)
    report = sl.autotune(model, x_for(RANDOM), rounds=1, timer=timer_from({"csr_variant": 0.5, "csr": 1.0}))
    assert report[0].chosen == "csr_variant" == model.layers[0].kernel_name
    assert list(report[0].ms).index("csr_variant") == list(report[0].ms).index("csr") + 1
    assert "csr_variant" in str(report).splitlines()[1]


def test_wall_clock_leaves_the_warm_up_steps_out(monkeypatch):
    # A fake clock: the first three steps (refilling caches after another
    # kernel) take 4 ms each, 12 ms in all, more than WARMUP_SECONDS; the
    # rest take 2 ms. Only the steady steps may count.
    autotune = importlib.import_module("sparselayers.autotune")  # the module, not sl.autotune
    clock = {"now": 0.0, "steps": 0}

    def step():
        clock["steps"] += 1
        clock["now"] += 0.004 if clock["steps"] <= 3 else 0.002

    assert 0.008 < autotune.WARMUP_SECONDS <= 0.012  # the fake steps assume this
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock["now"])
    ms = autotune.wall_clock("layer", "block", step)
    assert ms == pytest.approx(2.0)
    # it timed a whole round, at least MIN_ROUND_SECONDS of steady steps
    assert (clock["steps"] - 3) * 0.002 >= autotune.MIN_ROUND_SECONDS


def test_kernel_name_tells_the_kernel_of_the_last_call():
    # The case: a banded layer whose cached measurement is "dense" runs dense.
    band = sl.patterns.banded((512, 512), lower=16, upper=16)
    assert sl.ops.choose_kernel(band) == "banded"
    sl.autotune(one_layer_model(band), x_for(band), rounds=1, timer=timer_from({"dense": 1.0}))
    layer = sl.SparseDense(band)
    # Before any call: what a call without a measurement runs (the compiled
    # kernel that replaces the tiled banded one where it builds).
    unmeasured = sl.ops.compiled.accelerated("banded", band)
    assert layer.kernel_name == unmeasured
    ran = []
    original = layer._select_kernel

    def spy(flat=None):
        kernel = original(flat)
        ran.append(kernel.name)
        return kernel

    layer._select_kernel = spy
    x = x_for(band)
    y = layer(x)
    assert ran[-1] == layer.kernel_name == "dense"
    np.testing.assert_allclose(y.numpy(), reference.forward(x, band, layer.values.numpy(), layer.bias.numpy()),
                               rtol=1e-5, atol=1e-5)
    layer(x_for(band, batch=3))  # another batch bucket, not measured
    assert ran[-1] == layer.kernel_name == unmeasured
    tf.function(layer, jit_compile=True)(x)
    assert ran[-1] == layer.kernel_name == layer.jit_kernel_name
    layer.set_kernel("csr")
    assert layer.kernel_name == "csr"
