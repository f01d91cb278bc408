"""MkDocs hook: draws the pattern gallery from the real generators at build time."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GALLERY = {
    "block_diagonal": "sl.patterns.block_diagonal([(8, 6), (8, 6), (12, 4), (4, 12)])",
    "block_sparse": "sl.patterns.block_sparse([[1, 0, 1], [0, 1, 0], [1, 1, 0]], (8, 8))",
    "banded": "sl.patterns.banded((32, 32), lower=2, upper=4)",
    "random_density": "sl.patterns.random((32, 32), density=0.1, seed=0)",
    "random_fan_in": "sl.patterns.random((32, 32), fan_in=3, seed=0)",
    "local": "sl.patterns.local((48, 16), window=5)",
    "n_of_m": "sl.patterns.n_of_m((32, 32), 1, 4, seed=0)",
    "union": "sl.patterns.banded((32, 32), lower=1, upper=1) | sl.patterns.random((32, 32), density=0.05, seed=1)",
    "kron": "sl.patterns.banded((4, 4), upper=1).kron(sl.patterns.random((8, 8), density=0.4, seed=0))",
    "towers_layer": "sl.patterns.block_diagonal([(4, 4)] * 8)",
}
#: Titles in the generator's own terms where the detected structure counts
#: otherwise: ``structure`` counts dense rectangles, and two tiles side by
#: side make one.
TITLES = {"block_sparse": lambda p: f"block-sparse: {p.nnz // 64} tiles of 8x8"}


def on_pre_build(config, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sparselayers as sl

    out = os.path.join(config["docs_dir"], "gallery")
    os.makedirs(out, exist_ok=True)
    for name, code in GALLERY.items():
        pattern = eval(code, {"sl": sl})  # noqa: S307 - our own constant table
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
        structure = TITLES[name](pattern) if name in TITLES else pattern.structure
        pattern.plot(ax, title=f"{structure}\nnnz={pattern.nnz}, density={pattern.density:.3g}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=90)
        plt.close(fig)
    import shutil

    benchmarks = os.path.join(os.path.dirname(config["docs_dir"]), "benchmarks")
    for plot in ("density.png", "scale.png"):
        if os.path.exists(os.path.join(benchmarks, plot)):
            shutil.copy(os.path.join(benchmarks, plot), os.path.join(out, plot))
