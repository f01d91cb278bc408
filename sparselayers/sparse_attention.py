"""`SparseMultiHeadAttention`: ``MultiHeadAttention`` whose projections are `SparseEinsumDense` layers.

Keras' ``MultiHeadAttention`` builds its query, key, value (gate) and
output projections as ``EinsumDense`` sublayers; this subclass builds each
projection that has a pattern as a :class:`~sparselayers.SparseEinsumDense`
on it instead, and computes attention with Keras' own code. The sparse
projections are ordinary sparse layers of the model: ``sl.sparse_layers``
finds them, RigL, SET and export reach them.
"""

from __future__ import annotations

from typing import Any

import keras

from sparselayers.sparse_einsum import SparseEinsumDense
from sparselayers.sparse_kernel import as_pattern, register_container_twin

#: Keras' attribute of each projection -> its key in ``patterns``.
PROJECTIONS = {
    "_query_dense": "query",
    "_key_dense": "key",
    "_value_dense": "value",
    "_gate_dense": "gate",
    "_output_dense": "output",
}


@register_container_twin(keras.layers.MultiHeadAttention)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseMultiHeadAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention with sparse projection kernels.

    Computes what ``keras.layers.MultiHeadAttention(num_heads, key_dim,
    ...)`` computes with each projection's kernel zero outside its pattern.
    A projection's pattern is over the 2-D view of its ``EinsumDense``
    kernel (see :class:`~sparselayers.SparseEinsumDense`): ``query``,
    ``key`` and ``value`` ``(input features, num_heads * head dim)``,
    ``output`` ``(num_heads * value_dim, output features)``, ``gate`` (with
    ``use_gate=True``) as ``query``.

    Args:
        num_heads: as for ``MultiHeadAttention``.
        key_dim: as for ``MultiHeadAttention``.
        patterns: a dict from ``"query"``, ``"key"``, ``"value"``,
            ``"gate"``, ``"output"`` to a pattern (a
            :class:`~sparselayers.SparsityPattern`, scipy.sparse matrix or
            mask); a projection without one stays a dense ``EinsumDense``.
            Sparse projections take their initial values from
            :class:`~sparselayers.initializers.SparseGlorotUniform`, and
            ``kernel_regularizer``/``kernel_constraint`` when they act entry
            by entry.
        **kwargs: the other ``MultiHeadAttention`` arguments.

    Raises:
        ValueError: a key of ``patterns`` that is not a projection, or (at
            build) a pattern whose shape is not its projection's view.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> patterns = {name: sl.patterns.random((16, 2 * 8), density=0.3, seed=0) for name in ("query", "key", "value")}
    >>> patterns["output"] = sl.patterns.random((2 * 8, 16), density=0.3, seed=0)
    >>> mha = sl.SparseMultiHeadAttention(num_heads=2, key_dim=8, patterns=patterns)
    >>> x = np.ones((1, 5, 16), "float32")
    >>> mha(x, x).shape
    TensorShape([1, 5, 16])
    >>> names = [layer.name for layer in sl.sparse_layers(mha)]
    >>> names == ["query", "key", "value", "attention_output"]
    True
    """

    def __init__(self, num_heads: int, key_dim: int, patterns: dict[str, Any] | None = None, **kwargs: Any):
        patterns = dict(patterns or {})
        unknown = sorted(set(patterns) - set(PROJECTIONS.values()))
        if unknown:
            raise ValueError(
                f"`patterns` keys must be projections among {sorted(PROJECTIONS.values())}. "
                f"Received: patterns with keys {sorted(patterns)}"
            )
        self._patterns = {key: as_pattern(p) for key, p in patterns.items() if p is not None}
        super().__init__(num_heads, key_dim, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # Keras' build creates each projection as an unbuilt EinsumDense and
        # builds it at once: swapping it here, before its kernel exists,
        # keeps Keras' build (and its equations) as they are.
        key = PROJECTIONS.get(name)
        patterns = self.__dict__.get("_patterns", {})
        if key in patterns and type(value) is keras.layers.EinsumDense:
            value = SparseEinsumDense.from_dense_layer(value, patterns[key])
        super().__setattr__(name, value)

    @classmethod
    def kernel_sublayers(cls, layer: keras.layers.MultiHeadAttention) -> dict[str, keras.layers.Layer]:
        """The built projections of a (sparse or Keras) ``MultiHeadAttention``, by their key in ``patterns``."""
        return {key: getattr(layer, name) for name, key in PROJECTIONS.items() if getattr(layer, name, None) is not None}

    @classmethod
    def from_dense_layer(cls, layer: keras.layers.MultiHeadAttention, patterns: dict[str, Any]) -> SparseMultiHeadAttention:
        """An unbuilt layer configured like ``layer`` whose projection ``key`` is sparse on ``patterns[key]``."""
        config = layer.get_config()
        config["patterns"] = patterns
        return cls.from_config(config)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "patterns": {key: p.get_config() for key, p in self._patterns.items()}}

