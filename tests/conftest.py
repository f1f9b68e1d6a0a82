import os
from pathlib import Path

import pytest

from .audio_env import JACK_TOOLS, SPEECH_TOOLS, missing, portaudio_problem
from .shared import shared_dir


def _find_manifests() -> Path:
    """Published-layout manifests: $MOSHI_MLX_MANIFESTS, else the team's shared folder (tests/shared.py)."""
    if os.environ.get("MOSHI_MLX_MANIFESTS"):
        return Path(os.environ["MOSHI_MLX_MANIFESTS"])
    return shared_dir("manifests") or Path("shared/manifests")


MANIFESTS = _find_manifests()


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    if not (MANIFESTS / "moshi-7b-mlx-bf16.json").is_file():
        pytest.skip(f"published-layout manifests not found in {MANIFESTS} (set MOSHI_MLX_MANIFESTS)")
    return MANIFESTS


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


# -- markers: `pytest -m "not slow"` is the quick inner loop; CI runs everything ---------------------------
# Whole modules that start real processes, browsers or wheel builds.
SLOW_MODULES = {
    "test_browser", "test_official_client", "test_packaging", "test_client", "test_local", "test_local_aec",
    "test_recording", "test_aec", "test_benchmark", "test_run_inference", "test_outputs", "test_hub",
}
# Fixtures that mean a test drives real devices or a browser.
SLOW_FIXTURES = {"chromium", "jack_tools", "speech_tools", "alsa_env"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "jack_tools" in fixtures:
            item.add_marker(pytest.mark.realtime)
        if "jack_tools" in fixtures or fixtures & SLOW_FIXTURES or item.module.__name__.split(".")[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
