"""The compiled kernels' cache under attack and misuse, and the environment variables read as words.

Each attack is a reproducer: files planted where the build looks for its
library, then a fresh process (``_layer_in_a_process``) that imports
sparselayers and multiplies with a ``compiled_csr`` layer, so that a bus
error or a planted constructor cannot touch pytest. The library is compiled
once per test session (the ``built`` fixture of ``tests/test_compiled.py``);
every later "build" here is a stand-in compiler that copies it.
"""

import hashlib
import json
import logging
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

import sparselayers as sl
from sparselayers.ops.compiled import build
from tests.test_compiled import ENV, ROOT, _copying_compiler, fresh_state  # noqa: F401
from tests.test_ops import check_kernel

#: The account that plays the attacker, or the second user of a shared cache.
NOBODY = 65534
as_root = pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="acts as another account")


def user_folder(cache: pathlib.Path, uid: int | None = None) -> pathlib.Path:
    """Where the build keeps an account's libraries: its own folder in the cache (docs/kernels.md)."""
    return cache / f"compiled-uid{os.getuid() if uid is None else uid}"


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(library: pathlib.Path, digest: str) -> None:
    """Writes the hash file the build keeps beside ``library`` (the format of ``sha256sum``)."""
    library.with_name(library.name + ".sha256").write_text(f"{digest}  {library.name}\n")


def planted_library(folder: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """A shared library whose constructor writes ``marker`` when anything loads it."""
    source = folder / "planted.c"
    source.write_text(textwrap.dedent(f"""\
        #include <stdio.h>
        __attribute__((constructor)) static void planted(void) {{
            FILE *f = fopen("{marker}", "w");
            if (f) {{ fputs("constructor ran", f); fclose(f); }}
        }}
        int sparselayers_planted = 1;
        """))
    target = folder / "planted.so"
    subprocess.run([*shlex.split(os.environ.get("CXX") or "g++"), "-x", "c", "-shared", "-fPIC", str(source), "-o",
                    str(target)], check=True, capture_output=True)
    return target


def expected_name(monkeypatch, cxx: pathlib.Path | str) -> str:
    """The library's file name for the compiler ``cxx``, computed as the build does."""
    monkeypatch.setenv("CXX", str(cxx))
    return build.library_name(build.compiler())


_LAYER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, sparselayers as sl
    from sparselayers.ops.compiled import build
    if len(sys.argv) > 1:  # the second account, once all is imported: it cannot reach root's Python
        import encodings.ascii  # noqa: F401  (read lazily by open(encoding="ascii"))
        os.setgroups([])
        os.setgid(int(sys.argv[1]))
        os.setuid(int(sys.argv[1]))
    pattern = sl.patterns.random((50, 40), density=0.1, seed=0)
    layer = sl.SparseDense(pattern, kernel="compiled_csr", use_bias=False)
    x = np.random.default_rng(0).normal(size=(4, 50))
    error = np.abs(layer(x.astype("float32")).numpy() - x @ pattern.to_dense(layer.values.numpy())).max()
    print(json.dumps({"available": build.available(), "path": str(build.library_path()), "error": float(error)}))
    """
)


def _layer_in_a_process(cache: pathlib.Path, cxx: pathlib.Path | str, user: int | None = None, **env) -> dict:
    """A fresh process's layer product with this cache and compiler (as account ``user``): its report and log."""
    env = {**ENV, "SPARSELAYERS_CACHE_DIR": str(cache), "CXX": str(cxx), **env}
    done = subprocess.run([sys.executable, "-c", _LAYER, *([str(user)] if user is not None else [])],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] < 1e-4, report  # the right product, compiled or not
    return {**report, "log": done.stderr}


def assert_runs_the_built_library(report: dict, built: str) -> pathlib.Path:
    assert report["available"], report["log"][-3000:]
    path = pathlib.Path(report["path"])
    assert not path.is_symlink() and path.read_bytes() == pathlib.Path(built).read_bytes()
    return path


# Point 6: a planted library is never loaded ------------------------------------


@as_root
def test_a_world_writable_cache_folder_runs_no_planted_library(built, monkeypatch, tmp_path):
    # Another account owns the cache folder, open to all, and has planted its
    # library under the expected name, with a hash file to match.
    fake = _copying_compiler(tmp_path, built)
    name = expected_name(monkeypatch, fake)
    marker = tmp_path / "constructor-ran"
    planted = planted_library(tmp_path, marker)
    shared = tmp_path / "shared"
    for folder in (shared / "compiled", user_folder(shared)):
        folder.mkdir(parents=True)
        shutil.copyfile(planted, folder / name)
        record(folder / name, sha256(planted))
    for path in [shared, *shared.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o777)
    report = _layer_in_a_process(shared, fake)
    assert not marker.exists(), "the planted library's constructor ran"
    path = assert_runs_the_built_library(report, built)
    assert not path.is_relative_to(shared)  # built into a private folder instead
    assert "belongs to uid" in report["log"] and "others cannot write" in report["log"]


def test_a_symbolic_link_at_the_expected_name_is_not_followed(built, monkeypatch, tmp_path):
    fake = _copying_compiler(tmp_path, built)
    name = expected_name(monkeypatch, fake)
    marker = tmp_path / "constructor-ran"
    planted = planted_library(tmp_path, marker)
    cache = tmp_path / "cache"
    for folder in (cache / "compiled", user_folder(cache)):
        folder.mkdir(parents=True, mode=0o700)
        (folder / name).symlink_to(planted)
        record(folder / name, sha256(planted))
    report = _layer_in_a_process(cache, fake)
    assert not marker.exists(), "the planted library's constructor ran"
    path = assert_runs_the_built_library(report, built)
    assert path == user_folder(cache) / name  # rebuilt in place of the link
    assert sha256(path) == (user_folder(cache) / (name + ".sha256")).read_text().split()[0]


def test_a_foreign_library_from_the_compiler_falls_back_instead_of_failing_the_call(
    built, fresh_state, monkeypatch, tmp_path, caplog
):
    # A broken compiler wrapper whose output loads but holds none of the ops.
    marker = tmp_path / "constructor-ran"
    monkeypatch.setenv("CXX", str(_copying_compiler(tmp_path, planted_library(tmp_path, marker))))
    monkeypatch.setenv("SPARSELAYERS_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="sparselayers.compiled"):
        assert build.library() is None
    assert marker.exists()  # it did load: the check is on what it holds
    assert any("sparselayers_row_axpy" in r.getMessage() for r in caplog.records)
    check_kernel("compiled_csr", sl.patterns.random((20, 10), density=0.2, seed=0), batch=3)  # the twin computes


# Point 7: a damaged library is rebuilt -----------------------------------------


@pytest.mark.parametrize("size", [0, 5000, 40000])
def test_a_truncated_library_is_rebuilt(built, monkeypatch, tmp_path, size):
    fake = _copying_compiler(tmp_path, built)
    name = expected_name(monkeypatch, fake)
    cache = tmp_path / "cache"
    for folder in (cache / "compiled", user_folder(cache)):
        folder.mkdir(parents=True, mode=0o700)
        (folder / name).write_bytes(pathlib.Path(built).read_bytes()[:size])
        record(folder / name, sha256(pathlib.Path(built)))  # what the interrupted build recorded
    report = _layer_in_a_process(cache, fake)
    assert assert_runs_the_built_library(report, built) == user_folder(cache) / name
    assert (tmp_path / "builds").read_text().count("build") == 1
    assert "rebuilding" in report["log"]


# Point 8: a cache folder shared between accounts -------------------------------


def _copying_shell_compiler(folder: pathlib.Path, library: pathlib.Path) -> pathlib.Path:
    """As ``_copying_compiler``, in sh: another account can run it without reaching this Python."""
    fake = folder / "copying-cxx"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for word in "$@"; do [ "$word" = --version ] && echo "copying compiler 1.0" && exit 0; done
        echo build >> '{folder / "builds"}'
        for word in "$@"; do [ "$previous" = -o ] && cp '{library}' "$word"; previous=$word; done
        """))
    fake.chmod(0o755)
    (folder / "builds").touch()
    (folder / "builds").chmod(0o666)
    return fake


@as_root
def test_a_cache_folder_shared_between_accounts_serves_both(built):
    # What the second account reads must be outside pytest's private tmp_path.
    with tempfile.TemporaryDirectory() as top:
        top = pathlib.Path(top)
        top.chmod(0o755)
        library = pathlib.Path(shutil.copyfile(built, top / "built.so"))
        fake = _copying_shell_compiler(top, library)
        shared = top / "shared"
        shared.mkdir()
        shared.chmod(0o1777)  # as /tmp: everyone may add, no one may remove another's files
        first = _layer_in_a_process(shared, fake)
        second = _layer_in_a_process(shared, fake, user=NOBODY)
        theirs = assert_runs_the_built_library(second, library)
        assert assert_runs_the_built_library(first, library).parent == user_folder(shared)
        assert (top / "builds").read_text().count("build") == 2  # once per account
        # Kept for that account's later processes: its own private folder, its file and the hash it recorded.
        assert theirs.parent == user_folder(shared, NOBODY) and theirs.stat().st_uid == NOBODY
        assert stat.S_IMODE(theirs.parent.stat().st_mode) == 0o700 and theirs.parent.stat().st_uid == NOBODY
        assert (theirs.parent / (theirs.name + ".sha256")).read_text().split() == [sha256(library), theirs.name]


# Point 9: environment variables ------------------------------------------------

#: Every spelling of the boolean variables, and what it means.
WORDS = [
    ("1", True), ("true", True), ("True", True), (" yes ", True), ("ON", True),
    ("0", False), ("false", False), ("FALSE", False), ("no", False), ("off", False), (" Off\n", False),
]
#: Each boolean variable and how sparselayers reads it now.
READERS = {
    "SPARSELAYERS_COMPILED_KERNELS": lambda: build.enabled(),
    "SPARSELAYERS_AUTOTUNE_CACHE": lambda: sys.modules["sparselayers.autotune"].cache_enabled(),
    "SPARSELAYERS_KERAS_MWMS_FIX": lambda: _mwms_fix_installs(),
}


def _mwms_fix_installs() -> bool:
    """Whether the Keras workaround installs itself with the environment as it is; left installed after."""
    from sparselayers.distribute import keras_mwms_fix

    if not keras_mwms_fix.installed():
        pytest.skip("this Keras needs no workaround")
    keras_mwms_fix.uninstall()
    try:
        return bool(keras_mwms_fix.install())
    finally:
        os.environ.pop(keras_mwms_fix.ENVIRONMENT_VARIABLE)  # the test's monkeypatch puts it back
        keras_mwms_fix.install()


@pytest.mark.parametrize("variable", sorted(READERS))
@pytest.mark.parametrize("word,meaning", WORDS)
def test_every_boolean_variable_reads_the_same_words(monkeypatch, variable, word, meaning):
    from sparselayers import _env

    monkeypatch.setenv(variable, word)
    assert _env.flag(variable, default=not meaning) is meaning
    assert READERS[variable]() is meaning


@pytest.mark.parametrize("word", [None, "", "  "])
def test_an_unset_or_empty_variable_takes_the_default(monkeypatch, word):
    from sparselayers import _env

    if word is None:
        monkeypatch.delenv("SPARSELAYERS_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("SPARSELAYERS_TEST_FLAG", word)
    assert _env.flag("SPARSELAYERS_TEST_FLAG", default=True) is True
    assert _env.flag("SPARSELAYERS_TEST_FLAG", default=False) is False


def test_an_unknown_word_warns_and_takes_the_default(monkeypatch):
    from sparselayers import _env

    monkeypatch.setenv("SPARSELAYERS_TEST_FLAG", "disabled")
    with pytest.warns(RuntimeWarning, match=r"SPARSELAYERS_TEST_FLAG='disabled'.*0.*off.*default \(True\)"):
        assert _env.flag("SPARSELAYERS_TEST_FLAG", default=True) is True


@pytest.mark.parametrize("cxx,words", [("ccache g++", ["ccache", "g++"]), ("  g++ -O2 ", ["g++", "-O2"]),
                                       ("'/opt/my compilers/g++' -O2", ["/opt/my compilers/g++", "-O2"])])
def test_cxx_is_split_as_a_shell_would(monkeypatch, cxx, words):
    monkeypatch.setenv("CXX", cxx)
    assert build.compiler() == words


def test_a_compiler_command_with_options_builds(built, monkeypatch, tmp_path, caplog):
    # A wrapper in a folder with a space in its name, given an option, as "ccache g++" or "g++ -O2" would be.
    tools = tmp_path / "my tools"
    tools.mkdir()
    fake = _copying_compiler(tools, built)
    monkeypatch.setenv("CXX", f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))} -DWRAPPED")
    with caplog.at_level(logging.WARNING, logger="sparselayers.compiled"):
        path = build.cached_library(tmp_path / "cache")
    assert path.read_bytes() == pathlib.Path(built).read_bytes()
    compiling = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
    assert len(compiling) == 1 and f"{build.ENABLED_ENV}=0" in compiling[0]


def test_the_libraries_are_readable_and_their_folder_private(built, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(_copying_compiler(tmp_path, built)))
    path = build.cached_library(user_folder(tmp_path))
    assert path.parent == user_folder(tmp_path) and path.read_bytes() == pathlib.Path(built).read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # readable, as in any library folder
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # only this account reaches it
