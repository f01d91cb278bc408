"""MultiWorkerMirroredStrategy with real worker processes on loopback (see tests/cluster.py).

Each cluster launch is combined with a single-process reference run of the
same script, and several tests read one launch's results.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.cluster import ENV, ROOT, free_ports, run_processes, tf_config

WORKER = os.path.join(ROOT, "tests", "mwms_worker.py")


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fit_runs():
    """Two workers and one single process run tests/mwms_worker.py side by side."""
    ports = free_ports(2)
    results = run_processes(
        [[sys.executable, WORKER, "cluster"]] * 2 + [[sys.executable, WORKER, "single"]],
        [{"TF_CONFIG": tf_config(ports, 0)}, {"TF_CONFIG": tf_config(ports, 1)}, {}],
        timeout=300,
    )
    for name, (code, _, err) in zip(("worker 0", "worker 1", "single process"), results):
        assert code == 0, f"{name} exited with {code}:\n{err[-4000:]}"
    return [last_json(out) for _, out, _ in results]


def largest_difference(a, b):
    return max(float(np.abs(np.subtract(u, v)).max()) for u, v in zip(a["weights"], b["weights"]))


@pytest.mark.parametrize("name", ["dense", "sparse", "rigl"])
def test_fit_on_two_workers_matches_one_process(fit_runs, name):
    first, second, single = (run[name] for run in fit_runs)
    assert largest_difference(first, second) == 0.0  # the workers hold one model
    assert first["patterns"] == second["patterns"] == single["patterns"]
    assert largest_difference(first, single) < 1e-5  # global batch 64 = two shares of 32
    assert first["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert single["loss"][-1] < single["loss"][0]


def test_fit_from_memmap_and_hdf5_files_reads_one_share_per_worker(fit_runs):
    first, second = (run["pipeline"] for run in fit_runs[:2])
    reference = fit_runs[2]["sparse"]  # fit(x, y, batch_size=64, shuffle=False) in memory, on one process
    assert not set(first["rows"]) & set(second["rows"])  # each worker read only its share...
    assert sorted(first["rows"] + second["rows"]) == list(range(256))  # ...and together, every row
    assert first["patterns"] == second["patterns"] == reference["patterns"]
    assert largest_difference(first, second) == 0.0
    assert largest_difference(first, reference) < 1e-5


def test_rigl_grows_by_the_global_gradient_on_every_worker(fit_runs):
    first, second, single = (run["rigl"] for run in fit_runs)
    assert sum(update["new"] for update in single["updates"]) > 0  # the pattern did evolve
    assert first["updates"] == second["updates"] == single["updates"]


def test_rigl_in_a_custom_loop_agrees_with_one_process(fit_runs):
    first, second, single = (run["loop rigl"] for run in fit_runs)
    assert first["step"] == single["step"] == 16
    assert sum(update["new"] for update in single["updates"]) > 0
    assert without_names(first["updates"]) == without_names(second["updates"]) == without_names(single["updates"])
    assert first["patterns"] == second["patterns"] == single["patterns"]
    assert largest_difference(first, second) == 0.0
    assert largest_difference(first, single) < 1e-5


@pytest.mark.parametrize("run", ["set", "loop set"])
def test_set_with_a_fresh_seed_agrees_across_workers(fit_runs, run):
    first, second, _ = (result[run] for result in fit_runs)
    assert sum(update["new"] for update in first["updates"]) > 0
    assert first["patterns"] == second["patterns"]  # both drew from the chief's seed
    assert largest_difference(first, second) == 0.0


def test_workaround_is_announced_once_naming_the_upstream_issue(fit_runs):
    first, second, single = fit_runs
    for worker in (first, second):
        assert len(worker["announcements"]) == 1
        assert "keras-team/keras#20585" in worker["announcements"][0]
    assert single["announcements"] == []  # no strategy: Keras' own code ran


def without_names(updates):
    return [{key: value for key, value in update.items() if key != "layer"} for update in updates]


def run_resumable(backup, die_at_epoch):
    ports = free_ports(2)
    return run_processes(
        [[sys.executable, WORKER, "resume", str(backup), str(die_at_epoch)]] * 2,
        [{"TF_CONFIG": tf_config(ports, index)} for index in range(2)],
        timeout=240,
    )


def test_lost_worker_restart_resumes_from_the_backup_and_ends_as_an_uninterrupted_run(fit_runs, tmp_path):
    dead, survivor = run_resumable(tmp_path, die_at_epoch=2)[::-1]
    assert dead[0] == 17, dead[2][-3000:]  # worker 1 vanished at the start of epoch 2
    assert survivor[0] != 0, survivor[2][-3000:]
    failure = last_json(survivor[1])
    # The survivor does not hang: its next collective fails once the peer's
    # heartbeats stop (or, for a peer that hangs, after the collective timeout).
    assert failure["error"] in ("UnavailableError", "DeadlineExceededError"), failure
    assert failure["waited"] < 120

    restarted = run_resumable(tmp_path, die_at_epoch=0)
    for code, _, err in restarted:
        assert code == 0, err[-3000:]
    first, second = (last_json(out)["rigl"] for _, out, _ in restarted)
    uninterrupted = fit_runs[2]["rigl"]
    # Epochs 0 and 1 (steps 1-8) came from the backup: the schedule goes on at step 10.
    later = [u for u in uninterrupted["updates"] if u["step"] > 8]
    assert first["updates"] == second["updates"]
    assert without_names(first["updates"]) == without_names(later)  # layer names count models per process
    assert first["patterns"] == second["patterns"] == uninterrupted["patterns"]
    assert largest_difference(first, uninterrupted) < 1e-5


def docs_scripts():
    """The scripts of docs/distributed.md, by the file name on their first line."""
    page = open(os.path.join(ROOT, "docs", "distributed.md")).read()
    blocks = re.findall(r"```python\n# (\w+\.py)\n(.+?)```", page, flags=re.S)
    return dict(blocks)


def printed(out, label):
    return [line[len(label) + 1 :] for line in out.splitlines() if line.startswith(label + " ")][-1]


# Runs a docs script; worker 1 vanishes right after its CheckpointManager's DIE_AFTER_SAVES-th save.
DYING = """
import json, os, runpy, sys
import tensorflow as tf
if os.environ.get("DIE_AFTER_SAVES"):
    save, saves = tf.train.CheckpointManager.save, []
    def dying_save(self, *args, **kwargs):
        path = save(self, *args, **kwargs)
        saves.append(path)
        if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1 and len(saves) == int(os.environ["DIE_AFTER_SAVES"]):
            os._exit(17)
        return path
    tf.train.CheckpointManager.save = dying_save
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def write_docs_scripts(folder):
    folder.mkdir()
    for name, text in docs_scripts().items():
        (folder / name).write_text(text)
    subprocess.run([sys.executable, "make_toy_data.py"], cwd=folder, check=True, timeout=120, env=ENV)


def run_docs_script(script, folders, envs):
    """Runs ``script`` in each folder with each env; two TF_CONFIG workers share one fresh cluster."""
    ports = free_ports(2)
    envs = [
        {**{k: v for k, v in env.items() if k != "worker"}, "TF_CONFIG": tf_config(ports, env["worker"])}
        if "worker" in env
        else env
        for env in envs
    ]
    return run_processes([[sys.executable, "-c", DYING, script]] * len(envs), envs, timeout=300,
                         cwds=[str(folder) for folder in folders])


def outcome(out):
    return printed(out, "pattern fingerprint"), float(printed(out, "final loss"))


def test_docs_fit_script_on_two_workers_agrees_with_one_process(tmp_path):
    cluster, single = tmp_path / "cluster", tmp_path / "single"
    write_docs_scripts(cluster)
    write_docs_scripts(single)
    results = run_docs_script("train_fit.py", [cluster, cluster, single], [{"worker": 0}, {"worker": 1}, {}])
    for name, (code, _, err) in zip(("worker 0", "worker 1", "single process"), results):
        assert code == 0, f"{name} exited with {code}:\n{err[-4000:]}"
    (first, loss), (second, _), (reference, reference_loss) = (outcome(out) for _, out, _ in results)
    assert first == second == reference  # the patterns agree, and equal one process's
    assert loss == pytest.approx(reference_loss, rel=1e-4)


def test_docs_custom_loop_on_two_workers_survives_a_lost_worker_and_ends_as_one_process(tmp_path):
    cluster, single = tmp_path / "cluster", tmp_path / "single"
    write_docs_scripts(cluster)
    write_docs_scripts(single)
    # Worker 1 dies after saving epoch 2's checkpoint; one process runs uninterrupted beside them.
    dying = {"DIE_AFTER_SAVES": "2"}
    (survivor, dead, uninterrupted) = run_docs_script(
        "train_loop.py", [cluster, cluster, single], [{"worker": 0, **dying}, {"worker": 1, **dying}, {}]
    )
    assert dead[0] == 17, dead[2][-3000:]
    assert survivor[0] != 0 and ("UnavailableError" in survivor[2] or "DeadlineExceeded" in survivor[2]), survivor[2][-3000:]
    assert uninterrupted[0] == 0, uninterrupted[2][-3000:]
    restarted = run_docs_script("train_loop.py", [cluster, cluster], [{"worker": 0}, {"worker": 1}])
    for code, out, err in restarted:
        assert code == 0, err[-3000:]
        assert "epoch 0:" not in out and "epoch 1:" not in out  # resumed at epoch 2
    (first, loss), (second, _) = (outcome(out) for _, out, _ in restarted)
    reference, reference_loss = outcome(uninterrupted[1])
    assert first == second == reference
    assert loss == pytest.approx(reference_loss, rel=1e-4)
