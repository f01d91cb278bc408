"""sparselayers: trainable sparse layers for TensorFlow/Keras.

>>> import numpy as np, sparselayers as sl
>>> pattern = sl.patterns.block_diagonal([(4, 2)] * 3)
>>> layer = sl.SparseDense(pattern, activation="relu")
>>> layer(np.ones((2, 12), "float32")).shape
TensorShape([2, 6])
"""

import os as _os
import sys as _sys

# TensorFlow's C++ INFO and WARNING lines drown a user's own output.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "tensorflow" not in _sys.modules and _os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("", "0"):
    from sparselayers._quiet import native_stderr_hidden as _hidden

    with _hidden():  # the lines TF prints at import, before it reads the level
        import tensorflow  # noqa: F401

from sparselayers import callbacks, export, initializers, ops, patterns  # noqa: E402
from sparselayers.autotune import autotune  # noqa: E402
from sparselayers.pattern_state import reset_compiled_functions  # noqa: E402
from sparselayers.pruning import sparsify, strip_pruning  # noqa: E402
from sparselayers.sparse_attention import SparseMultiHeadAttention  # noqa: E402
from sparselayers.sparse_conv import SparseConv1D, SparseConv2D  # noqa: E402
from sparselayers.sparse_dense import SparseDense  # noqa: E402
from sparselayers.sparse_einsum import SparseEinsumDense  # noqa: E402
from sparselayers.sparse_embedding import SparseEmbedding  # noqa: E402
from sparselayers.sparse_kernel import SparseKernelLayer, sparse_layers  # noqa: E402
from sparselayers.sparse_separable_conv import SparseSeparableConv1D, SparseSeparableConv2D  # noqa: E402
from sparselayers import knowledge  # noqa: E402  (builds on SparseDense)
from sparselayers.sparsity_pattern import SparsityPattern  # noqa: E402
from sparselayers.towers import Towers  # noqa: E402
from sparselayers import distribute  # noqa: E402

distribute.keras_mwms_fix.install()  # model.fit under MultiWorkerMirroredStrategy (keras-team/keras#20585)

__version__ = "0.1.0"


def __getattr__(name: str):
    # `sl.plotting` needs matplotlib, an optional extra: imported on first use.
    if name == "plotting":
        import importlib

        return importlib.import_module("sparselayers.plotting")
    raise AttributeError(f"module 'sparselayers' has no attribute {name!r}")

__all__ = [
    "SparseConv1D",
    "SparseConv2D",
    "SparseDense",
    "SparseEinsumDense",
    "SparseEmbedding",
    "SparseKernelLayer",
    "SparseMultiHeadAttention",
    "SparseSeparableConv1D",
    "SparseSeparableConv2D",
    "SparsityPattern",
    "Towers",
    "autotune",
    "callbacks",
    "distribute",
    "export",
    "initializers",
    "knowledge",
    "ops",
    "patterns",
    "reset_compiled_functions",
    "sparse_layers",
    "sparsify",
    "strip_pruning",
]
