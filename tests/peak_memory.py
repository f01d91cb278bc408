"""Peak memory of the current process, for the subprocess memory tests.

``resource.getrusage(...).ru_maxrss`` survives ``execve``: a child started
from a large pytest process reports the parent's size as its own peak, which
hides any growth below it. ``VmHWM`` belongs to the process's own address
space, and writing 5 to ``/proc/self/clear_refs`` resets it to the current
size (Linux 4.0 and later).
"""

from __future__ import annotations


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def start() -> int:
    """Resets the peak to the current size; returns the current size in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def growth_kib(start_kib: int) -> int:
    """How far the peak rose above ``start_kib`` (from :func:`start`) since then."""
    return _status_kib("VmHWM") - start_kib
