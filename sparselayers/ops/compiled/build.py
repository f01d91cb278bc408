"""Building the C++ kernels on first use, caching the library, falling back.

The sources ship in the package (``kernels.cc``, ``block_kernels.cc``,
``conv_kernels.cc`` and their header ``common.h``). The first process that
asks for a compiled kernel compiles them with the machine's C++ compiler
(``CXX``, else ``g++``, ``c++`` or ``clang++``) against the installed
TensorFlow (``tf.sysconfig`` flags), as ``torch.utils.cpp_extension.load``
does, and caches the library in ``<cache folder>/compiled/``, one file per
source, TensorFlow version, compiler and CPU flags. The build writes a
temporary file and renames it into place (``os.replace``) under a file
lock, so two processes building at once compile once and never load half
a file. Later processes load the cached file in milliseconds.

Anything that goes wrong (no compiler, a failed build, a library TF will
not load) leaves one warning naming the cause, and the compiled kernels
compute with their pure-TF twins instead; ``SPARSELAYERS_COMPILED_KERNELS=0``
switches them off without trying.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from sparselayers._cache import cache_folder

#: Environment variable: ``0`` (or ``false``, ``no``, ``off``) switches the compiled kernels off.
ENABLED_ENV = "SPARSELAYERS_COMPILED_KERNELS"
#: The C++ sources, next to this module, compiled into one library.
SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("kernels.cc", "block_kernels.cc", "conv_kernels.cc"))
#: Headers they include: part of the cache key, not compiled alone.
HEADERS = (pathlib.Path(__file__).with_name("common.h"),)
#: Seconds one compiler run may take before the build counts as failed.
BUILD_TIMEOUT = 600
#: Target options tried in order: the CPU's own instructions first. g++ 12
#: cannot compile Eigen's headers with AVX512-FP16 enabled (Intel Sapphire
#: Rapids and later), hence the second flag; compilers that do not know it
#: reject the first set at once and take the next.
ARCH_OPTIONS = (("-march=native", "-mno-avx512fp16"), ("-march=native",), ())
#: Options of every build: optimised, position-independent, vectorised
#: ``omp simd`` loops without an OpenMP runtime, TF's headers' warnings off.
BASE_OPTIONS = ("-std=c++17", "-shared", "-fPIC", "-O3", "-fopenmp-simd", "-w")

logger = logging.getLogger("sparselayers.compiled")

_lock = threading.Lock()
_state: dict[str, Any] = {}


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why."""


def enabled() -> bool:
    """False when ``SPARSELAYERS_COMPILED_KERNELS`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENABLED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> Any | None:
    """The loaded op library, building it on the first call; None when unavailable.

    Decided once per process: the first call builds or loads, and logs one
    line if the compiled kernels cannot be used.
    """
    if "library" in _state:
        return _state["library"]
    with _lock:
        if "library" not in _state:
            _state["library"] = _load_or_fall_back()
    return _state["library"]


def available() -> bool:
    """Whether the compiled kernels run in this process (builds them if needed)."""
    return library() is not None


def library_path() -> pathlib.Path | None:
    """The file the op library was loaded from, or None."""
    return _state.get("path") if available() else None


def _load_or_fall_back() -> Any | None:
    if not enabled():
        logger.info("Compiled kernels switched off (%s=0): using the pure-TensorFlow kernels.", ENABLED_ENV)
        return None
    try:
        path = cached_library(cache_folder().expanduser().absolute() / "compiled")
        module = tf.load_op_library(str(path))
    except (BuildError, OSError, tf.errors.OpError) as error:
        logger.warning(
            "sparselayers: compiled CPU kernels unavailable, using the pure-TensorFlow kernels (%s). "
            "Set %s=0 to skip the attempt.",
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
            ENABLED_ENV,
        )
        return None
    _state["path"] = path
    return module


def compiler() -> str:
    """The C++ compiler: ``CXX``, else the first of g++, c++, clang++ on the PATH."""
    chosen = os.environ.get("CXX") or next(
        (found for name in ("g++", "c++", "clang++") if (found := shutil.which(name))), None
    )
    if not chosen:
        raise BuildError("no C++ compiler found; install g++ or set CXX")
    return chosen


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{command[0]} could not run: {error}") from error


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_name(cxx: str) -> str:
    """The cache file name: TF version and a hash of the source, flags, compiler and CPU."""
    version = _run([cxx, "--version"])
    if version.returncode != 0:
        raise BuildError(f"{cxx} --version failed (exit {version.returncode})")
    key = json.dumps(
        [
            [path.read_text(encoding="utf-8") for path in (*SOURCES, *HEADERS)],
            tf.__version__,
            tf.sysconfig.get_compile_flags(),
            tf.sysconfig.get_link_flags(),
            cxx,
            version.stdout,
            _cpu_flags(),
            BASE_OPTIONS,
            ARCH_OPTIONS,
        ]
    )
    return f"sparselayers_kernels-tf{tf.__version__}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def compile_library(cxx: str, target: pathlib.Path) -> None:
    """Compiles the sources into ``target``, trying :data:`ARCH_OPTIONS` in order."""
    flags = [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    errors = []
    for arch in ARCH_OPTIONS:
        result = _run([cxx, *BASE_OPTIONS, *arch, *map(str, SOURCES), "-o", str(target), *flags])
        if result.returncode == 0 and target.is_file():
            return
        errors.append(result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"])
    raise BuildError(f"{cxx} failed to compile {', '.join(path.name for path in SOURCES)}: {errors[-1][0]}")


def cached_library(folder: pathlib.Path) -> pathlib.Path:
    """The library for this machine in ``folder``, compiled first if missing.

    Compiles under an exclusive lock on a file beside it, into a temporary
    file renamed into place; a process that waited for the lock finds the
    file built. A folder it cannot write gets a build in a private
    temporary folder, used by this process only.
    """
    cxx = compiler()
    name = library_name(cxx)
    path = folder / name
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _exclusive(folder / (name + ".lock"))
        lock.__enter__()
    except OSError as error:
        private = pathlib.Path(tempfile.mkdtemp(prefix="sparselayers-kernels-"))
        logger.warning("sparselayers: cannot write %s (%s); building into %s for this process.", folder, error, private)
        return _build(cxx, private / name)
    try:
        if path.is_file():  # built by another process while this one waited
            return path
        return _build(cxx, path)
    finally:
        lock.__exit__(None, None, None)


def _build(cxx: str, path: pathlib.Path) -> pathlib.Path:
    logger.warning(
        "sparselayers: compiling its CPU kernels with %s, once per TensorFlow version, compiler and CPU "
        "(10 to 30 s, more on a busy machine; cached in %s).",
        cxx,
        path.parent,
    )
    start = time.perf_counter()
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        compile_library(cxx, pathlib.Path(temporary))
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    logger.warning("sparselayers: compiled CPU kernels built in %.1f s: %s", time.perf_counter() - start, path)
    return path


@contextlib.contextmanager
def _exclusive(path: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed); none where fcntl is missing."""
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: os.replace alone keeps the file whole
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
