"""Fuzzing (hypothesis, bounded: see tests/helpers/fuzz.py) of the audio-file reader: random bytes, real WAV /
FLAC / Ogg files with bits flipped or cut short, and WAV headers with random fields. Each file is read to its
end at 24 kHz: the answer is audio or one AudioFileError line, never another exception, a hang (the deadline)
or a memory bomb (a tiny file claiming a 1 Hz rate, a thousand channels ...)."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st

from moshi_mlx.audio.files import AudioFileError, AudioReader
from tests.helpers.fuzz import AUDIO_FILE_EXAMPLES, flipped, fuzz_settings

#: Most memory one example may take while reading (the reader works in blocks of a few hundred KiB).
MAX_PEAK_BYTES = 64 << 20


def _encoded(fmt: str, subtype: str | None = None) -> bytes:
    t = np.arange(2400) / 24000
    x = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, -x], 1), 24000, format=fmt, subtype=subtype)
    return buf.getvalue()


VALID = [_encoded("WAV", "PCM_16"), _encoded("WAV", "FLOAT"), _encoded("FLAC"), _encoded("OGG", "VORBIS")]


@st.composite
def wav_header(draw) -> bytes:
    """A RIFF/WAVE file whose fmt fields and sizes are random, with a little data after them."""
    tag = draw(st.sampled_from([1, 1, 1, 3, 0xFFFE, 6, 0, 0xFFFF]))  # mostly PCM: the fields after it then matter
    channels = draw(st.one_of(st.integers(0, 3), st.sampled_from([255, 1024, 1025, 65535])))
    rate = draw(st.sampled_from([1, 2, 100, 3999, 8000, 24000, 48000, 768_001, 2**31 - 1, 2**32 - 1, 0]))
    bits = draw(st.sampled_from([8, 16, 16, 24, 32, 0, 1, 12, 64, 65535]))
    block = draw(st.one_of(st.just(max(1, channels * bits // 8) & 0xFFFF), st.integers(0, 0xFFFF)))
    data = draw(st.one_of(st.binary(max_size=2000), st.integers(1000, 4000).map(lambda n: b"\x7f" * n)))
    data_size = draw(st.one_of(st.just(len(data)), st.just(0), st.integers(0, 2**32 - 1)))
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


FILES = st.one_of(
    st.binary(max_size=400),
    st.sampled_from(VALID).flatmap(lambda b: flipped(b, max_flips=6)),
    st.sampled_from(VALID).flatmap(lambda b: flipped(b[:96], max_flips=4).map(lambda h: h + b[96:])),  # the header
    wav_header(),
    wav_header(),
)


@fuzz_settings(AUDIO_FILE_EXAMPLES)
@given(FILES)
def test_any_file_gives_audio_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "in.wav"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with AudioReader(path) as r:
            n = sum(b.size for b in r.blocks_24k())
        assert n > 0
    except AudioFileError as e:
        line = str(e)
        assert line.startswith(str(path)) and "\n" not in line and "Traceback" not in line, line
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"{peak / 2**20:.0f} MiB to read a {len(data)}-byte file"


def test_the_valid_files_read():
    """The fuzzers' seeds are good files (so a mutation of them is a near miss, not noise)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for i, data in enumerate(VALID):
            p = Path(d) / f"{i}.bin"
            p.write_bytes(data)
            with AudioReader(p) as r:
                assert abs(sum(b.size for b in r.blocks_24k()) - 2400) <= 1
