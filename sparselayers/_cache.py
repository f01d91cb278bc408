"""The user cache folder shared by the autotune cache and the compiled kernels."""

from __future__ import annotations

import functools
import os
import pathlib
import sys

#: Environment variable: the folder holding sparselayers' caches.
CACHE_DIR_ENV = "SPARSELAYERS_CACHE_DIR"


def cache_folder() -> pathlib.Path:
    """``SPARSELAYERS_CACHE_DIR``, else the platform's user cache folder plus ``sparselayers``.

    >>> cache_folder().name != ''
    True
    """
    return _cache_folder(os.environ.get(CACHE_DIR_ENV), os.environ.get("XDG_CACHE_HOME", ""))


@functools.lru_cache(maxsize=8)
def _cache_folder(folder: str | None, xdg: str) -> pathlib.Path:
    if folder:
        return pathlib.Path(folder).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return pathlib.Path(os.environ["LOCALAPPDATA"]) / "sparselayers" / "Cache"
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Caches" / "sparselayers"
    base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "sparselayers"
