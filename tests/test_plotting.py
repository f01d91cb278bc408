import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import sparselayers as sl  # noqa: E402


def test_plot_shows_density_per_pixel_and_block_frames():
    pattern = sl.patterns.block_diagonal([(4, 2), (4, 2), (8, 4)])
    ax = pattern.plot()
    image = ax.images[0].get_array()
    np.testing.assert_array_equal(np.asarray(image), pattern.to_dense())  # small: one pixel per cell
    assert len(ax.patches) == 3
    assert "block-diagonal: 3 blocks" in ax.get_title()


def test_plot_bins_big_patterns_without_a_dense_array():
    pattern = sl.patterns.random((5000, 3000), density=0.01, seed=0)
    ax = pattern.plot(resolution=100)
    image = np.asarray(ax.images[0].get_array())
    assert image.shape == (100, 100)
    assert image.mean() == pytest.approx(pattern.density, rel=1e-6)


def test_binned_dense_pattern_is_uniformly_full():
    # 256 rows in 100 pixels: uneven bins used to stripe a dense pattern
    ax = sl.patterns.dense((256, 1000)).plot(resolution=100)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), 1.0)


def test_thin_diagonal_of_a_large_pattern_stays_visible():
    pattern = sl.patterns.block_diagonal([(16, 16)] * 1024)  # a 1/1024-wide diagonal
    image = pattern.plot(resolution=100).images[0]
    fraction = np.asarray(image.get_array())
    grey = np.asarray(image.to_rgba(fraction))[..., :3].mean(-1)  # 1 white, 0 black
    assert np.all(fraction.diagonal() > 0) and fraction.max() < 0.2  # each pixel holds a few entries
    assert np.all(grey[fraction > 0] <= 0.6)  # occupied pixels read as at least mid grey
    np.testing.assert_array_equal(grey[fraction == 0], 1.0)


def test_missing_matplotlib_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'sparselayers\[plot\]'"):
        sl.patterns.dense((2, 2)).plot()


def test_repr_and_summary_report_structure_and_dead_units():
    p = sl.SparsityPattern.from_coo([0, 0, 2], [0, 1, 1], (4, 3))
    assert repr(p) == "SparsityPattern(shape=(4, 3), nnz=3, density=0.25, structure='unstructured')"
    text = p.summary()
    assert "dead inputs): 2" in text and "bias only): 1" in text
    assert "fan-in per output: min 0, mean 1, max 2" in text


def test_plotting_is_reachable_from_the_package():
    import importlib

    assert sl.plotting is importlib.import_module("sparselayers.plotting")
    assert callable(sl.plotting.plot_manhattan)
