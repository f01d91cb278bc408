import os

import numpy as np
import pytest

from sparselayers import cli, demo


def test_problem_targets_are_standardised_and_learnable_shapes():
    problem = demo.make_problem(10, 200, seed=0)
    assert problem.x_train.shape == (200, 16) and problem.y_train.shape == (200, 10)
    assert problem.x_val.shape[0] == 50
    np.testing.assert_allclose(np.concatenate([problem.y_train, problem.y_val]).std(0), 1.0, atol=0.05)


def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path):
    out = str(tmp_path / "demo")
    result = demo.run(outputs=6, hidden=[4, 4], epochs=2, out=out, samples=256, trunk=16, batch=64,
                      timing_steps=1, verbose=0)
    for name in ("patterns.png", "loss.png", "predictions.png", "summary.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    rows = {r["method"]: r for r in result["rows"]}
    towers = rows["sparselayers Towers"]
    # every baseline carries the trained weights: the same function, the same loss
    for name in ("masked dense", "one Dense MLP per output"):
        assert rows[name]["val"] == pytest.approx(towers["val"], rel=1e-4)
    assert rows["one Dense MLP per output"]["params"] == towers["params"]
    assert rows["masked dense"]["params"] > towers["params"]
    assert towers["val"] == pytest.approx(result["history"]["val_loss"][-1], rel=1e-3)


def test_cli_parses_sizes_and_rejects_bad_ones():
    args = cli.parser().parse_args(["demo", "--outputs", "8", "--hidden", "4,2", "--epochs", "1", "--out", "x"])
    assert (args.outputs, args.hidden, args.epochs, args.out) == (8, [4, 2], 1, "x")
    for bad in (["demo", "--outputs", "0"], ["demo", "--hidden", "a,b"], ["demo", "--hidden", "4,-1"]):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(bad)
