"""What every fuzz test shares: the example budgets (fixed, so CI time is bounded and runs are repeatable),
and the inputs they mutate: Ogg/Opus pages, WebSocket messages, bit flips.

The budgets are the number of examples hypothesis tries per test; ``MOSHI_MLX_FUZZ_SCALE=10`` multiplies them
for a longer hunt by hand. ``derandomize``: CI always tries the same inputs (a failure reproduces on rerun).
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from moshi_mlx.net import protocol

SCALE = max(1, int(os.environ.get("MOSHI_MLX_FUZZ_SCALE", "1")))

#: Examples per test: in-process parsers (milliseconds each), the checkpoint loader (a tiny model per example),
#: the audio-file reader, and a real server (a connection per example).
PARSER_EXAMPLES = 200 * SCALE
CHECKPOINT_EXAMPLES = 200 * SCALE
AUDIO_FILE_EXAMPLES = 150 * SCALE
SERVER_EXAMPLES = 30 * SCALE
#: Slowest one example may take (a hang is a failure, not a slow test).
DEADLINE_MS = 5000


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=DEADLINE_MS, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


def ogg_pages(seconds: float = 0.6, seed: int = 0) -> list[bytes]:
    """Real Ogg/Opus pages of a tone with noise (what a browser sends), one per 40 ms."""
    import sphn

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    writer = sphn.OpusStreamWriter(24000)
    pages = [writer.append_pcm(pcm[i : i + 960]) for i in range(0, pcm.size - 959, 960)]
    return [p for p in pages if p]


PAGES = ogg_pages()


@st.composite
def flipped(draw, data: bytes, max_flips: int = 8) -> bytes:
    """``data`` with a few bits flipped, and maybe cut short or extended."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_flips))):
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] ^= 1 << draw(st.integers(0, 7))
    cut = draw(st.sampled_from(["keep", "keep", "cut", "grow"]))
    if cut == "cut":
        buf = buf[: draw(st.integers(0, len(buf)))]
    elif cut == "grow":
        buf += draw(st.binary(max_size=64))
    return bytes(buf)


#: A kind byte: the protocol's seven and some it does not know.
KINDS = st.one_of(st.sampled_from([int(k) for k in protocol.Kind]), st.integers(0, 255))


@st.composite
def audio_message(draw) -> bytes:
    """0x01 with a real page, the same page with bits flipped, several pages glued, or garbage."""
    how = draw(st.sampled_from(["page", "flipped", "glued", "garbage"]))
    if how == "page":
        payload = PAGES[draw(st.integers(0, len(PAGES) - 1))]
    elif how == "flipped":
        payload = draw(flipped(PAGES[draw(st.integers(0, len(PAGES) - 1))]))
    elif how == "glued":
        payload = b"".join(PAGES[: draw(st.integers(2, len(PAGES)))])
    else:
        payload = draw(st.binary(max_size=600))
    return protocol.encode_audio(payload)


def json_values(depth: int = 2):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=8)


@st.composite
def metadata_message(draw) -> bytes:
    """0x04 with JSON objects (including the ``stats`` and ``info`` shapes with wrong value types) or not JSON."""
    how = draw(st.sampled_from(["object", "typed", "not-object", "bytes"]))
    if how == "bytes":
        return protocol.encode(protocol.Kind.METADATA, draw(st.binary(max_size=200)))
    if how == "not-object":
        import json

        return protocol.encode(protocol.Kind.METADATA, json.dumps(draw(json_values()), default=str).encode())
    obj = draw(st.dictionaries(st.text(max_size=12), json_values(), max_size=5))
    if how == "typed":
        obj["type"] = draw(st.sampled_from(["stats", "info"]))
        for key in ("dropped_in", "dropped_out", "model", "demo", "server", "latency_ms"):
            if draw(st.booleans()):
                obj[key] = draw(json_values())
    import json

    return protocol.encode(protocol.Kind.METADATA, json.dumps(obj, default=str, allow_nan=True).encode())


#: One WebSocket binary message of any kind: well formed, mutated, or random.
MESSAGES = st.one_of(
    audio_message(),
    metadata_message(),
    st.builds(lambda k, p: bytes([k]) + p, KINDS, st.binary(max_size=300)),
    st.builds(protocol.encode_text, st.text(max_size=50)),
    st.builds(lambda b: protocol.encode(protocol.Kind.TEXT, b), st.binary(max_size=50)),  # not UTF-8
    st.builds(lambda b: protocol.encode(protocol.Kind.CONTROL, b), st.binary(max_size=3)),
    st.builds(lambda b: protocol.encode(protocol.Kind.HANDSHAKE, b), st.binary(max_size=12)),
    st.just(b""),
)
