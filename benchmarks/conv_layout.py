"""Draws docs/images/conv-layout.png: a 3x3 convolution's kernel as the 2-D view its pattern is laid over.

    python benchmarks/conv_layout.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import sparselayers as sl  # noqa: E402

TAPS, CHANNELS, FILTERS = 9, 4, 8


def main() -> None:
    pattern = sl.patterns.random((TAPS * CHANNELS, FILTERS), density=0.25, seed=3)
    mask = pattern.to_dense()
    fig, ax = plt.subplots(figsize=(5.6, 8.5), dpi=110)
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.6, aspect="equal", interpolation="nearest")
    for tap in range(1, TAPS):
        ax.axhline(tap * CHANNELS - 0.5, color="tab:blue", lw=1.2)
    for tap in range(TAPS):
        ax.text(-1.0, tap * CHANNELS + CHANNELS / 2 - 0.5, f"tap ({tap // 3}, {tap % 3})", ha="right", va="center", fontsize=12)
    ax.set_xticks(range(FILTERS))
    ax.set_xlabel("filters (the view's columns)", fontsize=13)
    ax.set_yticks([])
    ax.set_title(
        f"kernel (3, 3, {CHANNELS}, {FILTERS}) -> view ({TAPS * CHANNELS}, {FILTERS})\n"
        f"rows: tap by tap, channels 0-{CHANNELS - 1} within each tap; {pattern.nnz} entries stored",
        fontsize=13,
    )
    fig.tight_layout()
    path = os.path.join(os.path.dirname(HERE), "docs", "images", "conv-layout.png")
    fig.savefig(path)
    print(path)


if __name__ == "__main__":
    main()
