"""Kyutai's official web client (built, a fixture outside this repository): where it is, what its schema checks in
every metadata message, how a test opens it and presses Connect."""

from __future__ import annotations

import os
from pathlib import Path

from .browser import Browser
from .shared import shared_dir

# Kyutai's ServersInfoSchema (client/src/pages/Conversation/hooks/useServerInfo.ts), as field -> type.
SCHEMA_NUMBERS = ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult",
                  "repetition_penalty_context", "repetition_penalty")
SCHEMA_STRINGS = ("lm_model_file", "instance_name")
BUILD_INFO = ("build_timestamp", "build_date", "git_branch", "git_timestamp", "git_date", "git_hash",
              "git_describe", "rustc_host_triple", "rustc_version", "cargo_target_triple")


def official_client_dir() -> Path | None:
    env = os.environ.get("MOSHI_MLX_OFFICIAL_CLIENT")
    if env:
        return Path(env) if (Path(env) / "index.html").is_file() else None
    d = shared_dir("kyutai-official-client", "dist")
    return d if d is not None and (d / "index.html").is_file() else None


def schema_problems(meta: dict) -> list[str]:
    """What Kyutai's client would reject in one metadata message (empty: it parses)."""
    bad = [f"{k}: not a number" for k in SCHEMA_NUMBERS if not isinstance(meta.get(k), (int, float)) or isinstance(meta.get(k), bool)]
    bad += [f"{k}: not a string" for k in SCHEMA_STRINGS if not isinstance(meta.get(k), str)]
    info = meta.get("build_info")
    if not isinstance(info, dict):
        return bad + ["build_info: not an object"]
    return bad + [f"build_info.{k}: not a string" for k in BUILD_INFO if not isinstance(info.get(k), str)]


CONNECT_BUTTON = "[...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Connect')"
PANEL_SHOWN = "document.body.innerText.includes('Our server is running on the following configuration')"


async def open_and_connect(browser: Browser, page: str) -> None:
    """Open the client's page and press its Connect button (which opens the WebSocket)."""
    await browser.goto(page)
    assert await browser.wait_for(f"!!{CONNECT_BUTTON}", timeout=30), browser.errors
    await browser.eval(f"{CONNECT_BUTTON}.click()")
