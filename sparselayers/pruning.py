"""Pruning of a model into truly sparse layers: by magnitude, at random or by SNIP.

:func:`sparsify` turns the ``Dense`` (and ``SparseDense``) layers of a
Sequential or Functional model into :class:`~sparselayers.SparseDense` layers
that store only the kept entries. Calling it again with a lower density
shrinks each layer within its current pattern, so gradual pruning is a loop
of ``fit`` and ``sparsify`` (see ``docs/finding-a-pattern.md``).
"""

from __future__ import annotations

import logging
import numbers
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

from sparselayers import evolution_step
from sparselayers._validation import _short, check_int
from sparselayers.allocation import check_distribution, check_erk_power, global_keep, keep_counts, top_entries
from sparselayers.ops import check_kernel_name
from sparselayers.sparse_kernel import SparseKernelLayer, container_twin, sparse_layers, sparse_twin, twin_types
from sparselayers.sparsity_pattern import SparsityPattern

_log = logging.getLogger("sparselayers")
#: The values of ``criterion``.
CRITERIA = ("magnitude", "random", "snip")


def sparsify(
    model: keras.Model,
    density: float | None = None,
    *,
    layers: Sequence[str] | str | None = None,
    block: tuple[int, int] | None = None,
    n_of_m: tuple[int, int] | None = None,
    distribution: str = "uniform",
    erk_power: float = 1.0,
    criterion: str = "magnitude",
    seed: int | None = None,
    data: Any = None,
) -> keras.Model:
    """A copy of ``model`` whose dense layers keep only their best entries.

    Every selected layer becomes a :class:`~sparselayers.SparseDense` with the
    same name, activation, bias and values, keeping the
    ``k = round(density * input_dim * units)`` entries of largest magnitude
    (Python's ``round``: halves go to the even integer). Ties are broken by
    position: the entry earlier in row-major order (smaller
    ``row * units + col``) is kept. Every other layer keeps its weights, so
    the new model computes what ``model`` computes with the pruned entries
    set to zero. ``model`` itself is not changed.

    ``density`` is relative to the full ``input_dim x units``, whatever the
    layer is now: a ``SparseDense`` keeps the ``k`` largest of its current
    entries and never gains connections (if it holds ``k`` or fewer it keeps
    them all). Calling ``sparsify`` again with a lower density therefore
    shrinks a model within its current patterns.

    With ``block=(r, c)`` the kernel is cut into ``r x c`` tiles (the last
    tile row and column may be smaller when ``r`` or ``c`` does not divide
    the shape), tiles are ranked by the L2 norm of their entries (ties: the
    tile earlier in row-major tile order first) and the fewest top tiles that
    hold at least ``k`` entries are kept whole. The density can thus exceed
    the request by less than one tile. Tiles of at least 32 entries and 2
    rows make ``kernel="auto"`` pick the block kernel, which is where a
    pruned layer gets faster than a dense one at moderate densities.

    With ``n_of_m=(n, m)`` instead of ``density`` (N:M sparsity), every
    output unit keeps the ``n`` best-scored entries of each group of ``m``
    consecutive inputs (rows ``0 .. m-1``, ``m .. 2m-1``, ... of its column
    in the kernel's 2-D view: for a convolution the flattened
    ``(*kernel_size, in_channels)`` axis); equal scores: the earlier input
    first. ``m`` must divide every selected layer's number of inputs (rows),
    or ``sparsify`` raises naming the layer: exclude it with ``layers=``. A
    ``SparseDense`` keeps at most ``n`` of its current entries per group.
    ``criterion`` ranks the entries within each group; ``block`` and a
    ``distribution`` other than ``"uniform"`` do not apply.

    ``distribution`` decides how many entries each layer keeps:

    * ``"uniform"``: ``round(density * input_dim * units)`` in every layer.
    * ``"erk"``: Erdős–Rényi-Kernel, the RigL code's rule
      (:func:`sparselayers.allocation.erk_densities`): a layer's density is
      proportional to ``((n_in + n_out) / (n_in * n_out)) ** erk_power``,
      scaled so the kept entries total ``density`` times the selected
      layers' size; a layer that would exceed 1 becomes full and the others
      are scaled again. Small layers stay denser than large ones.
    * ``"global"``: one threshold across the selected layers: the
      ``round(density * total size)`` best scores of all layers together
      (equal scores: the earlier layer in the model, then the earlier
      entry). No floor: a layer may keep few entries or none (layer
      collapse), which ``"erk"`` avoids.

    ``criterion`` scores the entries: ``"magnitude"`` ranks by ``|w|``;
    ``"random"`` by uniform random draws from ``seed`` (the Static baseline
    and the starting point of dynamic sparse training: a random pattern of
    the same per-layer sizes that keeps the model's values at the kept
    positions); ``"snip"`` by ``|w * dL/dw|`` (Lee et al., 2019), the
    gradient of the model's compiled loss (``model.compute_loss``, with
    ``training=True``, regularization losses included) over ``data=(x, y)``
    or ``(x, y, sample_weight)`` in one batch, at the model's current
    weights. A ``SparseDense`` scores only its current entries, and never
    gains connections under any distribution: where the rule asks for more
    than it holds, it keeps them all. Unit names of named patterns are kept.

    The new layers use ``kernel="auto"``; a ``SparseDense`` keeps its
    ``kernel`` argument when it still fits the new pattern. Regularizers and
    constraints carry over when they act entry by entry (``L1``, ``L2``,
    ``L1L2``, ``NonNeg``); other kernel regularizers and constraints need the
    2-D kernel and are dropped. The copy is compiled like ``model`` if
    ``model`` was compiled, with a fresh optimizer.

    Args:
        model: a built Sequential or Functional Keras model; nested models
            are searched too.
        density: fraction of each selected layer's ``input_dim * units``
            entries to keep, in ``(0, 1]``. Give ``density`` or ``n_of_m``.
        layers: names of the layers to prune (every layer with that name,
            in nested models too); each must be a ``Dense`` or
            ``SparseDense``. Default: every ``Dense`` and ``SparseDense``.
        block: ``(r, c)`` to keep whole tiles instead of single entries
            (ranked by the L2 norm of their scores); not with
            ``distribution="global"``.
        n_of_m: ``(n, m)`` with ``1 <= n <= m``: keep ``n`` of every ``m``
            consecutive inputs of each unit (above), instead of ``density``.
        distribution: ``"uniform"``, ``"erk"`` or ``"global"`` (above).
        erk_power: exponent of the ERK rule, > 0.
        criterion: ``"magnitude"``, ``"random"`` or ``"snip"`` (above).
        seed: seed of ``criterion="random"``; None draws a fresh one.
        data: ``(x, y)`` or ``(x, y, sample_weight)`` for
            ``criterion="snip"``.

    Returns:
        A new model of the same kind, layer names and weights.

    Raises:
        ValueError: ``density`` outside ``(0, 1]``; both or neither of
            ``density`` and ``n_of_m``; ``n_of_m`` not ``1 <= n <= m``, with
            ``block`` or a non-uniform ``distribution``, or its ``m`` not
            dividing a selected layer's inputs; a name in ``layers`` that
            is not in the model or is not a ``Dense``/``SparseDense``; a
            selected ``Dense`` whose kernel is not 2-D or is quantized;
            ``block`` not two positive integers; ``model`` not built; an
            unknown ``distribution`` or ``criterion``; ``erk_power <= 0``;
            ``block`` with ``"global"``; ``criterion="snip"`` without
            ``data`` or on a model not compiled with a loss.
        TypeError: ``model`` is not a Sequential or Functional model, or
            ``layers`` is not a list of names, or ``seed`` not an integer,
            or ``n_of_m`` not a pair of integers.

    Example:

    >>> import keras, numpy as np, sparselayers as sl
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="hidden")])
    >>> sparse = sl.sparsify(model, density=0.25)
    >>> sparse.get_layer("hidden").pattern.nnz  # round(0.25 * 8 * 4)
    8
    >>> kernel = model.get_layer("hidden").kernel.numpy()
    >>> kept = sparse.get_layer("hidden").to_dense() != 0
    >>> bool(np.abs(kernel[kept]).min() >= np.abs(kernel[~kept]).max())
    True

    Per-layer densities under ERK, and SNIP's scores from a batch:

    >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32), keras.layers.Dense(10)])
    >>> erk = sl.sparsify(model, density=0.2, distribution="erk")
    >>> densities = [round(layer.pattern.density, 3) for layer in erk.layers]
    >>> densities
    [0.161, 0.45]
    >>> model.compile(loss="mse")
    >>> x, y = np.ones((4, 64), "float32"), np.zeros((4, 10), "float32")
    >>> snip = sl.sparsify(model, density=0.1, criterion="snip", data=(x, y))
    >>> kept = [layer.pattern.nnz for layer in snip.layers]
    >>> kept
    [205, 32]

    2:4 sparsity, two of every four consecutive inputs of each unit:

    >>> two_of_four = sl.sparsify(model, n_of_m=(2, 4))
    >>> [layer.pattern.nnz for layer in two_of_four.layers]  # half of 64 * 32 and of 32 * 10
    [1024, 160]
    """
    density, n_of_m = _check_density_or_n_of_m(density, n_of_m)
    block = _check_block(block)
    distribution = check_distribution(distribution)
    if n_of_m is not None and (block is not None or distribution != "uniform"):
        extra = f"block={block}" if block is not None else f"distribution={distribution!r}"
        raise ValueError(
            "`n_of_m` keeps n of every m inputs in every layer; it takes neither `block` nor a "
            f"`distribution` other than 'uniform'. Received: n_of_m={n_of_m}, {extra}"
        )
    erk_power = check_erk_power(erk_power)
    if criterion not in CRITERIA:
        raise ValueError(f"`criterion` must be one of {list(CRITERIA)}. Received: criterion={_short(criterion)}")
    if block is not None and distribution == "global":
        raise ValueError(
            "`block` keeps tiles per layer; it works with distribution 'uniform' or 'erk'. "
            f"Received: block={block}, distribution='global'"
        )
    seed = None if seed is None else check_int(seed, "seed", minimum=0)
    _check_model(model)
    if criterion == "snip":
        _check_snip(model, data)
    chosen = _select(model, layers)
    return _rebuild_pruned(
        model, _plan(model, chosen, density, block, distribution, erk_power, criterion, seed, data, n_of_m)
    )


def strip_pruning(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose ``SparseDense`` layers store only the entries pruning kept.

    :class:`~sparselayers.callbacks.GradualPruning` holds pruned entries at
    exactly zero in the layers' storage during ``fit``; this compacts them
    away: every ``SparseDense`` becomes one on the kept entries only (same
    name, unit names, settings, values and bias), so the copy computes
    exactly what ``model`` computes and its saved and exported size follows
    the kept ``nnz``. A layer that carries a ``GradualPruning`` mask (pruned
    in this process, or loaded from a ``.keras``, ``.weights.h5`` or
    ``tf.train.Checkpoint`` that saved one) drops exactly the pruned entries
    that are still 0 (a kept entry that happens to be 0, for example under
    ``NonNeg``, stays; a pruned one that a later plain ``fit`` trained
    stays too); any other ``SparseDense`` drops the entries whose value is
    exactly 0. Other layers are copied as they are. ``model`` is not
    changed.

    Args:
        model: a built Sequential or Functional Keras model.

    Returns:
        A new model of the same kind, layer names and outputs.

    Raises:
        TypeError: ``model`` is not a Sequential or Functional model.
        ValueError: ``model`` is not built.

    Example:

    >>> import keras, numpy as np, sparselayers as sl
    >>> layer = sl.SparseDense(sl.patterns.dense((4, 2)), name="d")
    >>> model = keras.Sequential([keras.Input((4,)), layer])
    >>> _ = layer.values.assign([0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    >>> stripped = sl.strip_pruning(model)
    >>> stripped.get_layer("d").pattern.nnz
    4
    >>> x = np.ones((1, 4), "float32")
    >>> bool(np.array_equal(stripped(x), model(x)))
    True
    """
    _check_model(model)
    plan = {}
    for layer in _all_layers(model):
        if not isinstance(layer, SparseKernelLayer) or id(layer) in plan:
            continue
        values = keras.ops.convert_to_numpy(layer.values)
        kept = evolution_step.pruning_mask(layer)
        keep = values != 0 if kept is None else kept | (values != 0)
        if not keep.all():
            pattern = layer.pattern
            plan[id(layer)] = (
                SparsityPattern._from_linear(pattern.linear[keep], pattern.shape).with_names(
                    pattern.input_names, pattern.output_names
                ),
                values[keep],
            )
    return _rebuild_pruned(model, plan)



def _rebuild_pruned(model: keras.Model, plan: dict[int, tuple[SparsityPattern, np.ndarray]]) -> keras.Model:
    """A copy of ``model`` where each layer whose id is in ``plan`` becomes a SparseDense on ``(pattern, values)``."""
    clones: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        if id(layer) in plan:
            clone = _sparse_layer(layer, plan[id(layer)][0])
        elif _planned_sublayers(layer, plan):
            clone = _sparse_container(layer, plan)
        else:
            clone = layer.__class__.from_config(layer.get_config())
        clones.append((layer, clone))
        return clone

    new_model = _rebuild(model, clone_layer)
    if not new_model.built:  # a Sequential built by a call, without an Input
        new_model.build(model.input_shape)
    for layer, clone in clones:
        _fill(layer, clone, plan)
    return new_model


def _fill(layer: keras.layers.Layer, clone: keras.layers.Layer, plan: dict[int, tuple]) -> None:
    """The clone's weights: planned values and the bias, or everything of ``layer``."""
    if id(layer) in plan:
        clone.values.assign(plan[id(layer)][1].astype(clone.values.dtype))
        if clone.bias is not None:
            clone.bias.assign(keras.ops.convert_to_numpy(layer.bias))
        sparse = isinstance(layer, SparseKernelLayer)
        extras = layer.extra_weights() if sparse else sparse_twin(layer).dense_extra_weights(layer)
        for target, source in zip(clone.extra_weights(), extras, strict=True):
            target.assign(keras.ops.convert_to_numpy(source))
    elif _planned_sublayers(layer, plan):
        new = container_twin(clone).kernel_sublayers(clone)
        for key, old in container_twin(layer).kernel_sublayers(layer).items():
            _fill(old, new[key], plan)
    elif isinstance(layer, keras.layers.Layer):  # not a stateless operation such as `h + x`
        _copy_state(layer, clone)


def _planned_sublayers(layer: Any, plan: dict[int, tuple]) -> bool:
    """Whether ``layer`` is a container (``MultiHeadAttention``) with a kernel sublayer in ``plan``."""
    twin = container_twin(layer)
    return twin is not None and any(id(sub) in plan for sub in twin.kernel_sublayers(layer).values())


def _sparse_container(layer: keras.layers.Layer, plan: dict[int, tuple]) -> keras.layers.Layer:
    """The container's twin, each planned sublayer on its planned pattern, sparse ones on theirs, dense ones dense."""
    patterns = {
        key: plan[id(sub)][0] if id(sub) in plan else getattr(sub, "pattern", None)
        for key, sub in container_twin(layer).kernel_sublayers(layer).items()
    }
    return container_twin(layer).from_dense_layer(layer, patterns)


def _copy_state(layer: keras.layers.Layer, clone: keras.layers.Layer) -> None:
    """Weights, and the current pattern of every SparseDense inside ``layer``.

    A container's config (``Towers``) holds the patterns it was built with;
    RigL or SET may have moved them since, and values must follow.
    """
    for old, new in zip(sparse_layers(layer), sparse_layers(clone)):
        if old.pattern != new.pattern:
            new.set_pattern(old.pattern)
    clone.set_weights(layer.get_weights())


def _rebuild(model: keras.Model, clone_layer: Any) -> keras.Model:
    """``clone_model`` that recurses into nested models and keeps input names."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, (keras.Sequential, Functional)):
            return _rebuild(layer, clone_layer)
        return clone_layer(layer)

    inputs = None
    if isinstance(model, Functional):
        # clone_model would name new inputs after their tensors, and a model
        # fed a dict finds its inputs by name.
        inputs = keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name),
            model.input,
        )
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)


def _check_model(model: Any) -> None:
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            "`model` must be a Sequential or Functional Keras model (a subclassed model has no "
            f"graph of layers to rebuild). Received: model of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            "`model` must be built (give it an `Input` or call it on data) so its kernels exist. "
            f"Received: unbuilt model '{model.name}'"
        )


def _check_density(density: Any) -> float:
    if isinstance(density, (bool, np.bool_)) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
        raise ValueError(f"`density` must be a number in (0, 1]. Received: density={density!r}")
    return float(density)


def _check_density_or_n_of_m(density: Any, n_of_m: Any) -> tuple[float | None, tuple[int, int] | None]:
    if (density is None) == (n_of_m is None):
        raise ValueError(
            f"Give exactly one of `density` and `n_of_m`. Received: density={density!r}, n_of_m={n_of_m!r}"
        )
    if n_of_m is None:
        return _check_density(density), None
    expected = f"`n_of_m` must be a pair (n, m) of integers with 1 <= n <= m. Received: n_of_m={_short(n_of_m)}"
    if (
        isinstance(n_of_m, (str, bytes))
        or not hasattr(n_of_m, "__len__")
        or len(n_of_m) != 2
        or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) for v in n_of_m)
    ):
        raise TypeError(expected)
    n, m = int(n_of_m[0]), int(n_of_m[1])
    if not 1 <= n <= m:
        raise ValueError(expected)
    return None, (n, m)


def _check_block(block: Any) -> tuple[int, int] | None:
    if block is None:
        return None
    if (
        isinstance(block, (str, bytes))
        or not hasattr(block, "__len__")
        or len(block) != 2
        or any(isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Integral) or b < 1 for b in block)
    ):
        raise ValueError(f"`block` must be a pair of positive integers (rows, cols). Received: block={block!r}")
    return int(block[0]), int(block[1])


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model``, of the Sequential/Functional models inside it, and containers' kernel sublayers."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, (keras.Sequential, Functional)):
            found.extend(_all_layers(layer))
        elif container_twin(layer) is not None and layer.built:
            found.extend(container_twin(layer).kernel_sublayers(layer).values())
    return found


def _is_prunable(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, SparseKernelLayer) or sparse_twin(layer) is not None


def _left_dense(layers: Sequence[keras.layers.Layer]) -> list[str]:
    """``'name' (Type)`` of each layer that holds a kernel sparsify cannot convert."""
    return [
        f"'{layer.name}' ({type(layer).__name__})"
        for layer in layers
        if not _is_prunable(layer)
        and not isinstance(layer, (keras.Sequential, Functional))
        and any(len(v.shape) >= 2 for v in getattr(layer, "_trainable_variables", []))
    ]


def _select(model: keras.Model, layers: Any) -> list[keras.layers.Layer]:
    """The layers to prune, each checked, once each, in model order."""
    everything = _all_layers(model)
    supported = f"{', '.join(twin_types())} and the sparse layers"
    if layers is None:
        chosen = [layer for layer in everything if _is_prunable(layer)]
        dense = _left_dense(list(dict.fromkeys(everything)))
        if dense:
            _log.warning("sparsify leaves these layers dense (it converts %s): %s", supported, ", ".join(dense))
    else:
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, (list, tuple, set)) or not all(isinstance(n, str) for n in layers):
            raise TypeError(f"`layers` must be a list of layer names. Received: layers={layers!r}")
        names = {layer.name for layer in everything}
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise ValueError(
                f"`layers` names layers that are not in the model: {unknown}. "
                f"Available: {sorted(layer.name for layer in everything if _is_prunable(layer))}. "
                f"Received: layers={list(layers)!r}"
            )
        chosen = [layer for layer in everything if layer.name in layers]
        # Naming a container (a MultiHeadAttention) names its kernel sublayers.
        chosen = [
            sub
            for layer in chosen
            for sub in (container_twin(layer).kernel_sublayers(layer).values() if container_twin(layer) else [layer])
        ]
        wrong = [f"'{layer.name}' ({type(layer).__name__})" for layer in chosen if not _is_prunable(layer)]
        if wrong:
            raise ValueError(
                f"`layers` must name layers that sparsify converts ({supported}); {', '.join(wrong)} is not one. "
                f"Received: layers={list(layers)!r}"
            )
    for layer in chosen:
        twin = None if isinstance(layer, SparseKernelLayer) else sparse_twin(layer)
        reason = twin and twin.check_dense_layer(layer)
        if reason:
            raise ValueError(
                f"`layers` selects {type(layer).__name__} '{layer.name}', which cannot become sparse: {reason} "
                f"(exclude it with `layers=`). Received: layers={layers!r}"
            )
    unique = {id(layer): layer for layer in chosen}  # a shared layer appears once
    return list(unique.values())


def _kernel_shape(layer: keras.layers.Layer) -> tuple[int, ...]:
    """The Keras layout of the layer's kernel (ERK's shape)."""
    if isinstance(layer, SparseKernelLayer):
        return tuple(layer.kernel_shape())
    return tuple(sparse_twin(layer).dense_kernel_variable(layer).shape)


def _candidates(layer: keras.layers.Layer) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """``(shape, linear positions, values)`` of the entries the layer may keep."""
    if isinstance(layer, SparseKernelLayer):
        return layer.pattern.shape, layer.pattern.linear, keras.ops.convert_to_numpy(layer.values)
    twin = sparse_twin(layer)
    view = twin.dense_kernel_view(keras.ops.convert_to_numpy(twin.dense_kernel_variable(layer)), layer)
    return view.shape, np.arange(view.size, dtype=np.int64), view.ravel()


def _plan(model, chosen, density, block, distribution, erk_power, criterion, seed, data, n_of_m=None) -> dict[int, tuple]:
    """Per layer id: the kept pattern (with the layer's unit names) and its values."""
    candidates = [_candidates(layer) for layer in chosen]
    if n_of_m is not None:
        _check_groups(chosen, candidates, n_of_m)
    shapes = [_kernel_shape(layer) for layer in chosen]
    scores = _scores(model, chosen, candidates, criterion, seed, data)
    if n_of_m is not None:
        keeps = [_keep_n_of_m(shape, linear, score, *n_of_m) for (shape, linear, _), score in zip(candidates, scores)]
    elif distribution == "global":
        keeps = global_keep(scores, shapes, density)
    else:
        keeps = []
        for (shape, linear, _), score, target in zip(candidates, scores, keep_counts(shapes, density, distribution, erk_power)):
            if block is None:
                keeps.append(top_entries(score, target))
            else:
                keeps.append(_keep_tiles(shape, linear, score, target, block))
    plan = {}
    for layer, (shape, linear, values), keep in zip(chosen, candidates, keeps):
        pattern = SparsityPattern._from_linear(linear[keep], shape)
        if isinstance(layer, SparseKernelLayer):
            pattern = pattern.with_names(layer.pattern.input_names, layer.pattern.output_names)
        plan[id(layer)] = (pattern, values[keep])
    return plan


def _scores(model, chosen, candidates, criterion, seed, data) -> list[np.ndarray]:
    """float64 score of every candidate entry, higher kept first."""
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return [rng.random(values.size) for _, _, values in candidates]
    magnitude = [np.abs(values.astype(np.float64)) for _, _, values in candidates]
    if criterion == "magnitude":
        return magnitude
    gradients = snip_gradients(model, chosen, data)
    return [m * np.abs(g.astype(np.float64)) for m, g in zip(magnitude, gradients)]


def _check_snip(model: keras.Model, data: Any) -> None:
    if data is None:
        raise ValueError("`criterion='snip'` scores |w * dL/dw| on a batch: pass `data=(x, y)`. Received: data=None")
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        raise ValueError(
            "`criterion='snip'` needs the model's loss: call `model.compile(loss=...)` first. "
            f"Received: model '{model.name}' not compiled with a loss"
        )


def snip_gradients(model: keras.Model, chosen: Sequence[keras.layers.Layer], data: Any) -> list[np.ndarray]:
    """``dL/dw`` of each layer's candidate entries (kernel ravelled, or values) on one batch.

    ``L`` is the compiled loss of ``model``, through
    ``model.compute_loss`` with ``training=True``, inside a
    ``keras.StatelessScope`` so that no metric, batch-norm statistic or
    seed moves.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = [
        layer.values if isinstance(layer, SparseKernelLayer) else sparse_twin(layer).dense_kernel_variable(layer)
        for layer in chosen
    ]
    with tf.GradientTape() as tape, keras.StatelessScope():
        y_pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [
        keras.ops.convert_to_numpy(g).ravel()
        if isinstance(layer, SparseKernelLayer)
        else sparse_twin(layer).dense_kernel_view(keras.ops.convert_to_numpy(g), layer).ravel()
        for layer, g in zip(chosen, grads)
    ]


def _keep_tiles(shape, linear, magnitude, target, block) -> np.ndarray:
    """Candidates inside the fewest top-norm tiles that hold ``target`` entries."""
    rows, cols = np.divmod(linear, shape[1])
    tiles_per_row = -(-shape[1] // block[1])
    tile = (rows // block[0]) * tiles_per_row + cols // block[1]
    ids, tile_of, counts = np.unique(tile, return_inverse=True, return_counts=True)
    norms = np.sqrt(np.bincount(tile_of, weights=magnitude**2, minlength=ids.size))
    order = np.argsort(-norms, kind="stable")  # ids ascend: ties go to the earlier tile
    n_tiles = int(np.searchsorted(np.cumsum(counts[order]), target)) + 1 if target else 0
    chosen = np.zeros(ids.size, bool)
    chosen[order[:n_tiles]] = True
    return np.flatnonzero(chosen[tile_of])


def _check_groups(chosen, candidates, n_of_m) -> None:
    for layer, (shape, _, _) in zip(chosen, candidates):
        if shape[0] % n_of_m[1]:
            raise ValueError(
                f"`n_of_m={n_of_m}` groups {n_of_m[1]} consecutive inputs, but {n_of_m[1]} does not divide the "
                f"{shape[0]} inputs (rows) of {type(layer).__name__} '{layer.name}'; exclude it with `layers=` "
                f"or pick an `m` that divides it. Received: n_of_m={n_of_m}"
            )


def _keep_n_of_m(shape, linear, score, n, m) -> np.ndarray:
    """Sorted candidates among the ``n`` best of their column's group of ``m`` rows (ties: the earlier row)."""
    rows, cols = np.divmod(linear, shape[1])
    group = (rows // m) * shape[1] + cols
    # Candidates ascend by row within a column, so the stable sort puts the earlier row first.
    order = np.lexsort((-score, group))
    sorted_group = group[order]
    first = np.searchsorted(sorted_group, sorted_group, side="left")
    return np.sort(order[np.arange(order.size) - first < n])


def _sparse_layer(layer: keras.layers.Layer, pattern: SparsityPattern) -> SparseKernelLayer:
    """A sparse layer on ``pattern`` configured like ``layer`` (a sparse layer, or a Keras layer with a twin)."""
    if isinstance(layer, SparseKernelLayer):
        config = layer.get_config()
        try:
            check_kernel_name(config.get("kernel", "auto"), pattern)  # a lookup has no "kernel"
        except ValueError:
            config["kernel"] = "auto"  # a forced structured kernel no longer fits
        config["pattern"] = pattern
        return type(layer).from_config(config)
    return sparse_twin(layer).from_dense_layer(layer, pattern)
