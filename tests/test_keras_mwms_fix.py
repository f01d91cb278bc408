"""The Keras workaround in one process: what it replaces, and that it leaves other strategies alone."""

import subprocess
import sys

import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow import trainer

from sparselayers.distribute import keras_mwms_fix
from tests.cluster import ENV


def test_installed_exactly_where_keras_has_the_faulty_calls():
    import inspect

    names = keras_mwms_fix.installed()
    faulty = {
        "reduce_per_replica": 'strategy.reduce("MEAN", v, axis=0)'
        in inspect.getsource(keras_mwms_fix._originals.get("reduce_per_replica", trainer.reduce_per_replica)),
        "_maybe_symbolic_build": "self.distribute_strategy.reduce("
        in inspect.getsource(
            keras_mwms_fix._originals.get("_maybe_symbolic_build", trainer.TensorFlowTrainer._maybe_symbolic_build)
        ),
    }
    assert sorted(names) == sorted(name for name, bad in faulty.items() if bad)
    if "reduce_per_replica" in names:
        assert trainer.reduce_per_replica is keras_mwms_fix._reduce_per_replica
    if "_maybe_symbolic_build" in names:
        assert trainer.TensorFlowTrainer._maybe_symbolic_build is keras_mwms_fix._maybe_symbolic_build


def test_other_strategies_get_keras_own_reduction():
    cpu = tf.config.list_logical_devices("CPU")[0].name
    for strategy in (tf.distribute.get_strategy(), tf.distribute.OneDeviceStrategy(cpu)):
        values = {"loss": tf.constant(1.5), "out": tf.constant([[1.0, 2.0]])}
        for reduction in ("auto", "mean", "sum", "concat", "first"):
            ours = trainer.reduce_per_replica(values, strategy, reduction)
            keras_own = keras_mwms_fix._originals.get("reduce_per_replica", trainer.reduce_per_replica)(
                values, strategy, reduction
            )
            for key in values:
                np.testing.assert_array_equal(ours[key], keras_own[key])


def test_uninstall_restores_keras_and_install_is_idempotent():
    before = keras_mwms_fix.installed()
    originals = dict(keras_mwms_fix._originals)
    try:
        keras_mwms_fix.uninstall()
        assert keras_mwms_fix.installed() == []
        if "reduce_per_replica" in originals:
            assert trainer.reduce_per_replica is originals["reduce_per_replica"]
    finally:
        keras_mwms_fix.install()
        keras_mwms_fix.install()
    assert keras_mwms_fix.installed() == before


def test_environment_variable_turns_the_workaround_off():
    code = (
        "import sparselayers, keras.src.backend.tensorflow.trainer as t\n"
        "from sparselayers.distribute import keras_mwms_fix as f\n"
        "print(f.installed(), t.reduce_per_replica.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**ENV, "SPARSELAYERS_KERAS_MWMS_FIX": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[]", "keras.src.backend.tensorflow.trainer"]
