"""Two-worker throughput: reading a genotype matrix from disk and training on it, 1 process vs 2 workers.

    python benchmarks/multi_worker.py                 # 60,000 x 2,000 int8 genotypes, 2 rounds
    python benchmarks/multi_worker.py --rows 20000 --rounds 1   # quick

Writes an int8 genotype matrix (0/1/2) and a float32 phenotype once, as an
``.npy`` file (read through ``np.load(mmap_mode="r")``) and as an HDF5 file
(row chunks of 1,024), in a temporary folder. Each round runs one process
without a strategy, then a two-worker ``MultiWorkerMirroredStrategy``
cluster on loopback (``TF_CONFIG``), with the same global batch. Every
process measures, for both files, one epoch of reading its share through
``sl.distribute.data.sharded_batches`` (an untimed first epoch warms the
page cache: these are reads from memory-mapped pages, not from a cold
disk), then ``fit`` of ``SparseDense(2,000 -> 256, density 1%) -> Dense(1)``
on the memmap pipeline: one untimed epoch (tracing, collectives set up),
then one timed epoch. Throughput is rows per second: per worker (its own
rows) and for the cluster (all rows); scaling is the cluster's training
throughput over the single process's, per round.

Results: ``MULTI_WORKER.md`` (table, machine, settings) and
``multi_worker.png`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # this checkout's sparselayers: the figures are of this code


def write_data(folder: str, rows: int, columns: int) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(os.path.join(folder, "x.npy"), mode="w+", dtype=np.int8, shape=(rows, columns))
    effect = rng.normal(size=columns).astype(np.float32) * (rng.random(columns) < 0.01)
    y = np.zeros((rows, 1), np.float32)
    for start in range(0, rows, 10_000):  # written in blocks: the matrix never sits in memory
        block = rng.binomial(2, 0.3, size=(min(10_000, rows - start), columns)).astype(np.int8)
        x[start : start + len(block)] = block
        y[start : start + len(block), 0] = block @ effect + rng.normal(size=len(block))
    x.flush()
    np.save(os.path.join(folder, "y.npy"), y)
    with h5py.File(os.path.join(folder, "data.h5"), "w") as file:
        data = file.create_dataset("x", shape=(rows, columns), dtype=np.int8, chunks=(1024, columns))
        for start in range(0, rows, 10_000):
            data[start : start + 10_000] = x[start : start + 10_000]
        file["y"] = y


def worker(folder: str, batch: int) -> dict:
    import h5py
    import keras
    import numpy as np
    import tensorflow as tf

    import sparselayers as sl
    from sparselayers.distribute import agreement
    from sparselayers.distribute.data import sharded_batches

    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=300)
        )
    else:
        strategy = tf.distribute.get_strategy()
    workers = strategy.num_replicas_in_sync
    together = agreement.worker_sum(strategy) or (lambda value: value)

    def barrier() -> None:  # workers start each timed part together, not while the other still traces
        together(tf.constant(1.0)).numpy()

    x = np.load(os.path.join(folder, "x.npy"), mmap_mode="r")
    y = np.load(os.path.join(folder, "y.npy"))
    steps = x.shape[0] // batch
    rows_per_epoch = steps * batch
    result = {"workers": workers}
    with h5py.File(os.path.join(folder, "data.h5"), "r") as file:
        for name, (inputs, targets) in {"memmap": (x, y), "hdf5": (file["x"], file["y"])}.items():
            for repeat in (False, True):
                dataset = sharded_batches(inputs, targets, global_batch_size=batch, strategy=strategy, repeat=repeat)
                batches = iter(dataset)
                for _ in range(steps):  # untimed: warms the page cache and tf.data
                    next(batches)
                if not repeat:
                    batches = iter(dataset)  # the next epoch
                barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    next(batches)
                result[f"read {name}{', repeat' if repeat else ''}"] = rows_per_epoch / workers / (time.perf_counter() - start)

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((x.shape[1],)),
            sl.SparseDense(sl.patterns.random((x.shape[1], 256), density=0.01, seed=0), activation="relu"),
            keras.layers.Dense(1),
        ])
        model.compile(optimizer="adam", loss="mse")
    for repeat in (False, True):
        dataset = sharded_batches(x, y, global_batch_size=batch, strategy=strategy, repeat=repeat)
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)  # untimed: tracing, collectives
        barrier()
        start = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
        result[f"train{', repeat' if repeat else ''}"] = rows_per_epoch / workers / (time.perf_counter() - start)
    result["kernel"] = model.layers[0].kernel_name
    return result


def launch(folder: str, batch: int, workers: int) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from cluster import free_ports, run_processes, tf_config

    command = [sys.executable, os.path.abspath(__file__), "--worker", folder, "--batch", str(batch)]
    if workers == 1:
        envs = [{}]
    else:
        ports = free_ports(workers)
        envs = [{"TF_CONFIG": tf_config(ports, index)} for index in range(workers)]
    results = run_processes([command] * workers, envs, timeout=3600)
    for code, _, err in results:
        if code:
            raise RuntimeError(err[-3000:])
    return [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--columns", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch)))
        return

    import keras
    import tensorflow as tf

    sys.path.insert(0, HERE)
    from run import machine

    described = machine()
    settings = (f"{args.rows:,} x {args.columns:,} int8 genotypes, global batch {args.batch}, "
                f"{args.rounds} rounds, TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print(described, settings, sep="\n", flush=True)
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        write_data(folder, args.rows, args.columns)
        for number in range(args.rounds):
            single = launch(folder, args.batch, 1)[0]
            cluster = launch(folder, args.batch, 2)
            rounds.append({"single": single, "cluster": cluster})
            print(json.dumps(rounds[-1]), flush=True)
    write_report(rounds, described, settings, args)


def write_report(rounds: list[dict], described: str, settings: str, args: argparse.Namespace) -> None:
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["read memmap", "read memmap, repeat", "read hdf5", "read hdf5, repeat", "train", "train, repeat"]

    def median(values):
        return statistics.median(values)

    lines = [
        "# Two workers on one machine: input and training throughput",
        "",
        f"Machine: {described}.",
        "",
        f"`python benchmarks/multi_worker.py` ({settings}). Rows per second, median over rounds; "
        "slower worker = the rows of its own share per second of the slower worker, cluster = the sum over workers. Reads: one epoch of "
        "`sl.distribute.data.sharded_batches` after an untimed one (warm page cache). Train: "
        "`fit` of SparseDense(2,000 -> 256, 1%) -> Dense(1) with Adam on the memmap pipeline, one "
        "timed epoch after an untimed one. Both workers share this machine's cores with each other "
        "and, during this run, with other engineers' jobs: the two-worker figures measure overhead "
        "(collectives over loopback, two processes on 2 cores), not the scaling of separate machines.",
        "",
        "| | 1 process | 2 workers: slower worker | 2 workers: cluster | cluster / 1 process |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in keys:
        single = median([r["single"][key] for r in rounds])
        per_worker = median([min(w[key] for w in r["cluster"]) for r in rounds])
        cluster = median([sum(w[key] for w in r["cluster"]) for r in rounds])
        lines.append(f"| {key} | {single:,.0f} | {per_worker:,.0f} | {cluster:,.0f} | {cluster / single:.2f} |")
    lines += ["", "Each round (rows per second, 1 process / cluster):", ""]
    for number, r in enumerate(rounds):
        parts = [f"{key} {r['single'][key]:,.0f} / {sum(w[key] for w in r['cluster']):,.0f}" for key in keys]
        lines.append(f"- round {number + 1}: " + "; ".join(parts))
    lines += ["", f"Kernel chosen for the SparseDense layer: `{rounds[0]['single']['kernel']}`.", "",
              "![Throughput, 1 process and 2 workers](multi_worker.png)", ""]
    with open(os.path.join(HERE, "MULTI_WORKER.md"), "w") as file:
        file.write("\n".join(lines))

    figure, axis = plt.subplots(figsize=(6, 3.2))
    width = 0.38
    for offset, (label, values) in enumerate([
        ("1 process", [median([r["single"][k] for r in rounds]) for k in keys]),
        ("2 workers (cluster)", [median([sum(w[k] for w in r["cluster"]) for r in rounds]) for k in keys]),
    ]):
        axis.bar([i + offset * width for i in range(len(keys))], values, width, label=label)
    axis.set_xticks([i + width / 2 for i in range(len(keys))], keys)
    axis.set_yscale("log")
    axis.set_ylabel("rows per second")
    axis.set_title("2 workers on loopback, 2 shared cores", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(HERE, "multi_worker.png"), dpi=120)


if __name__ == "__main__":
    main()
