"""Boolean environment variables, read the same way everywhere."""

from __future__ import annotations

import os
import warnings

#: The words a boolean variable accepts, in any case and with spaces around them.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def flag(name: str, default: bool) -> bool:
    """The environment variable ``name`` as a boolean; ``default`` when unset or empty.

    Any other word warns, naming the accepted ones, and gives ``default``:
    a misspelt switch must not silently mean its opposite.

    >>> import os
    >>> os.environ["SPARSELAYERS_EXAMPLE"] = " Off"
    >>> flag("SPARSELAYERS_EXAMPLE", default=True)
    False
    >>> del os.environ["SPARSELAYERS_EXAMPLE"]
    >>> flag("SPARSELAYERS_EXAMPLE", default=True)
    True
    """
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if not word:
        return default
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    warnings.warn(
        f"{name}={value!r} is not one of {', '.join(TRUE_WORDS + FALSE_WORDS)}; using the default ({default}).",
        RuntimeWarning,
        stacklevel=2,
    )
    return default
