"""The built wheel carries the web UI: install it into a fresh venv and serve the page from elsewhere.

The wheel is built from this checkout (hatchling, no build isolation: no network needed), installed
with ``--no-deps`` into a new venv that sees this interpreter's dependencies through a ``.pth`` file,
and both ``python -m moshi_mlx.local_web --demo`` and the ``moshi-mlx-local-web`` console script are
started from an unrelated folder. Nothing of the checkout is on their path, so the page, the app's JS
and the vendored codecs can only come from the installed package.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI_FILES = ("", "app.js", "recorder.js", "recording-store.js", "audio-worklets.js", "style.css", "favicon.ico", "favicon.svg",
            "vendor/encoderWorker.min.js", "vendor/ogg-opus-decoder.min.js")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling", reason="needs hatchling (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("moshi_mlx-*.whl")
    return whl


def test_wheel_holds_only_the_ui_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    web = {n for n in names if n.startswith("moshi_mlx/web/")}
    for f in ("index.html", "app.js", "audio-worklets.js", "style.css", "favicon.ico",
              "vendor/encoderWorker.min.js", "vendor/ogg-opus-decoder.min.js", "vendor/LICENSES/opus-recorder.md"):
        assert f"moshi_mlx/web/{f}" in web, sorted(web)
    # The npm tooling stays in the repository.
    for f in ("package.json", "package-lock.json", "scripts/vendor.mjs", "README.md"):
        assert f"moshi_mlx/web/{f}" not in web
    assert not any("node_modules" in n for n in names)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, timeout=300)
    py = d / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # The dependencies (mlx, rustymimi, aiohttp...) come from this interpreter's site-packages, listed
    # after the venv's own, so the freshly installed moshi_mlx wins over any other copy.
    # Installed before the dependencies are made visible: otherwise pip would see this interpreter's own
    # (editable) moshi_mlx through the .pth and skip the wheel as "already satisfied".
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert r.returncode == 0, r.stderr
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "zz_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return d


def _serve_and_fetch(cmd: list[str], cwd: Path) -> dict[str, tuple[int, bytes]]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOSHI_MLX_WEB_DIR")}
    env.setdefault("MOSHI_MLX_DEMO_DIR", str(Path("~/.cache/moshi_mlx/demo").expanduser()))
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [*cmd, "--demo", "--no-browser", "--host", "127.0.0.1", "--port", "0"],
        cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"open (http://\S+/) in your browser", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        got = {}
        for f in UI_FILES:
            with urllib.request.urlopen(url + f, timeout=30) as r:
                got[f] = (r.status, r.read())
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        return got
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("how", ["module", "console-script"])
def test_installed_wheel_serves_the_ui(venv, tmp_path, how):
    py = venv / "bin" / "python"
    located = subprocess.run(
        [str(py), "-c", "import moshi_mlx, moshi_mlx.server.app as w; print(moshi_mlx.__file__); print(w.find_web_dir())"],
        cwd=tmp_path, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert located.returncode == 0, located.stderr
    pkg, web_dir = located.stdout.split()
    assert pkg.startswith(str(venv)) and web_dir.startswith(str(venv)), located.stdout  # not the checkout

    cmd = [str(py), "-m", "moshi_mlx.local_web"] if how == "module" else [str(venv / "bin" / "moshi-mlx-local-web")]
    got = _serve_and_fetch(cmd, tmp_path)
    for f in UI_FILES:
        status, body = got[f]
        assert status == 200 and body == (ROOT / "web" / (f or "index.html")).read_bytes(), f
