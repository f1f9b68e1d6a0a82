from pathlib import Path

import pytest

from tests.helpers.audio_env import JACK_TOOLS, SPEECH_TOOLS, missing, portaudio_problem
from tests.helpers.shared import find_manifests

MANIFESTS = find_manifests()


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    if not (MANIFESTS / "moshi-7b-mlx-bf16.json").is_file():
        pytest.skip(f"published-layout manifests not found in {MANIFESTS} (MOSHI_MLX_MANIFESTS points elsewhere)")
    return MANIFESTS


@pytest.fixture(scope="session")
def mimi_path(tmp_path_factory):
    """A random Mimi checkpoint in the published layout (385 MB), written once per session."""
    from moshi_mlx.model_files.stand_ins import write_random_mimi

    return write_random_mimi(tmp_path_factory.mktemp("mimi") / "mimi.safetensors", seed=0)


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    """Random Mimi (published layout) + stand-in tokenizer, written once per test session."""
    from moshi_mlx.model_files.stand_ins import demo_assets

    return demo_assets(tmp_path_factory.mktemp("demo-assets"))


@pytest.fixture(scope="session")
def demo_assets_loaded(demo_files, monkeypatch_session):
    """The whole `load(demo=True)` result (tiny LM + real rustymimi), shared by the session."""
    from moshi_mlx.model_files.assets import load

    monkeypatch_session.setenv("MOSHI_MLX_DEMO_DIR", str(demo_files.mimi_path.parent))
    return load(demo=True, log=lambda msg: None)


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# Virtual audio devices (see tests/audio_env.py).
@pytest.fixture(scope="module")
def portaudio():
    problem = portaudio_problem()
    if problem:
        pytest.skip(f"PortAudio not usable here: {problem} (apt install libportaudio2)")


@pytest.fixture(scope="module")
def jack_tools(portaudio):
    lacking = missing(*JACK_TOOLS, *SPEECH_TOOLS)
    if lacking:
        pytest.skip(f"needs {', '.join(lacking)} (apt install jackd2 jack-tools espeak-ng sox)")


# -- markers: decided by folder. `pytest -m "not slow"` (or `pytest tests/unit`) is the quick inner loop; CI runs
# everything. tests/e2e/ holds what starts real processes, servers on real sockets, devices, browsers or wheel
# builds; of those, the ones on virtual JACK devices run at the real 80 ms pace.
E2E = Path(__file__).resolve().parent / "e2e"


#: The by-hand tier: end-to-end checks that repeat what faster tests already cover by another route, kept to run
#: before a release (`MOSHI_MLX_LONG_TESTS=1 python -m pytest -q -m long`) so that the default suite stays within
#: CI's 20 minutes on 2 cores. Each is skipped with this reason, never silently.
LONG_ENV = "MOSHI_MLX_LONG_TESTS"


def pytest_collection_modifyitems(config, items):
    import os

    run_long = os.environ.get(LONG_ENV) == "1"
    for item in items:
        if item.get_closest_marker("long") is not None and not run_long:
            item.add_marker(pytest.mark.skip(reason=f"by-hand tier (repeats faster coverage): set {LONG_ENV}=1"))
        if E2E in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.slow)
            if "jack_tools" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.realtime)


# -- memory: the whole suite runs in one process, and MLX keeps freed buffers in its cache for reuse. Dozens of
# modules each load their own random models; without handing that cache back after each module the process grows
# past this machine's 24 GB before the rustymimi tests (which hold pools of codec instances) run.
@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_module():
    yield
    import gc
    import sys

    gc.collect()
    mx = sys.modules.get("mlx.core")  # only if the module used MLX: never import it for tests that do not
    if mx is not None:
        clear = getattr(mx, "clear_cache", None) or getattr(getattr(mx, "metal", None), "clear_cache", None)
        if clear is not None:
            clear()
