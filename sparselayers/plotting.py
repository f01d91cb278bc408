"""Pictures of patterns; matplotlib is an optional dependency."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparselayers._validation import optional_module
from sparselayers.sparsity_pattern import SparsityPattern
from sparselayers.structure import describe, detect_blocks


def _pyplot() -> Any:
    return optional_module("matplotlib.pyplot", "Plotting needs matplotlib", "plot")


def plot_pattern(
    pattern: SparsityPattern,
    ax: Any = None,
    *,
    resolution: int = 400,
    boundaries: bool = True,
    title: str | None = None,
) -> Any:
    """Spy plot of ``pattern``: rows are inputs, columns are outputs.

    Big patterns are binned into at most ``resolution`` x ``resolution``
    pixels whose shade is the fraction of entries present, so the cost is
    O(nnz) whatever the shape. Any pixel holding an entry is at least mid
    grey, so that a thin diagonal or a few scattered entries stay visible. With ``boundaries``, the edges of detected
    diagonal blocks are drawn (up to 64 blocks).

    Returns:
        The matplotlib ``Axes``.
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5 * min(2.0, max(0.5, pattern.shape[0] / pattern.shape[1]))))
    n, m = pattern.shape
    # Bin edges on whole units, so that every pixel's shade is an exact fraction
    # (a dense pattern is uniformly black, not striped by uneven bins).
    row_edges = np.unique(np.linspace(0, n, min(n, resolution) + 1).round())
    col_edges = np.unique(np.linspace(0, m, min(m, resolution) + 1).round())
    counts, _, _ = np.histogram2d(pattern.rows, pattern.cols, bins=(row_edges, col_edges))
    cells = np.outer(np.diff(row_edges), np.diff(col_edges))
    ax.imshow(counts / cells, cmap=_shades(), vmin=1e-9, vmax=1, extent=(0, m, n, 0), aspect="auto",
              interpolation="nearest")
    if boundaries and pattern.nnz:
        blocks = detect_blocks(pattern)
        if blocks.is_diagonal and 1 < blocks.count <= 64:
            for r0, nr, c0, nc in zip(blocks.row_start, blocks.n_rows, blocks.col_start, blocks.n_cols):
                ax.add_patch(plt.Rectangle((c0, r0), nc, nr, fill=False, edgecolor="tab:red", linewidth=0.6))
    ax.set_xlabel("output unit")
    ax.set_ylabel("input feature")
    ax.set_title(title or f"{n}x{m}, nnz={pattern.nnz} ({describe(pattern)})", fontsize=9)
    return ax


def _shades() -> Any:
    """Greys from 50% (a pixel holding one entry) to black (full); white below vmin (empty)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps["Greys"](np.linspace(0.5, 1.0, 256))).with_extremes(under="white")


def plot_manhattan(
    relevance: Any,
    groups: Any = None,
    ax: Any = None,
    *,
    labels: int = 5,
    title: str | None = None,
) -> Any:
    """Manhattan-style plot of a relevance table: unit position on x, ``|relevance|`` on y.

    Each point is a unit of one level (e.g. a SNP) from
    :func:`sparselayers.knowledge.path_weights` or
    :func:`sparselayers.knowledge.gradient_x_input`. With ``groups``, the
    pattern (or ``SparseDense`` layer) from that level to the next, each
    point takes the colour of the first unit it feeds (e.g. its gene), in
    alternating shades as chromosomes in a genome-wide association plot, and
    the most relevant unit of each of the ``labels`` most relevant groups is
    annotated with its name and its group's.

    Args:
        relevance: a DataFrame with columns ``unit``, ``position`` and
            ``relevance``.
        groups: a :class:`SparsityPattern` or ``SparseDense`` whose rows are
            the plotted units, or None.
        ax: matplotlib ``Axes`` to draw on; a new figure by default.
        labels: how many points to annotate (one per group).
        title: the title; by default, the level's size.

    Returns:
        The matplotlib ``Axes``.

    Raises:
        ValueError: ``relevance`` lacks a column, or ``groups`` does not have
            one row per position.
    """
    plt = _pyplot()
    missing = [c for c in ("unit", "position", "relevance") if c not in getattr(relevance, "columns", [])]
    if missing:
        raise ValueError(
            "`relevance` must be a DataFrame from sparselayers.knowledge with columns unit, position, "
            f"relevance. Received: missing {missing}"
        )
    pattern = getattr(groups, "pattern", groups)
    position = relevance["position"].to_numpy()
    height = np.abs(relevance["relevance"].to_numpy(dtype=np.float64))
    group = None
    if pattern is not None:
        if not isinstance(pattern, SparsityPattern) or pattern.shape[0] <= position.max(initial=-1):
            raise ValueError(
                "`groups` must be a SparsityPattern or SparseDense with a row per plotted unit. "
                f"Received: {type(groups).__name__} for positions up to {position.max(initial=-1)}"
            )
        first = np.full(pattern.shape[0], -1)
        fed = pattern.fan_out > 0
        first[fed] = pattern.cols[pattern.row_pointers[:-1][fed]]  # entries are row-major sorted
        group = first[position]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    order = np.argsort(position)
    if group is None:
        ax.scatter(position[order], height[order], s=6, color="tab:blue", rasterized=True)
    else:
        # Consecutive groups alternate between two shades; units feeding nothing are grey.
        shade = np.where(group < 0, 2, _runs(group[order]) % 2)
        colours = np.array(["tab:blue", "tab:orange", "lightgrey"])[shade]
        ax.scatter(position[order], height[order], s=6, c=colours, rasterized=True)
    names = pattern.output_names if pattern is not None else None
    labelled: set[int] = set()
    for k in np.argsort(-height, kind="stable"):
        if len(labelled) == labels:
            break
        key = int(group[k]) if group is not None else int(k)
        if key in labelled:  # one label per group: its most relevant unit
            continue
        labelled.add(key)
        text = str(relevance["unit"].iloc[k])
        if group is not None and group[k] >= 0:
            text += f" ({names[group[k]] if names is not None else group[k]})"
        ax.annotate(text, (position[k], height[k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("input position" if pattern is not None else "unit position")
    ax.set_ylabel("|relevance|")
    ax.set_title(title or f"relevance of {len(relevance)} units", fontsize=9)
    return ax


def _runs(values: np.ndarray) -> np.ndarray:
    """Index of the run of equal consecutive values each entry belongs to."""
    return np.concatenate([[0], np.cumsum(values[1:] != values[:-1])])
