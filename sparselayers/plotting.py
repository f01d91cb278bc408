"""Pictures of patterns; matplotlib is an optional dependency."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparselayers.sparsity_pattern import SparsityPattern
from sparselayers.structure import describe, detect_blocks


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Plotting needs matplotlib: pip install 'sparselayers[plot]' (or pip install matplotlib)"
        ) from None
    return plt


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
    O(nnz) whatever the shape. With ``boundaries``, the edges of detected
    diagonal blocks are drawn (up to 64 blocks).

    Returns:
        The matplotlib ``Axes``.
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5 * min(2.0, max(0.5, pattern.shape[0] / pattern.shape[1]))))
    n, m = pattern.shape
    bins = (min(n, resolution), min(m, resolution))
    counts, _, _ = np.histogram2d(pattern.rows, pattern.cols, bins=bins, range=[[0, n], [0, m]])
    cell = (n / bins[0]) * (m / bins[1])
    ax.imshow(counts / cell, cmap="Greys", vmin=0, vmax=1, extent=(0, m, n, 0), aspect="auto", interpolation="nearest")
    if boundaries and pattern.nnz:
        blocks = detect_blocks(pattern)
        if blocks.is_diagonal and 1 < blocks.count <= 64:
            for r0, nr, c0, nc in zip(blocks.row_start, blocks.n_rows, blocks.col_start, blocks.n_cols):
                ax.add_patch(plt.Rectangle((c0, r0), nc, nr, fill=False, edgecolor="tab:red", linewidth=0.6))
    ax.set_xlabel("output unit")
    ax.set_ylabel("input feature")
    ax.set_title(title or f"{n}x{m}, nnz={pattern.nnz} ({describe(pattern)})", fontsize=9)
    return ax
