"""``tfmot.sparsity``: the Keras pruning API lives in :mod:`.keras`."""

from sparselayers.compat.tfmot.sparsity import keras

__all__ = ["keras"]
