"""Compatibility layers: other libraries' APIs on sparselayers, built on its public API only.

* :mod:`sparselayers.compat.tfmot`: TensorFlow Model Optimization's pruning
  API (``tfmot.sparsity.keras``) on Keras 3.
"""
