"""Keeping TensorFlow's native start-up lines off the user's terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Hides what native code writes to file descriptor 2 inside the block.

    TensorFlow's C++ runtime prints INFO lines (oneDNN, CUDA probing) at
    import and at start-up, before it reads ``TF_CPP_MIN_LOG_LEVEL``. If the
    block raises, the hidden text is written out after all.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
