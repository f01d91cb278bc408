"""Launching worker processes of a MultiWorkerMirroredStrategy cluster on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 (held together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def run_processes(
    commands: list[list[str]], envs: list[dict], timeout: float, cwds: list[str] | None = None
) -> list[tuple[int, str, str]]:
    """Runs the commands side by side; returns ``(returncode, stdout, stderr)`` of each.

    Every process is killed at ``timeout`` seconds after the start or when
    this function leaves by an exception, so none outlives a test.
    """
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **env}, cwd=cwd
        )
        for command, env, cwd in zip(commands, envs, cwds or [None] * len(commands))
    ]
    results = []
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            try:
                out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other in processes:
                    other.kill()
                out, err = process.communicate()
                err += f"\n[killed after {timeout} s]"
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def run_cluster(script: str, args: list[str], workers: int = 2, timeout: float = 240, env: dict | None = None):
    """Runs ``script`` as every worker of a fresh loopback cluster; the last JSON line each printed.

    Raises:
        AssertionError: a worker failed; its stderr's end is in the message.
    """
    ports = free_ports(workers)
    results = run_processes(
        [[sys.executable, "-c", script, *args]] * workers,
        [{**(env or {}), "TF_CONFIG": tf_config(ports, index)} for index in range(workers)],
        timeout,
    )
    for index, (code, _, err) in enumerate(results):
        assert code == 0, f"worker {index} exited with {code}:\n{err[-4000:]}"
    return [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
