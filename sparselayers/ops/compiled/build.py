"""Building the C++ kernels on first use, caching the library, falling back.

The sources ship in the package (``kernels.cc``, ``block_kernels.cc``,
``conv_kernels.cc`` and their header ``common.h``). The first process that
asks for a compiled kernel compiles them with the machine's C++ compiler
(``CXX``, split as a shell would, else ``g++``, ``c++`` or ``clang++``)
against the installed TensorFlow (``tf.sysconfig`` flags), as
``torch.utils.cpp_extension.load`` does, and caches the library in this
account's folder ``<cache folder>/compiled-uid<uid>/``, one file per
source, TensorFlow version, compiler and CPU flags, with the SHA-256 of its
content beside it (``<library>.sha256``). The build writes a temporary
file and renames it into place (``os.replace``) under a file lock, so two
processes building at once compile once and never load half a file. Later
processes load the cached file in milliseconds.

A library is loaded only if it is a regular file (no symbolic link) of
this account that no other account can write, in a folder of this account
that no other can write, and its content matches the hash its build
recorded (:func:`open_checked`); the checked file itself is loaded, through
its descriptor, so the name cannot be swapped in between. A library that
fails the check is rebuilt; a folder that fails it gets a build in a
private temporary folder for the process.

Anything that goes wrong (no compiler, a failed build, a library TF will
not load or that lacks the ops) leaves one warning naming the cause, and
the compiled kernels compute with their pure-TF twins instead;
``SPARSELAYERS_COMPILED_KERNELS=0`` switches them off without trying.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from sparselayers._cache import cache_folder
from sparselayers._env import flag

#: Environment variable: ``0`` (or ``false``, ``no``, ``off``) switches the compiled kernels off.
ENABLED_ENV = "SPARSELAYERS_COMPILED_KERNELS"
#: The C++ sources, next to this module, compiled into one library.
SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("kernels.cc", "block_kernels.cc", "conv_kernels.cc", "tower_kernels.cc"))
#: Headers they include: part of the cache key, not compiled alone.
HEADERS = (pathlib.Path(__file__).with_name("common.h"),)
#: The ops the kernels call; a library that lacks one is not used.
OPS = ("sparselayers_row_axpy", "sparselayers_sampled_dot", "sparselayers_block_matmul", "sparselayers_block_grad")
#: Beside each library, in ``sha256sum``'s format: the SHA-256 of the file its build wrote.
HASH_SUFFIX = ".sha256"
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
# Opened without following a symbolic link in the last component.
_NO_LINK = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why."""


def enabled() -> bool:
    """False when ``SPARSELAYERS_COMPILED_KERNELS`` is ``0``, ``false``, ``no`` or ``off``."""
    return flag(ENABLED_ENV, default=True)


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


def library_folder() -> pathlib.Path:
    """This account's folder of libraries, ``<cache folder>/compiled-uid<uid>``.

    One folder per account: a cache folder shared between accounts serves
    each with its own build, and no account loads another's library.

    >>> library_folder().name.startswith("compiled")
    True
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    return cache_folder().expanduser().absolute() / ("compiled" if uid is None else f"compiled-uid{uid}")


def _load_or_fall_back() -> Any | None:
    if not enabled():
        logger.info("Compiled kernels switched off (%s=0): using the pure-TensorFlow kernels.", ENABLED_ENV)
        return None
    try:
        path = cached_library(library_folder())
        module = load(path)
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


def load(path: pathlib.Path) -> Any:
    """The op library at ``path``, once :func:`open_checked` accepts it.

    Raises:
        BuildError: the file fails a check, or lacks one of :data:`OPS`.
    """
    descriptor = open_checked(path)
    # The checked file itself, by its descriptor where the system names one:
    # the name could point elsewhere by now. The descriptor stays open for
    # the life of the process, since TF and the dynamic loader remember a
    # library by its name, and a reused number would name another file.
    by_descriptor = f"/proc/self/fd/{descriptor}"
    try:
        module = tf.load_op_library(by_descriptor if os.path.exists(by_descriptor) else str(path))
    except BaseException:
        os.close(descriptor)
        raise
    missing = [op for op in OPS if not hasattr(module, op)]
    if missing:
        raise BuildError(f"{path} loaded but holds no {', '.join(missing)}")
    return module


def compiler() -> list[str]:
    """The C++ compiler command: ``CXX`` split as a shell would (``ccache g++``), else g++, c++ or clang++."""
    try:
        command = shlex.split(os.environ.get("CXX", ""))
    except ValueError as error:
        raise BuildError(f"CXX={os.environ['CXX']!r} does not split as a shell command: {error}") from error
    if command:
        return command
    found = next((found for name in ("g++", "c++", "clang++") if (found := shutil.which(name))), None)
    if not found:
        raise BuildError("no C++ compiler found; install g++ or set CXX")
    return [found]


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


def library_name(cxx: Sequence[str]) -> str:
    """The cache file name: TF version and a hash of the source, flags, compiler command and CPU."""
    version = _run([*cxx, "--version"])
    if version.returncode != 0:
        raise BuildError(f"{shlex.join(cxx)} --version failed (exit {version.returncode})")
    key = json.dumps(
        [
            [path.read_text(encoding="utf-8") for path in (*SOURCES, *HEADERS)],
            tf.__version__,
            tf.sysconfig.get_compile_flags(),
            tf.sysconfig.get_link_flags(),
            list(cxx),
            version.stdout,
            _cpu_flags(),
            BASE_OPTIONS,
            ARCH_OPTIONS,
        ]
    )
    return f"sparselayers_kernels-tf{tf.__version__}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def compile_library(cxx: Sequence[str], target: pathlib.Path) -> None:
    """Compiles the sources into ``target``, trying :data:`ARCH_OPTIONS` in order."""
    flags = [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    errors = []
    for arch in ARCH_OPTIONS:
        result = _run([*cxx, *BASE_OPTIONS, *arch, *map(str, SOURCES), "-o", str(target), *flags])
        if result.returncode == 0 and target.is_file():
            return
        errors.append(result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"])
    names = ", ".join(path.name for path in SOURCES)
    raise BuildError(f"{shlex.join(cxx)} failed to compile {names}: {errors[-1][0]}")


def open_checked(path: pathlib.Path) -> int:
    """A read-only descriptor on the library at ``path``, if it may be loaded.

    It may if it is a regular file, not a symbolic link, of this account and
    writable by no other, in a folder of this account that no other can
    write, and its SHA-256 is the one its build recorded beside it
    (``<path>.sha256``).

    Raises:
        FileNotFoundError: the library or its hash is missing (not built yet).
        BuildError: it fails a check; the message names which.
    """
    folder = _open_folder(path.parent)
    try:
        library = _open_file(folder, path.name, str(path))
        try:
            recorded = _open_file(folder, path.name + HASH_SUFFIX, f"{path}{HASH_SUFFIX}")
            try:
                words = os.read(recorded, 4096).decode("utf-8", "replace").split()
            finally:
                os.close(recorded)
            if words != [_sha256(library), path.name]:
                raise BuildError(f"{path} is not the file its build recorded (its SHA-256 differs)")
        except BaseException:
            os.close(library)
            raise
        return library
    finally:
        os.close(folder)


def _open_folder(path: pathlib.Path) -> int:
    """A descriptor on the folder ``path``, if it is this account's and no other can write in it."""
    what = f"folder {path}"
    return _private(_open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), what), what, directory=True)


def _open_file(folder: int, name: str, what: str) -> int:
    """A descriptor on the file ``name`` in the open ``folder``, if it is this account's and no other can write it."""
    return _private(_open(name, os.O_RDONLY, what, folder=folder), what, directory=False)


def _open(name: str | pathlib.Path, flags: int, what: str, folder: int | None = None) -> int:
    try:
        return os.open(name, flags | _NO_LINK, dir_fd=folder)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a link (EMLINK on FreeBSD)
            raise BuildError(f"{what} is a symbolic link") from error
        raise


def _private(descriptor: int, what: str, directory: bool) -> int:
    """``descriptor`` if it is a folder (or a regular file) of this account that no other can write; else BuildError."""
    try:
        status = os.fstat(descriptor)
        if not (stat.S_ISDIR if directory else stat.S_ISREG)(status.st_mode):
            raise BuildError(f"{what} is not a {'folder' if directory else 'regular file'}")
        if status.st_uid != os.getuid():
            raise BuildError(f"{what} belongs to uid {status.st_uid}, not to this account (uid {os.getuid()})")
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BuildError(f"{what} is writable by others (mode {stat.S_IMODE(status.st_mode):o})")
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _sha256(descriptor: int) -> str:
    digest, offset = hashlib.sha256(), 0
    while block := os.pread(descriptor, 1 << 20, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def cached_library(folder: pathlib.Path) -> pathlib.Path:
    """The library for this machine in ``folder``, compiled first if missing or failing :func:`open_checked`.

    ``folder`` is created private to this account. Compiles under an
    exclusive lock on a file beside the library, into a temporary file
    renamed into place; a process that waited for the lock finds the file
    built. A folder that cannot be written, or that another account could
    write, gets a build in a private temporary folder, used by this process
    only.
    """
    if os.open not in os.supports_dir_fd:
        raise BuildError("checking a library before loading it needs os.open(dir_fd=...), missing on this system")
    cxx = compiler()
    name = library_name(cxx)
    path = folder / name
    with contextlib.suppress(OSError, BuildError):  # the usual case; the rest below, under the lock
        os.close(open_checked(path))
        return path
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = _open_folder(folder)
    except (OSError, BuildError) as error:
        private = pathlib.Path(tempfile.mkdtemp(prefix="sparselayers-kernels-"))
        logger.warning(
            "sparselayers: cannot write or trust %s (%s); building into %s for this process. Point %s to a "
            "folder of this account that others cannot write, to keep the build for later processes.",
            folder, error, private, "SPARSELAYERS_CACHE_DIR",
        )
        return _build(cxx, private / name)
    try:
        with _exclusive(descriptor, name + ".lock"):
            try:
                os.close(open_checked(path))  # built by another process while this one waited
                return path
            except FileNotFoundError:
                pass
            except BuildError as error:
                logger.warning("sparselayers: %s; rebuilding it.", error)
            return _build(cxx, path)
    finally:
        os.close(descriptor)


def _build(cxx: Sequence[str], path: pathlib.Path) -> pathlib.Path:
    logger.warning(
        "sparselayers: compiling its CPU kernels with %s, once per TensorFlow version, compiler and CPU "
        "(10 to 30 s, more on a busy machine; cached in %s). Set %s=0 to use the pure-TensorFlow kernels "
        "without compiling.",
        shlex.join(cxx),
        path.parent,
        ENABLED_ENV,
    )
    start = time.perf_counter()
    library, recorded = _temporary(path), _temporary(path)
    try:
        compile_library(cxx, library)
        library.chmod(0o755)  # a library's usual mode, whatever the compiler and umask left
        recorded.write_text(f"{hashlib.sha256(library.read_bytes()).hexdigest()}  {path.name}\n", encoding="utf-8")
        os.replace(library, path)
        os.replace(recorded, path.with_name(path.name + HASH_SUFFIX))
    finally:
        for temporary in (library, recorded):
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    logger.warning("sparselayers: compiled CPU kernels built in %.1f s: %s", time.perf_counter() - start, path)
    return path


def _temporary(path: pathlib.Path) -> pathlib.Path:
    """A new empty file beside ``path``, to be renamed into place."""
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    return pathlib.Path(temporary)


@contextlib.contextmanager
def _exclusive(folder: int, name: str) -> Iterator[None]:
    """An exclusive advisory lock on the file ``name`` in the open ``folder`` (created if needed)."""
    import fcntl  # POSIX, as the dir_fd opens that lead here

    handle = os.open(name, os.O_RDWR | os.O_CREAT | _NO_LINK, 0o600, dir_fd=folder)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock
