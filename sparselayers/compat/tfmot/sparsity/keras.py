"""``tfmot.sparsity.keras``: the names of TFMOT's Keras pruning API."""

from sparselayers.compat.tfmot.callbacks import PruningSummaries, UpdatePruningStep
from sparselayers.compat.tfmot.prune import PruningPolicy, prune_low_magnitude, prune_scope, strip_pruning
from sparselayers.compat.tfmot.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PruningPolicy",
    "PruningSchedule",
    "PruningSummaries",
    "UpdatePruningStep",
    "prune_low_magnitude",
    "prune_scope",
    "strip_pruning",
]
