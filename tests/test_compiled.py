"""The compiled kernels: against the float64 reference, their build and cache, their fallback, their seams.

``tests/test_ops.py`` and ``tests/test_conformance.py`` run every kernel of
``sl.ops.KERNELS`` through their checks, the compiled ones included; this
file adds what is particular to them. The library is built once per test
session, into the session's temporary cache (``tests/conftest.py``).
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import sparselayers as sl
from sparselayers.ops.compiled import build
from sparselayers.ops.compiled import kernels as kernels_module
from tests import reference
from tests.test_ops import check_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILED = sorted(sl.ops.compiled.COMPILED)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def blocks_with_gaps():
    """Blocks in no particular order, with empty rows and columns between and around them."""
    mask = np.zeros((61, 75), bool)
    mask[2:9, 40:73] = True  # 33 columns: one register tile and an edge column
    mask[12:50, 1:35] = True
    mask[55:56, 37:38] = True
    return sl.SparsityPattern.from_dense(mask)


def patterns():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 29)) < 0.15
    mask[5] = False  # an empty row
    mask[:, 11] = False  # an empty column
    return {
        "random odd": sl.SparsityPattern.from_dense(mask),
        "empty": sl.SparsityPattern.from_dense(np.zeros((6, 5), bool)),
        "full": sl.SparsityPattern.from_dense(np.ones((9, 7), bool)),
        "one hub column": sl.SparsityPattern.from_dense(np.eye(13, 3, k=-1, dtype=bool) | (np.arange(3) == 1)),
        "banded": sl.patterns.banded((31, 23), lower=3, upper=2),
        "block diagonal": sl.patterns.block_diagonal([(3, 5), (7, 2), (1, 1)]),
        "blocks with gaps": blocks_with_gaps(),
        "wide blocks": sl.patterns.block_diagonal([(40, 33), (9, 64), (70, 40)]),
    }


#: A pattern each compiled kernel computes with its own ops (not its twin).
FUSED_PATTERN = {"compiled_csr": patterns()["random odd"], "compiled_block": blocks_with_gaps()}


@pytest.mark.parametrize("name", COMPILED)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
@pytest.mark.parametrize("batch", [0, 1, 2, 7, 33, 300])
def test_forward_and_gradients_match_the_float64_reference(built, name, dtype, tol, batch):
    for label, pattern in patterns().items():
        try:
            check_kernel(name, pattern, batch=batch, dtype=dtype, tol=tol)
        except AssertionError as error:
            raise AssertionError(f"{label}: {error}") from error


@pytest.mark.parametrize("name", COMPILED)
def test_the_compiled_ops_run_in_the_default_context(built, name):
    pattern = FUSED_PATTERN[name]
    kernel = sl.ops.get_kernel(name, pattern)
    x, values = tf.ones((3, pattern.shape[0])), tf.ones(pattern.nnz)
    traced = tf.function(lambda x, v: kernel(x, v)).get_concrete_function(x, values)
    assert any(op.type.startswith("Sparselayers") for op in traced.graph.get_operations())
    with sl.ops.context.exporting("tf_saved_model"):
        exported = tf.function(lambda x, v: kernel(x, v)).get_concrete_function(x, values)
    assert not any(op.type.startswith("Sparselayers") for op in exported.graph.get_operations())


@pytest.mark.parametrize("name", [*COMPILED, "compiled_csr, tiled"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-3)])
def test_second_order_gradients_match_the_float64_reference(built, name, dtype, tol, monkeypatch):
    # h = sum(u * d/dx sum((x @ W)**2)) = 2 tr(u.T x W W.T): dh/dW = 2 (A + A.T) W with
    # A = u.T x, and dh/dx = 2 u W W.T; a gradient penalty or a Hessian-vector product.
    if name.endswith(", tiled"):  # the batch of 5 runs tile by tile
        name = name.split(",")[0]
        monkeypatch.setattr(kernels_module, "TILED_MIN_BATCH", 5)
    pattern = FUSED_PATTERN[name]
    rng = np.random.default_rng(3)
    x, u = (rng.normal(size=(5, pattern.shape[0])) for _ in range(2))
    values = rng.normal(size=pattern.nnz)
    kernel = sl.ops.get_kernel(name, pattern)
    xt, vt = tf.constant(x, dtype), tf.constant(values, dtype)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([xt, vt])
        with tf.GradientTape() as inner:
            inner.watch(xt)
            f = tf.reduce_sum(kernel(xt, vt) ** 2)
        h = tf.reduce_sum(tf.constant(u, dtype) * inner.gradient(f, xt))
    d_values, d_x = outer.gradient(h, [vt, xt])
    w = pattern.to_dense(values).astype(np.float64)
    a = u.T @ x
    dense_dw = 2 * (a + a.T) @ w
    rows, cols = pattern.indices.T
    np.testing.assert_allclose(d_values.numpy(), dense_dw[rows, cols], rtol=tol, atol=tol)
    np.testing.assert_allclose(d_x.numpy(), 2 * u @ w @ w.T, rtol=tol, atol=tol)


def test_which_patterns_the_block_ops_compute():
    fused = {label for label, p in patterns().items() if sl.ops.CompiledBlockKernel.accepts(p)}
    # blocks that share no row or column; a band or random entries do not qualify
    assert fused == {"full", "block diagonal", "blocks with gaps", "wide blocks"}
    shared = np.zeros((20, 20), bool)
    shared[0:5, 0:5] = shared[0:5, 10:15] = True  # two blocks on the same rows
    assert not sl.ops.CompiledBlockKernel.accepts(sl.SparsityPattern.from_dense(shared))


@st.composite
def disjoint_blocks(draw):
    """Blocks of 1 to 40 rows and columns, gaps between them, their columns in a drawn order."""
    sizes = draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=4))
    gaps = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=len(sizes), max_size=len(sizes)))
    order = draw(st.permutations(range(len(sizes))))
    row_starts = np.cumsum([0] + [r + g for (r, _), (g, _) in zip(sizes, gaps)])[:-1] + [g for g, _ in gaps]
    col_widths = [(sizes[k][1], gaps[k][1]) for k in order]
    col_starts_in_order = np.cumsum([0] + [c + g for c, g in col_widths])[:-1] + [g for _, g in col_widths]
    col_starts = np.empty(len(sizes), int)
    col_starts[list(order)] = col_starts_in_order
    mask = np.zeros((int(row_starts[-1] + sizes[-1][0] + 2), int(max(col_starts + [c for _, c in sizes]) + 1)), bool)
    for (r, c), r0, c0 in zip(sizes, row_starts, col_starts):
        mask[r0 : r0 + r, c0 : c0 + c] = True
    return sl.SparsityPattern.from_dense(mask)


@settings(max_examples=30, deadline=None)
@given(pattern=disjoint_blocks(), batch=st.integers(0, 40), dtype=st.sampled_from(["float32", "float64"]))
def test_the_block_ops_on_any_block_diagonal_pattern(built, pattern, batch, dtype):
    assert sl.ops.get_kernel("compiled_block", pattern).fused
    check_kernel("compiled_block", pattern, batch=batch, dtype=dtype, tol=1e-4 if dtype == "float32" else 1e-12)


def _huge_pattern(name, rows, cols, rng):
    """Few entries in a rows x cols layer: scattered, or for the block ops 2x3 blocks on disjoint lines."""
    if name == "compiled_block":
        starts = np.sort(rng.choice(rows // 2, 60, replace=False)) * 2, np.sort(rng.choice(cols // 3, 60, replace=False)) * 3
        cells = [(r + i, c + j) for r, c in zip(*starts) for i in range(2) for j in range(3)]
        return np.array(cells)
    return np.unique(np.stack([rng.integers(0, rows, 300), rng.integers(0, cols, 300)], 1), axis=0)


@pytest.mark.parametrize("name", COMPILED)
def test_a_layer_beyond_2_to_the_31_cells(built, name):
    rows, cols = 65536, 32769  # 2**31 + 2**16 cells, few entries
    rng = np.random.default_rng(1)
    indices = _huge_pattern(name, rows, cols, rng)
    pattern = sl.SparsityPattern(indices, (rows, cols))
    assert rows * cols > 2**31 and sl.ops.get_kernel(name, pattern).fused
    x = np.zeros((3, rows), "float32")
    x[:, indices[:, 0]] = rng.normal(size=(3, len(indices)))
    values = rng.normal(size=pattern.nnz).astype("float32")
    upstream = np.zeros((3, cols), "float32")
    upstream[:, indices[:, 1]] = rng.normal(size=(3, len(indices)))
    kernel = sl.ops.get_kernel(name, pattern)
    xt, vt = tf.constant(x), tf.constant(values)
    with tf.GradientTape() as tape:
        tape.watch([xt, vt])
        loss = tf.reduce_sum(kernel(xt, vt) * upstream)
    d_x, d_values = tape.gradient(loss, [xt, vt])
    # The reference, restricted to the rows and columns that hold entries.
    used_rows, row_of = np.unique(indices[:, 0], return_inverse=True)
    used_cols, col_of = np.unique(indices[:, 1], return_inverse=True)
    small = sl.SparsityPattern(np.stack([row_of.ravel(), col_of.ravel()], 1), (len(used_rows), len(used_cols)))
    order = np.lexsort((col_of.ravel(), row_of.ravel()))
    assert np.array_equal(small.indices, np.stack([row_of.ravel(), col_of.ravel()], 1)[order])
    ref_dx, ref_dv, _ = reference.gradients(x[:, used_rows], small, values[order], upstream[:, used_cols])
    np.testing.assert_allclose(d_x.numpy()[:, used_rows], ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_values.numpy()[order], ref_dv, rtol=1e-4, atol=1e-4)


def test_auto_takes_the_compiled_kernel_when_built(built):
    pattern = sl.patterns.random((400, 300), density=0.01, seed=0)
    assert sl.ops.choose_kernel(pattern) == "csr"
    layer = sl.SparseDense(pattern)
    assert layer.kernel_name == "compiled_csr"
    assert layer.jit_kernel_name == sl.ops.choose_jit_kernel(pattern, "csr")


@pytest.mark.parametrize(
    "pattern,static,auto",
    [
        (sl.patterns.random((300, 300), density=0.2, seed=0), "dense", "compiled_csr"),
        (sl.patterns.random((300, 300), density=0.3, seed=0), "dense", "dense"),
        (sl.patterns.banded((500, 500), lower=16, upper=16), "banded", "compiled_csr"),
        (sl.patterns.block_diagonal([(64, 64)] * 4), "block", "compiled_block"),
        (sl.patterns.block_diagonal([(32, 40)] * 3), "block", "compiled_block"),
        (sl.patterns.block_diagonal([(16, 16)] * 8), "block", "block"),  # too narrow for its register tile
        (sl.patterns.block_diagonal([(128, 8)] * 8), "block", "block"),  # thin blocks, though of 1024 entries
        (sl.patterns.block_diagonal([(8, 128)] * 8), "block", "block"),
        (sl.patterns.block_diagonal([(256, 256)] * 2), "block", "block"),  # oneDNN's GEMM wins
        (sl.patterns.dense((256, 2048)), "block", "block"),  # Towers' first layer
    ],
)
def test_auto_takes_a_compiled_kernel_only_where_it_measured_faster(built, pattern, static, auto):
    assert sl.ops.choose_kernel(pattern) == static
    assert sl.SparseDense(pattern).kernel_name == auto


def test_the_block_ops_check_their_block_table(built):
    ops = build.library()
    x, values = tf.ones((2, 6)), tf.ones(6)
    for table in (
        [[0, 0, 2, 3, 1]], [[5, 0, 2, 3, 0]], [[0, 2, 2, 3, 0]], [[0, 0, -1, 3, 0]], [[0, 0, 2, 3]],
        [[0, 0, 1, 1, 0], [0, 2, 1, 1, 1]],  # two blocks on one row: threads would race
        [[0, 0, 1, 1, 0], [1, 0, 1, 1, 1]],  # on one column
        [[0, 0, 1, 2, 0], [1, 2, 1, 1, 1]],  # sharing a value
        [[0, 0, 2, 0, 0], [1, 1, 1, 1, 0]],  # a block of no columns still owns its rows
    ):
        with pytest.raises(tf.errors.InvalidArgumentError, match="block"):
            ops.sparselayers_block_matmul(x, values, tf.constant(table, tf.int64), units=4)
        with pytest.raises(tf.errors.InvalidArgumentError, match="block"):
            ops.sparselayers_block_grad(x, tf.ones((2, 4)), values, tf.constant(table, tf.int64))


def _serve_script(paths):
    return textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, tensorflow as tf
        out = {{}}
        for name, path in json.loads({json.dumps(json.dumps(paths))}).items():
            served = tf.saved_model.load(path)
            fn = served.signatures["serving_default"]
            x = tf.constant(np.load(path + ".x.npy"))
            (y,) = fn(x).values()
            out[name] = float(np.abs(y.numpy() - np.load(path + ".y.npy")).max())
        assert "sparselayers" not in sys.modules
        assert not any(name.startswith("Sparselayers") for name in tf.raw_ops.__dict__)
        print(json.dumps(out))
        """
    )


def test_saved_models_never_hold_the_compiled_op(built, tmp_path):
    pattern = sl.patterns.random((40, 30), density=0.1, seed=2)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((40,))
    hidden = sl.SparseDense(pattern, kernel="compiled_csr")(inputs)
    blocks = sl.SparseDense(sl.patterns.block_diagonal([(15, 16)] * 2), kernel="compiled_block")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2)(blocks))
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(8, 40)).astype("float32")
    model.fit(x, np.ones((8, 2), "float32"), verbose=0)  # traced and run with the compiled op
    model.predict(x, verbose=0)
    expected = model(x).numpy()
    paths = {"keras export": str(tmp_path / "export"), "tf.saved_model.save": str(tmp_path / "saved")}
    model.export(paths["keras export"], verbose=False)
    tf.saved_model.save(model, paths["tf.saved_model.save"])
    for path in paths.values():
        np.save(path + ".x.npy", x)
        np.save(path + ".y.npy", expected)
        assert b"Sparselayers" not in (pathlib.Path(path) / "saved_model.pb").read_bytes()
    done = subprocess.run([sys.executable, "-c", _serve_script(paths)], capture_output=True, text=True, env=ENV,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == set(paths) and max(errors.values()) < 1e-5, errors


def test_switched_off_the_kernels_compute_with_their_twins(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf, sparselayers as sl
        from sparselayers.ops.compiled import build
        p = sl.patterns.random((50, 40), density=0.05, seed=0)
        layer = sl.SparseDense(p, kernel="compiled_csr", use_bias=False)
        x = np.random.default_rng(0).normal(size=(4, 50)).astype("float32")
        y = layer(x).numpy()
        w = p.to_dense(layer.values.numpy())
        assert np.allclose(y, x @ w, atol=1e-5), "wrong product"
        b = sl.patterns.block_diagonal([(10, 40)] * 5)
        blocks = sl.SparseDense(b, kernel="compiled_block", use_bias=False)
        assert np.allclose(blocks(x).numpy(), x @ b.to_dense(blocks.values.numpy()), atol=1e-5), "wrong block product"
        # kernel_name names what computed: the twins, not the switched-off compiled kernels
        assert layer.kernel_name == sl.ops.compiled.pure_tf_kernel("compiled_csr", p), layer.kernel_name
        assert blocks.kernel_name == "block", blocks.kernel_name
        assert sl.SparseDense(b).kernel_name == "block"
        assert sl.SparseDense(p).kernel_name == sl.ops.choose_kernel(p)
        assert not build.available() and build.library_path() is None
        assert not any(name.startswith("Sparselayers") for name in tf.raw_ops.__dict__)
        assert not list((__import__("pathlib").Path(sl._cache.cache_folder()) / "compiled").glob("*.so"))
        print("fallback ok")
        """
    )
    env = {**ENV, build.ENABLED_ENV: "0", "SPARSELAYERS_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fallback ok" in done.stdout


@pytest.fixture
def fresh_state(monkeypatch):
    """build's per-process decision, forgotten for the test and restored after it."""
    monkeypatch.setattr(build, "_state", {})


def test_a_broken_compiler_ends_on_the_fallback_with_one_log_line(fresh_state, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", shutil.which("false") or "false")
    monkeypatch.setenv("SPARSELAYERS_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sparselayers.compiled"):
        assert build.library() is None
        assert build.library() is None  # decided once
    lines = [r for r in caplog.records if r.name == "sparselayers.compiled"]
    assert len(lines) == 1 and "pure-TensorFlow" in lines[0].getMessage() and build.ENABLED_ENV in lines[0].getMessage()
    pattern = sl.patterns.random((20, 10), density=0.2, seed=0)
    check_kernel("compiled_csr", pattern, batch=3)  # computes with the twin


def test_a_compiler_that_fails_to_compile_leaves_no_file(monkeypatch, tmp_path):
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'error: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(build.BuildError, match="failed to compile"):
        build.cached_library(tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]


def _copying_compiler(tmp_path, library, delay=0.0):
    """A stand-in compiler: answers --version, waits, copies the real library to -o and counts its builds."""
    fake = tmp_path / "copying-cxx"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import shutil, sys, time
        if "--version" in sys.argv[1:]:
            print("copying compiler 1.0"); sys.exit(0)
        with open({str(tmp_path / "builds")!r}, "a") as log:
            log.write("build\\n")
        time.sleep({delay})
        shutil.copyfile({str(library)!r}, sys.argv[sys.argv.index("-o") + 1])
        """))
    fake.chmod(0o755)
    return fake


def test_an_unwritable_cache_folder_builds_privately(built, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CXX", str(_copying_compiler(tmp_path, built)))
    with caplog.at_level(logging.WARNING, logger="sparselayers.compiled"):
        path = build.cached_library(blocker / "compiled")
    assert path.is_file() and path.read_bytes() == pathlib.Path(built).read_bytes()
    assert not str(path).startswith(str(blocker))
    assert any("cannot write" in r.getMessage() for r in caplog.records)


def test_two_processes_building_at_once_compile_once(built, tmp_path):
    fake = _copying_compiler(tmp_path, built, delay=1.0)
    folder = tmp_path / "cache"
    script = "from sparselayers.ops.compiled import build; import sys; print(build.cached_library(__import__('pathlib').Path(sys.argv[1])))"
    env = {**ENV, "CXX": str(fake)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    (path,) = paths
    assert pathlib.Path(path).read_bytes() == pathlib.Path(built).read_bytes()
    assert (tmp_path / "builds").read_text().count("build") == 1
    assert sorted(p.suffix for p in folder.iterdir()) == [".lock", ".sha256", ".so"]  # no temporary left


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
@pytest.mark.parametrize("label", ["random odd", "empty", "full", "one hub column"])
def test_from_the_tiled_batch_compiled_csr_runs_tile_by_tile(built, monkeypatch, dtype, tol, label):
    # Batches from TILED_MIN_BATCH rows take the direct convolution's ops on a
    # 1x1 window; lowered here so that small sizes cover edges and three
    # source blocks, checked against the float64 reference like any batch.
    from sparselayers.ops import conv as conv_products

    monkeypatch.setattr(kernels_module, "TILED_MIN_BATCH", 40)
    monkeypatch.setattr(conv_products, "source_blocks", lambda source_rows, *_: min(3, source_rows))
    pattern = patterns()[label]
    kernel = sl.ops.get_kernel("compiled_csr", pattern)
    x = tf.ones((41, pattern.shape[0]), dtype)
    traced = tf.function(lambda x, v: kernel(x, v)).get_concrete_function(x, tf.ones(pattern.nnz, dtype))
    assert any(op.type == "SparselayersConvForward" for op in traced.graph.get_operations())
    for batch in (40, 301):
        check_kernel("compiled_csr", pattern, batch=batch, dtype=dtype, tol=tol)

