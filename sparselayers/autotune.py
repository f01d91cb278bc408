"""Kernel choice measured on the user's device: :func:`autotune` and its disk cache.

The ``kernel="auto"`` rule (:func:`sparselayers.ops.choose_kernel`) is a set
of thresholds fitted on one CPU. :func:`autotune` instead times every
eligible kernel of every :class:`~sparselayers.SparseDense` of a model as a
training step, on the device where the model runs, and sets each layer to
the fastest. Measurements are cached on disk, keyed by what makes them
valid elsewhere: the device, the TensorFlow and sparselayers versions, the
pattern's fingerprint, the dtype and the batch rounded up to a power of two.
A ``kernel="auto"`` layer called later (in this process or another) takes
the cached choice through :func:`kernel_for_call`, so the next run needs no
timing; with nothing cached, the static rule stays the default.

Environment variables:

* ``SPARSELAYERS_CACHE_DIR``: the folder of ``autotune.json``. Default: the
  user's cache folder, ``$XDG_CACHE_HOME/sparselayers`` or
  ``~/.cache/sparselayers`` (``%LOCALAPPDATA%\\sparselayers\\Cache`` on
  Windows, ``~/Library/Caches/sparselayers`` on macOS).
* ``SPARSELAYERS_AUTOTUNE_CACHE=0``: no cache at all; :func:`autotune`
  always measures and writes nothing, and ``kernel="auto"`` layers follow
  the static rule.

A saved model keeps ``kernel="auto"`` in its config: a measured choice
belongs to a device, not to a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers import seams
from sparselayers._cache import CACHE_DIR_ENV, _cache_folder
from sparselayers._env import flag
from sparselayers._validation import check_int
from sparselayers.ops import KERNELS, check_kernel_name, get_kernel
from sparselayers.ops.choose import DENSE_PRODUCT_KERNELS, fits_dense
from sparselayers.ops.context import observing_layers
from sparselayers.sparsity_pattern import SparsityPattern
from sparselayers.structure import detect_blocks

#: Environment variable: ``0`` (or ``false``, ``no``, ``off``) disables the cache.
CACHE_ENABLED_ENV = "SPARSELAYERS_AUTOTUNE_CACHE"
CACHE_FILE = "autotune.json"
#: Marks a cache file as ours; any other JSON is foreign and ignored.
CACHE_FORMAT = "sparselayers-autotune"
CACHE_VERSION = 1

#: A candidate slower than this multiple of the fastest in the first round
#: is not timed again: it cannot win, and slow kernels dominate the time.
PRUNE_RATIO = 3.0
#: Kernels whose estimated temporaries exceed this share of the available
#: host memory are skipped (see :func:`_transient_bytes`).
MEMORY_FRACTION = 0.5
#: The default timer first runs untimed steps lasting this long (one at
#: least): the first steps after another kernel refill the caches it evicted,
#: which a training loop never pays. It drops the slowest of them, not all:
#: after a 4096 x 4096 dense step, the block-diagonal layer's next ten steps
#: (about 6 ms each) ran 40%, 19%, 13%, ... 3% slow; with this warm-up the
#: round's mean is about 7% high, without it 23%, and kernels within that of
#: each other are equally good choices...
WARMUP_SECONDS = 0.01
#: ...then repeats a step until a round lasts this long...
MIN_ROUND_SECONDS = 0.02
#: ...or this many consecutive steps.
MAX_STEPS = 50

#: Times one round of one kernel: called with the layer's path, the kernel
#: name and ``step`` (runs one synchronised training step); returns the mean
#: milliseconds per step of the consecutive steps it ran.
Timer = Callable[[str, str, Callable[[], None]], float]


# Report ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerTiming:
    """What :func:`autotune` measured and chose for one layer.

    Attributes:
        layer: the layer's path in the model, e.g. ``"model/towers/tower_layer_1"``.
        shape: the pattern's ``(input_dim, units)``.
        nnz: the pattern's entries.
        structure: the structure detected in the pattern.
        fingerprint: :attr:`SparsityPattern.fingerprint`, part of the cache key.
        batch: rows of the layer's (flattened) input in the call on ``x``.
        dtype: the dtype the layer computes in.
        ms: median milliseconds of one training step per kernel tried.
        skipped: kernels not timed, with the reason.
        chosen: the kernel the layer now uses.
        source: ``"measured"``, ``"cache"``, or why the layer was left as it was.
    """

    layer: str
    shape: tuple[int, int]
    nnz: int
    structure: str
    fingerprint: str
    batch: int | None
    dtype: str
    ms: dict[str, float]
    skipped: dict[str, str]
    chosen: str
    source: str


@dataclasses.dataclass(frozen=True)
class AutotuneReport:
    """The result of :func:`autotune`: one :class:`LayerTiming` per layer.

    ``print(report)`` shows a table (milliseconds per training step, ``-``
    for kernels not timed); :meth:`to_dict` gives plain data for JSON.

    Attributes:
        device: description of the device measured on (part of the cache key).
        tf_version: TensorFlow's version.
        rows: one :class:`LayerTiming` per SparseDense, in call order.
    """

    device: str
    tf_version: str
    rows: list[LayerTiming]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> LayerTiming:
        return self.rows[index]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: ``{"device", "tf_version", "layers": [...]}``."""
        return {
            "device": self.device,
            "tf_version": self.tf_version,
            "layers": [{**dataclasses.asdict(row), "shape": list(row.shape)} for row in self.rows],
        }

    def __str__(self) -> str:
        kernels = [name for name in _candidate_names() if any(name in row.ms for row in self.rows)]
        header = ["layer", "shape", "nnz", "structure", "batch", "dtype", *kernels, "chosen", "from"]
        table = [header]
        for row in self.rows:
            table.append(
                [
                    row.layer,
                    f"{row.shape[0]}x{row.shape[1]}",
                    str(row.nnz),
                    row.structure if len(row.structure) <= 24 else row.structure[:23] + "~",
                    "-" if row.batch is None else str(row.batch),
                    row.dtype,
                    *[f"{row.ms[k]:.3g}" if k in row.ms else "-" for k in kernels],
                    row.chosen,
                    row.source,
                ]
            )
        widths = [max(len(line[c]) for line in table) for c in range(len(header))]
        numeric = {1, 2, 4} | set(range(6, 6 + len(kernels)))
        lines = [
            "  ".join(cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(line, widths)))
            for line in table
        ]
        title = f"sl.autotune on {self.device}, TensorFlow {self.tf_version}: ms per training step (median)"
        return "\n".join([title, *[line.rstrip() for line in lines]])


# The tuning -------------------------------------------------------------------


def autotune(
    model: keras.layers.Layer,
    x: Any,
    *,
    rounds: int = 5,
    refresh: bool = False,
    cache: bool = True,
    timer: Timer | None = None,
) -> AutotuneReport:
    """Times every eligible kernel of every SparseDense in ``model`` and keeps the fastest.

    ``model`` is called once on ``x`` to find each SparseDense (also inside
    :class:`~sparselayers.Towers` and nested models) with the batch and
    dtype it sees. For each layer built with ``kernel="auto"``, every kernel
    of :data:`sparselayers.ops.KERNELS` that accepts the pattern and the
    batch, and whose temporaries fit in memory, is timed as a training step:
    forward and gradients w.r.t. the values and the input, on the device
    holding the layer's variables. Timing is in steady state: several
    consecutive steps of one kernel, then the next, round after round; the
    median per kernel wins and the layer is set to it with
    :meth:`SparseDense.set_kernel`. Results are those of the static rule up
    to float rounding: every kernel computes the same product.

    A kernel class may list ``variants``: names (accepted by
    :func:`sparselayers.ops.get_kernel` and ``set_kernel``) of other
    strategies, timed like any kernel.

    Measurements go to the disk cache (see :mod:`sparselayers.autotune`), and
    a cached measurement is reused instead of timing again. Layers with a
    forced ``kernel=`` are left as they are. The model's traced train, test
    and predict functions are rebuilt so that they use the new kernels.

    Args:
        model: a Keras model or layer containing SparseDense layers.
        x: a batch ``model`` accepts, at the batch size to tune for.
        rounds: rounds of timing per kernel; the median is kept.
        refresh: measure even when the cache has a measurement.
        cache: read and write the disk cache; ``False`` only measures.
        timer: replaces the wall clock (see :data:`Timer`), for tests.

    Returns:
        An :class:`AutotuneReport`, printable as a table.

    Raises:
        TypeError: ``model`` is not a Keras layer or model.
        ValueError: ``model`` contains no SparseDense, ``x`` holds no example,
            or ``model`` does not accept ``x``.

    Example:

    >>> import numpy as np, keras, sparselayers as sl
    >>> model = keras.Sequential([keras.Input((64,)), sl.SparseDense(sl.patterns.random((64, 32), density=0.1, seed=0))])
    >>> report = sl.autotune(model, np.ones((16, 64), "float32"), rounds=1, cache=False)
    >>> row = report[0]
    >>> row.chosen == min(row.ms, key=row.ms.get) == model.layers[0].kernel_name
    True
    """
    from sparselayers.ops.sparse_input import SPARSE_INPUT
    from sparselayers.pattern_state import reset_compiled_functions
    from sparselayers.sparse_kernel import sparse_layers

    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer. Received: model of type {type(model).__name__}")
    rounds = check_int(rounds, "rounds", minimum=1)
    found = sparse_layers(model)
    if not found:
        raise ValueError(
            f"`model` must contain at least one sparse layer to tune. Received: model '{model.name}' without one"
        )
    calls = _calls_on(model, x)
    timer = timer or wall_clock
    use_cache = cache and cache_enabled()
    cached = _load(cache_path()) if use_cache and not refresh else {}
    measured: dict[str, dict[str, Any]] = {}
    rows = []
    device = ""
    for layer in _ordered(found, calls):
        call = calls.get(id(layer))
        if layer._kernel_argument != "auto" or call is None:
            if call:
                reason = f"kernel={layer._kernel_argument!r} forced"
            elif layer.kernel_name == SPARSE_INPUT:
                reason = "a sparse batch: read from its nonzeros, no kernel to choose"
            else:
                reason = "not called by model(x)"
            rows.append(_row(layer, call, {}, {}, layer.kernel_name, reason))
            continue
        batch, dtype = call
        device = describe_device(_layer_device(layer))
        key = cache_key(device, layer.pattern.fingerprint, dtype, batch)
        entry = measured.get(key) or cached.get(key)
        source = "cache"
        if entry is None or not _accepts(entry["kernel"], layer.pattern, batch):
            entry = _measure(layer, batch, dtype, rounds, timer)
            if entry["kernel"] is None:
                rows.append(_row(layer, call, {}, entry["skipped"], layer.kernel_name, "no kernel ran"))
                continue
            measured[key] = entry
            source = "measured"
        layer.set_kernel(entry["kernel"])
        rows.append(_row(layer, call, entry["ms"], entry.get("skipped", {}), entry["kernel"], source))
    if measured and use_cache:
        _store(cache_path(), measured)
    reset_compiled_functions(model)
    return AutotuneReport(device or describe_device(_default_device()), tf.__version__, rows)


def wall_clock(layer: str, kernel: str, step: Callable[[], None]) -> float:
    """The default :data:`Timer`: mean ms of consecutive steps lasting :data:`MIN_ROUND_SECONDS` (at most :data:`MAX_STEPS`).

    Untimed steps lasting :data:`WARMUP_SECONDS` (at most :data:`MAX_STEPS`) go first.
    """
    start = time.perf_counter()
    for _ in range(MAX_STEPS):
        step()
        if time.perf_counter() - start >= WARMUP_SECONDS:
            break
    steps = 0
    start = time.perf_counter()
    while True:
        step()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_ROUND_SECONDS or steps >= MAX_STEPS:
            return elapsed * 1000 / steps


def _calls_on(model: keras.layers.Layer, x: Any) -> dict[int, tuple[int, str]]:
    """Calls ``model`` on ``x`` once; ``id(layer) -> (batch, dtype)`` of every SparseDense call."""
    leaves = tf.nest.flatten(x)
    shapes = [tuple(np.shape(leaf)) for leaf in leaves]
    if not leaves or any(len(s) == 0 or s[0] == 0 for s in shapes):
        raise ValueError(f"`x` must be a batch of at least one example. Received: x with shape {_shapes(shapes)}")
    _recording.calls = {}
    try:
        with observing_layers():
            model(x)
    except (ValueError, TypeError) as error:
        raise ValueError(f"`x` must be a batch that `model` accepts. Received: x with shape {_shapes(shapes)}") from error
    finally:
        calls, _recording.calls = _recording.calls, None
    return calls


def _shapes(shapes: list[tuple]) -> str:
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def _ordered(found: list, calls: dict[int, tuple[int, str]]) -> list:
    """Called layers in call order, then the others."""
    order = {layer_id: k for k, layer_id in enumerate(calls)}
    return sorted(found, key=lambda layer: order.get(id(layer), len(order)))


def _row(layer, call, ms, skipped, chosen, source) -> LayerTiming:
    pattern = layer.pattern
    return LayerTiming(
        layer=getattr(layer, "path", None) or layer.name,
        shape=pattern.shape,
        nnz=pattern.nnz,
        structure=pattern.structure,
        fingerprint=pattern.fingerprint,
        batch=call[0] if call else None,
        dtype=call[1] if call else layer.compute_dtype,
        ms=dict(ms),
        skipped=dict(skipped),
        chosen=chosen,
        source=source,
    )


def _candidate_names() -> list[str]:
    """Every kernel name, each followed by its class's ``variants``."""
    names: list[str] = []
    for name, cls in KERNELS.items():
        for candidate in (name, *getattr(cls, "variants", ())):
            if candidate not in names:
                names.append(candidate)
    return names


def _eligible(
    pattern: SparsityPattern, batch: int, itemsize: int, device: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Kernels that accept ``pattern`` and ``batch``, and the reasons for the others."""
    kernels, skipped = {}, {}
    # A GPU out of memory raises (and the kernel is skipped); the host kills.
    on_cpu = tf.DeviceSpec.from_string(device).device_type != "GPU"
    available = _available_memory() if on_cpu else None
    for name in _candidate_names():
        try:
            check_kernel_name(name, pattern)
            if name in DENSE_PRODUCT_KERNELS and not fits_dense(pattern):
                raise ValueError(f"the {name} kernel's dense product would not fit in memory")
            kernel = get_kernel(name, pattern)
            if getattr(kernel, "available", True) is False:
                raise ValueError("the compiled kernels are not built here (see docs/kernels.md)")
            if getattr(kernel, "fused", True) is False:
                raise ValueError(f"its ops do not apply to this pattern; it would time its twin, {kernel.twin_for(pattern)!r}")
            kernel.check_batch(batch)
            needed = _transient_bytes(kernel, name, pattern, batch, itemsize)
            if available is not None and needed > MEMORY_FRACTION * available:
                raise ValueError(
                    f"a training step needs about {needed / 2**30:.1f} GiB, more than "
                    f"{MEMORY_FRACTION:.0%} of the {available / 2**30:.1f} GiB available"
                )
        except ValueError as error:
            skipped[name] = str(error)
            continue
        kernels[name] = kernel
    return kernels, skipped


def _transient_bytes(kernel: Any, name: str, pattern: SparsityPattern, batch: int, itemsize: int) -> int:
    """Rough peak of a training step's temporaries, for kernels whose peak can outgrow memory.

    Running out of host memory kills the process instead of raising, so a
    kernel that would is never tried. A kernel may say itself, with a
    ``transient_bytes(batch, itemsize)`` method; otherwise these figures,
    measured on 4096 x 4096 at 20% density (bytes per batch row: gather 60
    MB, block 67 MB, sparse_dense_matmul 26 MB), with margin: gather holds
    ``(batch, nnz)`` products, as does TF's gradient of
    ``sparse_dense_matmul``; block gathers ``(batch, rows)`` and returns
    ``(batch, cols)`` per rectangle, which for a scattered pattern is about
    ``nnz`` each; dense holds the kernel and its gradient. The others keep
    their temporaries near ``batch * (input_dim + units)`` or bounded by
    chunks.
    """
    own = getattr(kernel, "transient_bytes", None)
    if callable(own):
        return int(own(batch, itemsize))
    if name == "gather":
        return 5 * batch * pattern.nnz * itemsize
    if name == "sparse_dense_matmul":
        return 3 * batch * pattern.nnz * itemsize
    if name == "block":
        blocks = detect_blocks(pattern)
        rectangle_sides = int(blocks.n_rows.sum() + blocks.n_cols.sum()) if blocks is not None else 0
        return 4 * batch * rectangle_sides * itemsize
    if name == "dense":
        return 3 * pattern.shape[0] * pattern.shape[1] * itemsize
    if name == "csr_dense_grad":  # computed in float32 at least
        return pattern.shape[0] * pattern.shape[1] * max(itemsize, 4)
    return 0


def _available_memory() -> int | None:
    """Bytes of host memory available now (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _accepts(name: str, pattern: SparsityPattern, batch: int) -> bool:
    """Whether a cached kernel name is still a kernel that takes ``pattern`` and ``batch``."""
    try:
        check_kernel_name(name, pattern)
        get_kernel(name, pattern).check_batch(batch)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _measure(layer, batch: int, dtype: str, rounds: int, timer: Timer) -> dict[str, Any]:
    """Times the eligible kernels of ``layer``: the cache entry of the fastest (kernel None if none ran)."""
    path = getattr(layer, "path", None) or layer.name
    device = _layer_device(layer)
    kernels, skipped = _eligible(layer.pattern, batch, tf.as_dtype(dtype).size, device)
    steps = {}
    for name, kernel in kernels.items():
        try:
            step = _training_step(kernel, layer, batch, dtype, device)
            with _retracing_quiet():
                step()  # traces; wall_clock warms each round up
        except (tf.errors.OpError, ValueError, TypeError, NotImplementedError, MemoryError) as error:
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            continue
        steps[name] = step
    if not steps:
        return {"kernel": None, "ms": {}, "skipped": skipped, "batch": batch}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds):
        for name in list(steps):
            times[name].append(float(timer(path, name, steps[name])))
        if round_ == 0:
            best = min(t[0] for t in times.values())
            steps = {name: step for name, step in steps.items() if times[name][0] <= PRUNE_RATIO * best}
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"kernel": min(ms, key=ms.get), "ms": ms, "skipped": skipped, "batch": batch}


@contextlib.contextmanager
def _retracing_quiet() -> Iterator[None]:
    """Hides TF's retracing warning: one function per kernel is traced on purpose."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _training_step(kernel, layer, batch: int, dtype: str, device: str) -> Callable[[], None]:
    """One training step of ``kernel`` at ``batch`` rows: forward, gradients w.r.t. input and values.

    The optimizer update, bias and activation cost the same whatever the
    kernel, so they are left out.
    """
    with tf.device(device):
        x = tf.random.stateless_normal((batch, layer.pattern.shape[0]), seed=(1, 2), dtype=dtype)
        dy = tf.random.stateless_normal((batch, layer.pattern.shape[1]), seed=(3, 4), dtype=dtype)
        values = tf.identity(tf.cast(layer.values.value, dtype))

    @tf.function
    def step(x, values, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, values])
            y = kernel(x, values)
        return tape.gradient(y, [x, values], output_gradients=dy, unconnected_gradients="zero")

    # CPU calls return when done; GPU calls when enqueued, so wait for the device.
    on_gpu = tf.DeviceSpec.from_string(device).device_type == "GPU"

    def run() -> None:
        with tf.device(device):
            step(x, values, dy)
        if on_gpu:
            tf.test.experimental.sync_devices()

    return run


# Devices ------------------------------------------------------------------


def _layer_device(layer) -> str:
    """The device of ``layer``'s values variable: where the model runs."""
    # Keras' variable holds the TF variable; inside a call its `.value` may
    # be a cast, placed nowhere yet.
    variable = getattr(layer.values, "_value", None)
    return getattr(variable if variable is not None else layer.values.value, "device", "") or _default_device()


@functools.lru_cache(maxsize=1)
def _default_device() -> str:
    return "/device:GPU:0" if tf.config.list_logical_devices("GPU") else "/device:CPU:0"


@functools.lru_cache(maxsize=None)
def describe_device(device: str) -> str:
    """A description of ``device`` that names its hardware: the first part of every cache key.

    >>> describe_device("/device:CPU:0").startswith("CPU: ")
    True
    """
    spec = tf.DeviceSpec.from_string(device)
    if spec.device_type == "GPU":
        gpus = tf.config.list_physical_devices("GPU")
        index = spec.device_index or 0
        if index < len(gpus):
            details = tf.config.experimental.get_device_details(gpus[index])
            name = details.get("device_name", "unknown GPU")
            capability = details.get("compute_capability")
            return f"GPU: {name}" + (f" (compute capability {capability[0]}.{capability[1]})" if capability else "")
        return f"GPU: {device}"
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {_cpu_model()}, {threads} threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# The cache ----------------------------------------------------------------


def cache_enabled() -> bool:
    """False when ``SPARSELAYERS_AUTOTUNE_CACHE`` is ``0``, ``false``, ``no`` or ``off``."""
    return flag(CACHE_ENABLED_ENV, default=True)


def cache_path() -> pathlib.Path:
    """The cache file: ``autotune.json`` in ``SPARSELAYERS_CACHE_DIR`` or the user's cache folder.

    >>> cache_path().name
    'autotune.json'
    """
    return _cache_path(os.environ.get(CACHE_DIR_ENV), os.environ.get("XDG_CACHE_HOME", ""))


def _cache_path(folder: str | None, xdg: str) -> pathlib.Path:
    return _cache_folder(folder, xdg) / CACHE_FILE


def batch_bucket(batch: int) -> int:
    """The batch rounded up to a power of two: one measurement serves a range of batches.

    >>> [batch_bucket(b) for b in (1, 2, 3, 200, 256, 257)]
    [1, 2, 4, 256, 256, 512]
    """
    return 1 << max(int(batch) - 1, 0).bit_length()


def cache_key(device: str, fingerprint: str, dtype: str, batch: int) -> str:
    """The key of one measurement: device, TF and sparselayers versions, pattern, dtype, batch bucket."""
    return _cache_key(device, fingerprint, dtype, batch_bucket(batch))


@functools.lru_cache(maxsize=1024)
def _cache_key(device: str, fingerprint: str, dtype: str, bucket: int) -> str:
    from sparselayers import __version__

    return json.dumps([device, tf.__version__, __version__, fingerprint, dtype, bucket])


#: Cache files read in this process, by path: ``{key: entry}``.
_memory: dict[pathlib.Path, dict[str, dict[str, Any]]] = {}
_lock = threading.Lock()


def _load(path: pathlib.Path) -> dict[str, dict[str, Any]]:
    """The cached entries of ``path``, read from disk once per process."""
    with _lock:
        if path not in _memory:
            _memory[path] = _read(path, warn=True)
        return _memory[path]


def _read(path: pathlib.Path, *, warn: bool) -> dict[str, dict[str, Any]]:
    """The entries of a cache file; a missing, corrupt or foreign one gives none."""

    def ignored(why: str) -> dict:
        if warn:
            warnings.warn(
                f"Ignoring the autotune cache {path}: {why}. The next sl.autotune() replaces it "
                f"(set {CACHE_ENABLED_ENV}=0 to disable the cache).",
                stacklevel=3,
            )
        return {}

    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, UnicodeDecodeError) as error:
        return ignored(f"it cannot be read ({error})")
    try:
        data = json.loads(text)
    except ValueError:
        return ignored("it is not valid JSON")
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return ignored("it is not a sparselayers autotune cache")
    if data.get("version") != CACHE_VERSION:
        return ignored(f"it has format version {data.get('version')!r}, this sparselayers reads {CACHE_VERSION}")
    return {key: _clean(entry) for key, entry in data["entries"].items() if _valid_entry(entry)}


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("kernel"), str)
        and isinstance(entry.get("ms"), dict)
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in entry["ms"].values())
    )


def _clean(entry: dict[str, Any]) -> dict[str, Any]:
    skipped = entry.get("skipped")
    if not isinstance(skipped, dict):
        skipped = {}
    return {
        "kernel": entry["kernel"],
        "ms": {str(k): float(v) for k, v in entry["ms"].items()},
        "skipped": {str(k): str(v) for k, v in skipped.items()},
        "batch": entry.get("batch"),
    }


def _store(path: pathlib.Path, entries: dict[str, dict[str, Any]]) -> None:
    """Adds ``entries`` to the cache file, atomically; a failure to write only warns."""
    with _lock:
        merged = {**_read(path, warn=False), **entries}  # keeps what other processes wrote meanwhile
        data = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": merged}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    json.dump(data, file, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as error:
            warnings.warn(f"Could not write the autotune cache {path}: {error}", stacklevel=3)
        _memory[path] = merged
        _resolved.clear()


# The seam used by SparseDense -----------------------------------------------

_recording = threading.local()
#: Whether a cached kernel applies, per (cache file, key, layer's current kernel).
_resolved: dict[tuple[pathlib.Path, str, str], bool] = {}



def kernel_for_call(layer, flat: tf.Tensor, name: str) -> str:
    """The kernel name a SparseDense call uses outside XLA and export.

    Registered as :func:`sparselayers.seams.measured_kernel`. ``name`` (the
    layer's own choice), unless the layer was built with ``kernel="auto"``,
    still follows the static rule, and a measurement for this device,
    pattern, dtype and ``flat``'s (static) batch bucket is cached: then the
    measured fastest. After the first read of the cache file this is a few
    dictionary look-ups, cheap enough for every eager call.

    Args:
        layer: the calling SparseDense.
        flat: its input flattened to ``(batch, input_dim)``.
        name: the kernel the layer runs without a measurement.

    Returns:
        A name accepted by :func:`sparselayers.ops.get_kernel`.
    """
    batch = flat.shape[0]
    calls = getattr(_recording, "calls", None)
    if calls is not None and batch is not None:
        calls.setdefault(id(layer), (int(batch), flat.dtype.name))
    if layer._kernel_request != "auto" or not batch or not cache_enabled():
        return name
    path = cache_path()
    entries = _load(path)
    if not entries:
        return name
    key = cache_key(describe_device(_layer_device(layer)), layer.pattern.fingerprint, flat.dtype.name, batch)
    entry = entries.get(key)
    if entry is None:
        return name
    resolved_key = (path, key, name)
    if resolved_key not in _resolved:
        # A layer set to another kernel (set_kernel, autotune) keeps it; a
        # cached name this sparselayers does not know is ignored.
        _resolved[resolved_key] = _accepts(entry["kernel"], layer.pattern, 1)
    if not _resolved[resolved_key]:
        return name
    try:  # the bucket was measured at one batch; this one may pass a kernel's limit
        get_kernel(entry["kernel"], layer.pattern).check_batch(int(batch))
    except ValueError:
        return name
    return entry["kernel"]


seams.register_measured_kernel(kernel_for_call)
