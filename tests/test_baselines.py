import keras
import numpy as np
import pytest

import sparselayers as sl
from sparselayers import baselines
from tests import reference


def _built_towers(n_towers, hidden, output_units, input_dim, **kwargs):
    towers = sl.Towers(n_towers, hidden_units=hidden, output_units=output_units, **kwargs)
    towers.build((None, input_dim))
    for layer in towers.tower_layers:  # nonzero biases, so a dropped bias would show
        layer.bias.assign(np.random.default_rng(1).normal(size=layer.bias.shape).astype("float32"))
    return towers


def _reference_outputs(towers, x):
    layers = [
        (layer.pattern, keras.ops.convert_to_numpy(layer.values), keras.ops.convert_to_numpy(layer.bias),
         None if k == len(towers.tower_layers) - 1 else "relu")
        for k, layer in enumerate(towers.tower_layers)
    ]
    return reference.chain(x, layers)


@pytest.mark.parametrize("chosen", [None, [0], [1, 3], [4, 2]])
def test_masked_towers_compute_the_chosen_towers_outputs(chosen):
    towers = _built_towers(5, [3, 2], 2, 4)
    x = np.random.default_rng(0).normal(size=(7, 4)).astype("float32")
    expected = _reference_outputs(towers, x)
    if chosen is not None:
        expected = expected[:, np.concatenate([towers.output_columns(t) for t in chosen])]
    masked = baselines.masked_towers(towers, chosen)
    np.testing.assert_allclose(masked(x), expected, rtol=1e-5, atol=1e-5)
    count = 5 if chosen is None else len(chosen)
    # dense kernels over the chosen towers only: 4 -> 3k -> 2k -> 2k
    shapes = [(4, 3 * count), (3 * count, 2 * count), (2 * count, 2 * count)]
    assert [tuple(layer.kernel.shape) for layer in masked.layers] == shapes
    assert masked.count_params() == sum(a * b + b for a, b in shapes)


def test_masked_towers_refuse_towers_that_feed_other_towers():
    towers = _built_towers(3, [2], 1, 4)
    middle = towers.tower_layers[1].pattern
    crossing = middle | sl.SparsityPattern.from_coo([2], [0], middle.shape)  # tower 1's unit feeds tower 0
    towers = _built_towers(3, [2], 1, 4, layer_patterns=[None, crossing])
    with pytest.raises(ValueError, match=r"`towers_to_build`.*Received: towers_to_build=\[0\]"):
        baselines.masked_towers(towers, [0])
    baselines.masked_towers(towers, [0, 1])  # both ends of the connection chosen: exact


@pytest.mark.parametrize("bad", [[], [3], [-1], [0, 0]])
def test_masked_towers_reject_bad_tower_lists(bad):
    towers = _built_towers(3, [2], 1, 4)
    with pytest.raises(ValueError, match=r"`towers_to_build` must list distinct towers from 0 to 2\. Received"):
        baselines.masked_towers(towers, bad)
