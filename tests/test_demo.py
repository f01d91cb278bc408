import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sparselayers import baselines, cli, demo

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_problem_targets_are_standardised_and_learnable_shapes():
    problem = demo.make_problem(10, 200, seed=0)
    assert problem.x_train.shape == (200, 16) and problem.y_train.shape == (200, 10)
    assert problem.x_val.shape[0] == 50
    np.testing.assert_allclose(np.concatenate([problem.y_train, problem.y_val]).std(0), 1.0, atol=0.05)


def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path):
    out = str(tmp_path / "demo")
    result = demo.run(outputs=6, hidden=[4, 4], epochs=2, out=out, samples=256, trunk=16, batch=64,
                      timing_steps=1, verbose=0)
    for name in ("patterns.png", "loss.png", "predictions.png", "comparison.png", "summary.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open("/proc/self/status") as f:
        hwm_mib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    assert 0 < result["peak_mib"] <= hwm_mib
    assert f"{result['peak_mib']:,.0f} MiB" in open(os.path.join(out, "summary.md")).read()
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


def test_masked_baseline_too_large_is_measured_on_fewer_towers_and_scaled(tmp_path, monkeypatch):
    # 6 towers of [4, 4] on a trunk of 16: 16*4k + 4k*4k + 4k*k dense entries for k towers
    entries = [16 * 4 * k + 4 * k * 4 * k + 4 * k * k for k in range(7)]
    monkeypatch.setattr(demo, "MASKED_MAX_ENTRIES", entries[3] + 1)
    result = demo.run(outputs=6, hidden=[4, 4], epochs=1, out=str(tmp_path), samples=256, trunk=16, batch=64,
                      timing_steps=1, verbose=0)
    rows = {r["method"]: r for r in result["rows"]}
    masked = rows["masked dense"]
    towers = result["model"].get_layer("towers")
    full = baselines.masked_towers(towers)
    trunk_params = result["model"].get_layer("trunk").count_params()
    # the figures describe the full-size baseline, the note says what was measured
    assert masked["params"] == trunk_params + sum(w.numpy().size for w in full.trainable_weights)
    assert masked["mib"] == pytest.approx((16 * masked["params"] + 4 * entries[6]) / 2**20)
    assert f"measured on 3 of 6 towers ({entries[3]:,} of {entries[6]:,} dense entries)" in masked["note"]
    assert f"step scaled x{entries[6] / entries[3]:.1f}" in masked["note"]
    assert "outputs equal Towers'" in masked["note"] and np.isnan(masked["val"])
    assert masked["step"] > 0


def test_default_demo_builds_the_masked_baseline_within_its_entry_budget():
    defaults = cli.parser().parse_args(["demo"])
    widths = [*defaults.hidden, 1]

    def entries(k):  # dense kernels of k towers: trunk -> k*16 -> k*16 -> k
        return defaults.trunk * k * widths[0] + sum(k * a * k * b for a, b in zip(widths[:-1], widths[1:]))

    shown = demo.masked_towers_timed(defaults.trunk, widths, defaults.outputs)
    assert 1 <= shown < defaults.outputs
    assert entries(shown) <= demo.MASKED_MAX_ENTRIES < entries(shown + 1)


_MASKED_PEAK = textwrap.dedent("""
    import json
    import numpy as np
    from sparselayers import baselines, cli, demo
    from tests import peak_memory

    defaults = cli.parser().parse_args(["demo"])
    model = demo.build_model(16, defaults.outputs, defaults.hidden, defaults.trunk)
    towers = model.get_layer("towers")
    built = demo.masked_towers_timed(defaults.trunk, towers.widths, defaults.outputs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, defaults.trunk)).astype("float32")
    y = rng.normal(size=(256, built)).astype("float32")
    before = peak_memory.start()
    masked = baselines.masked_towers(towers, range(built))
    demo._time_step(masked, x, y, steps=1)  # the demo's own timing: compile, warm-up step, timed step
    growth = peak_memory.growth_kib(before)
    print(json.dumps({"entries": demo.dense_entries(defaults.trunk, towers.widths, built),
                      "before_kib": before, "growth_kib": growth}))
""")


def test_masked_baseline_of_the_default_demo_trains_within_its_memory_estimate():
    done = subprocess.run([sys.executable, "-c", _MASKED_PEAK], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    estimate = demo.MASKED_BYTES_PER_ENTRY * measured["entries"]
    # the estimate the demo plans with holds, and the baseline it builds
    # leaves room under 4 GiB for the rest of the demo
    assert 1024 * measured["growth_kib"] <= estimate
    assert 1024 * (measured["before_kib"] + measured["growth_kib"]) < 3 * 2**30
