"""tf.distribute strategies, each in fresh processes (device setup is per process).

MultiWorkerMirroredStrategy, with two worker processes: tests/test_multi_worker.py.
"""

import json
import subprocess
import sys
import textwrap

from tests.cluster import ENV

COMMON = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, tensorflow as tf, keras
    import sparselayers as sl

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((32,))
        h = sl.SparseDense(sl.patterns.block_diagonal([(8, 8)] * 4), activation="tanh")(inputs)
        h = sl.SparseDense(sl.patterns.random((32, 16), density=0.1, seed=0), kernel="csr")(h)
        model = keras.Model(inputs, sl.Towers(4, hidden_units=[3])(h))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32)).astype("float32")
    y = rng.normal(size=(256, 4)).astype("float32")
    """
)

MIRRORED = COMMON + textwrap.dedent(
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    single = build()
    single.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = build()
    mirrored.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights()))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(build().get_weights(), mirrored.get_weights()))
    print(json.dumps({"diff": diff, "moved": moved}))
    """
)


def test_mirrored_strategy_matches_one_device():
    done = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["moved"] > 1e-2  # training changed the weights...
    assert result["diff"] < 1e-5  # ...identically on one device and on two replicas
