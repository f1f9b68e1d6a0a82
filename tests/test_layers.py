"""The package's import graph: one way down, folder by folder and module by module.

Two rules, read from the source (AST, so imports inside functions count too):

* **Folders.** Each folder of `moshi_mlx/` has a rank; a module may import from its own folder or from a folder
  of lower rank, never from one above it. `cli/` is the shell of the commands: nothing under `models/`,
  `model_files/`, `audio/`, `net/` or `server/` imports it.
* **Modules.** Every module sits in a layer of `LAYERS`, and imports only modules of lower layers (no cycles,
  nothing upward), so the order inside and across folders is fixed too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moshi_mlx"

#: Folder ranks, from the bottom: the networks (the LM in models/, Mimi in codec/); the sound in and out (format,
#: codecs, devices, files); Kyutai's
#: WebSocket protocol; model files (loading needs Mimi from audio/); the web server; the shell of the commands.
#: Top-level modules (the conversation core and the commands) are placed by LAYERS alone.
FOLDERS = {"models": 0, "codec": 0, "audio": 1, "net": 2, "model_files": 3, "server": 4, "cli": 5, "benchmark": 6}
#: The library never leans on the shell.
NO_CLI = ("models", "codec", "model_files", "audio", "net", "server")

LAYERS: list[set[str]] = [
    {"errors"},  # the error base every layer raises
    # facts: the knobs, the audio format, the model's configuration, RSS readings, the user's folders
    {"settings", "memory", "places", "audio.frames", "audio.silence", "models.config", "models.cache",
     "model_files.source", "model_files.personaplex", "codec.config"},
    # single-job libraries
    {"sampling", "conditioning", "mlx_thread", "outputs", "tokenizer", "models.transformer", "audio.device_choice",
     "audio.echo",
     "audio.files", "audio.loudness", "audio.wav_stream", "audio.mimi_pool", "net.tls", "net.protocol", "net.opus", "net.asr_protocol", "model_files.hub",
     "model_files.budget", "server.info", "models.pytorch", "models.conditioners", "codec.conv", "codec.transformer",
     "codec.quantizer"},
    {"models.lm", "voices", "audio.devices", "audio.mimi", "audio.recording", "net.failures", "server.security",
     "server.startup", "models.pytorch_config", "model_files.depformer_steps",
     "codec.seanet"},
    {"model_files.pytorch_weights"},  # keeps the model's depformer steps of a longer one (PersonaPlex)
    {"generate", "model_files.checkpoint", "net.address", "codec.network"},
    {"transcribe", "persona", "voice_presets"},  # timed words from an STT model; a persona's system prompt; its voice presets converted once
    {"engine", "clips", "model_files.stand_ins", "model_files.voice_archive", "model_files.lora", "net.remote", "audio.mlx_mimi"},
    {"audio.codec_choice", "user_transcript"},  # which Mimi (rustymimi or the MLX one); the user's words beside Moshi
    {"model_files.assets", "model_files.convert", "server.session", "server.asr", "captions"},  # load(): the one front door; one client around the engine
    {"server.app", "caption_recording"},
    {"cli.shell", "cli.progress", "cli.display"},
    {"cli.async_signals"},
    {"cli.flags"},
    {"cli", "cli.terminal"},
    {"cli.live_captions"},
    {"run_inference", "convert", "benchmark", "local_web"},
    {"local", "client"},
    {"__main__"},
]
PACKAGE_FACES = {"models", "codec", "model_files", "audio", "net", "server", "benchmark"}  # empty or lazy __init__s


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts if rel.name != "__init__" else rel.parts[:-1])


def layer_of(module: str) -> int:
    top = "benchmark" if module.startswith("benchmark") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"moshi_mlx.{module} has no layer in tests/test_layers.py: place it")


def imports_of(path: Path) -> set[str]:
    """Package-relative names of the moshi_mlx modules a file imports (at any depth of the code)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
            here = [*base, node.module] if node.module else base
            for alias in node.names:  # `from .net import protocol`: a name may be a module
                candidate = ".".join([*here, alias.name])
                found.add(candidate if _is_module(candidate) else ".".join(here))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moshi_mlx."):
            found.add(node.module.removeprefix("moshi_mlx."))
    return {name for name in found if name not in ("", "__version__")}


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def folder_of(module: str) -> str | None:
    head, _, rest = module.partition(".")
    return head if head in FOLDERS and (rest or head in PACKAGE_FACES or head == "cli") else None


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if not (p.name == "__init__.py" and p.parent == PACKAGE))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_upward(path):
    me = module_name(path)
    if me in PACKAGE_FACES:
        return  # an empty folder face
    mine = layer_of(me)
    for target in sorted(imports_of(path)):
        if me.startswith("benchmark") and target.startswith("benchmark"):
            continue  # inside the benchmark package its own modules may use each other
        if me == "cli" and target.startswith("cli."):
            continue  # the face of cli/ re-exports its modules
        assert layer_of(target) < mine or target == me, (
            f"moshi_mlx.{me} (layer {mine}) imports moshi_mlx.{target} (layer {layer_of(target)})"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_folder_imports_a_folder_above_it(path):
    me = module_name(path)
    home = folder_of(me)
    if home is None:
        return  # a top-level module: LAYERS places it
    for target in sorted(imports_of(path)):
        there = folder_of(target)
        if there is None:
            continue
        assert not (home in NO_CLI and there == "cli"), f"moshi_mlx.{me} imports the shell moshi_mlx.{target}"
        assert FOLDERS[there] <= FOLDERS[home], (
            f"moshi_mlx.{me} ({home}/, rank {FOLDERS[home]}) imports moshi_mlx.{target} "
            f"({there}/, rank {FOLDERS[there]}): a folder imports only its own or those below it"
        )


def test_hub_only_finds_files():
    """hub.py reads no checkpoint: it imports nothing of the loader's and nothing of the model.

    Besides the errors it may import `source`: the model-choosing flags (`ModelSource`, `FLAGS`) it finds
    files for, a plain value that itself imports nothing of the package.
    """
    assert imports_of(PACKAGE / "model_files" / "hub.py") <= {"errors", "model_files.source", "model_files.personaplex"}
    assert imports_of(PACKAGE / "model_files" / "source.py") == set()


def test_the_rules_catch_a_planted_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a module of audio/ importing the shell, or a model importing the server."""
    planted = {
        "audio/devices.py": "from ..cli import say\n",
        "models/lm.py": "from ..server.security import HostPolicy\n",
    }
    for rel, line in planted.items():
        path = PACKAGE / rel
        fake = tmp_path / "moshi_mlx" / rel
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_text(path.read_text() + "\n\ndef _planted():\n    " + line)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", tmp_path / "moshi_mlx")
    for rel in planted:
        with pytest.raises(AssertionError, match="imports"):
            test_no_folder_imports_a_folder_above_it(tmp_path / "moshi_mlx" / rel)


def _names_defined(path: Path) -> set[str]:
    """What a module itself defines at its top level (functions, classes, assignments, also under if/try)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        for inner in ast.walk(node):
            if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(inner.name)
            elif isinstance(inner, (ast.Assign, ast.AnnAssign)):
                targets = inner.targets if isinstance(inner, ast.Assign) else [inner.target]
                names.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_names_come_from_the_module_that_defines_them(path):
    """No import through a module that only passes a name on: a moved name is imported from its new home,
    so a module's imports say where things live. Package faces (`__init__.py`) are the exception."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
        target = ".".join([*base, node.module] if node.module else base)
        source = PACKAGE.joinpath(*target.split(".")).with_suffix(".py")
        if not target or not source.is_file():
            continue  # a package face, or `from . import module`
        defined = _names_defined(source)
        for alias in node.names:
            if _is_module(f"{target}.{alias.name}"):
                continue
            assert alias.name in defined, (
                f"moshi_mlx.{module_name(path)} imports {alias.name} through moshi_mlx.{target}, which does not "
                f"define it: import it from its home"
            )


TESTS = Path(__file__).resolve().parent


def _imported_test_modules(path: Path) -> set[str]:
    """Test modules (`test_*`) a file imports, also as text inside strings (a subprocess's `-c` code)."""
    source = path.read_text()
    found = {m for m in _dotted_names(source) if m.split(".")[-1].startswith("test_")}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level and node.module and node.module.startswith("test_"):
            found.add(node.module)
    return found


def _dotted_names(source: str) -> set[str]:
    return set(re.findall(r"\b(?:from|import)\s+(tests(?:\.\w+)+)", source))


@pytest.mark.parametrize(
    "path",
    sorted([*TESTS.rglob("*.py"), *(TESTS.parent / "benchmarks").glob("*.py")]),
    ids=lambda p: str(p.relative_to(TESTS.parent)),
)
def test_no_test_module_imports_another(path):
    """What tests share lives in tests/helpers/ (or a conftest's fixtures), never in another test module."""
    assert not _imported_test_modules(path), f"{path.name} imports {sorted(_imported_test_modules(path))}"
