"""TFMOT's pruning API (``tfmot.sparsity.keras``) on Keras 3, on sparselayers.

``import sparselayers.compat.tfmot as tfmot`` in place of
``import tensorflow_model_optimization as tfmot``, and code written for
TFMOT's pruning runs unchanged: ``tfmot.sparsity.keras.prune_low_magnitude``,
``PolynomialDecay``, ``ConstantSparsity``, ``UpdatePruningStep``,
``PruningSummaries``, ``strip_pruning`` and ``prune_scope``, with TFMOT's
signatures and semantics. ``docs/coming-from-tfmot.md`` lists every name and
what differs.
"""

from sparselayers.compat.tfmot import sparsity

__all__ = ["sparsity"]
