import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI runs derandomized so a red build is reproducible; locally use
# HYPOTHESIS_PROFILE=dev for fresh examples each run.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _private_autotune_cache(tmp_path_factory):
    """Tests never read or write the user's autotune cache (see sparselayers.autotune)."""
    previous = os.environ.get("SPARSELAYERS_CACHE_DIR")
    os.environ["SPARSELAYERS_CACHE_DIR"] = str(tmp_path_factory.mktemp("autotune-cache"))
    yield
    if previous is None:
        del os.environ["SPARSELAYERS_CACHE_DIR"]
    else:
        os.environ["SPARSELAYERS_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def built():
    """The compiled kernels' library path; CI has a compiler, so a failed build fails here instead of hiding behind the twin."""
    from sparselayers.ops.compiled import build

    try:
        build.compiler()
    except build.BuildError:
        pytest.skip("no C++ compiler on this machine")
    assert build.available(), "the compiled kernels did not build (see the log)"
    return build.library_path()
