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


@pytest.mark.parametrize("script", ["train_fit.py", "train_loop.py"])
def test_docs_script_on_two_workers_agrees_with_one_process(script, tmp_path):
    scripts = docs_scripts()
    folders = [tmp_path / "cluster", tmp_path / "single"]
    for folder in folders:
        folder.mkdir()
        for name, text in scripts.items():
            (folder / name).write_text(text)
        subprocess.run([sys.executable, "make_toy_data.py"], cwd=folder, check=True, timeout=120, env=ENV)
    ports = free_ports(2)
    results = run_processes(
        [[sys.executable, script]] * 3,
        [{"TF_CONFIG": tf_config(ports, 0)}, {"TF_CONFIG": tf_config(ports, 1)}, {}],
        timeout=300,
        cwds=[str(folders[0])] * 2 + [str(folders[1])],
    )
    for name, (code, _, err) in zip(("worker 0", "worker 1", "single process"), results):
        assert code == 0, f"{name} of {script} exited with {code}:\n{err[-4000:]}"
    fingerprints = [printed(out, "pattern fingerprint") for _, out, _ in results]
    losses = [float(printed(out, "final loss")) for _, out, _ in results]
    assert fingerprints[0] == fingerprints[1] == fingerprints[2]
    assert losses[0] == pytest.approx(losses[2], rel=1e-4)
