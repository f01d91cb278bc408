"""What a RigL or SET topology update costs, and the step time between updates.

    .venv/bin/python benchmarks/topology_update.py          # compiled, ~2 minutes on 2 cores
    .venv/bin/python benchmarks/topology_update.py --jit    # jit_compile=True

An MLP 784-1024-1024-10 whose two hidden layers are SparseDense at 10%
trains with ``fit`` (batch 128, Adam), updating its topology every 15 steps.
A timer callback, first in the list, splits wall time into the steps and the
gaps between steps, where the callbacks (so the update) run. The fixed
pattern runs the same ``fit`` without an update callback. Runs alternate
(fixed, RigL, SET), round after round, in one process; medians are printed.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import keras
import numpy as np
import tensorflow as tf

import sparselayers as sl

EVERY = 15  # steps between two updates
ROUNDS = 3


def build(jit: bool) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            sl.SparseDense(sl.patterns.random((784, 1024), density=0.1, seed=1), activation="relu"),
            sl.SparseDense(sl.patterns.random((1024, 1024), density=0.1, seed=2), activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), loss, jit_compile=jit)
    return model


class Timer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.begin, self.end = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.begin.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # waits for the step
        self.end.append(time.perf_counter())


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jit", action="store_true", help="compile with jit_compile=True")
    jit = parser.parse_args().jit
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128 * 4 * EVERY, 784)).astype("float32")
    y = rng.integers(0, 10, size=len(x))
    print(
        f"{cpu_model()}, TF {tf.__version__}, Keras {keras.__version__}, "
        f"{'jit_compile=True' if jit else 'compiled'}; MLP 784-1024-1024-10, SparseDense at 10%, "
        f"batch 128, Adam, an update every {EVERY} steps, {ROUNDS} rounds"
    )
    runs = {"fixed": [], "RigL": [], "SET": []}
    for _ in range(ROUNDS):
        for name in runs:
            timer = Timer()
            callbacks = [timer]
            if name != "fixed":
                callbacks.append(getattr(sl.callbacks, name)(EVERY, 0.3, end_step=10**6, seed=0))
            build(jit).fit(x, y, batch_size=128, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
            runs[name].append((np.subtract(timer.end, timer.begin), np.array(timer.begin), np.array(timer.end)))

    after = np.arange(EVERY, 4 * EVERY, EVERY)  # index of the first step after each update

    def median_ms(name, pick):
        return f"{1e3 * np.median(np.concatenate([pick(*run) for run in runs[name]])):7.1f} ms"

    print(f"fixed pattern: step {median_ms('fixed', lambda s, b, e: s[EVERY:])}")
    for name in ("RigL", "SET"):
        print(
            f"{name:4s}: step between updates {median_ms(name, lambda s, b, e: np.delete(s, np.r_[0:EVERY, after - 1, after]))}"
            f" | update {median_ms(name, lambda s, b, e: (b[1:] - e[:-1])[after - 1])}"
            f" | step ending in an update {median_ms(name, lambda s, b, e: s[after - 1])}"
            f" | first step after an update (retrace) {median_ms(name, lambda s, b, e: s[after])}"
        )


if __name__ == "__main__":
    main()
