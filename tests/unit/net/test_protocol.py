"""Kyutai WebSocket protocol helpers: pure functions, no server."""

import json
import struct

import pytest

from moshi_mlx.net import protocol
from moshi_mlx.net.protocol import (
    Control,
    Handshake,
    Kind,
    Message,
    ParamError,
    ProtocolError,
    decode,
    decode_handshake,
    parse_query,
)
from moshi_mlx.settings import EngineSettings, SamplingParams, TextControls


def test_kind_values_match_kyutai():
    assert [int(k) for k in Kind if k is not Kind.USER_WORDS] == [0, 1, 2, 3, 4, 5, 6]
    # ours, beside Kyutai's: not 7, which Kyutai's web client reads as "colored text"
    assert Kind.USER_WORDS == 8
    assert [k.name for k in Kind] == ["HANDSHAKE", "AUDIO", "TEXT", "CONTROL", "METADATA", "ERROR", "PING", "USER_WORDS"]


def test_bare_handshake_is_one_zero_byte():
    assert protocol.encode_handshake() == b"\x00"
    assert decode_handshake(decode(b"\x00")) == Handshake(0, 0)


def test_versioned_handshake_round_trip():
    data = protocol.encode_handshake(0, 7)
    assert data == b"\x00" + struct.pack("<II", 0, 7)
    assert decode_handshake(decode(data)) == Handshake(0, 7)


def test_bad_handshakes():
    with pytest.raises(ProtocolError):
        decode_handshake(decode(b"\x00\x01\x02"))
    with pytest.raises(ProtocolError):
        decode_handshake(decode(b"\x02hi"))


def test_encoders_round_trip():
    assert decode(protocol.encode_audio(b"OggS123")) == Message(Kind.AUDIO, b"OggS123")
    assert decode(protocol.encode_text(" héllo")).text == " héllo"
    assert decode(protocol.encode_error("busy")).text == "busy"
    assert decode(protocol.encode_ping()) == Message(Kind.PING, b"")
    meta = decode(protocol.encode_metadata({"a": 1, "b": [1, "x"]}))
    assert meta.kind == Kind.METADATA and meta.json() == {"a": 1, "b": [1, "x"]}
    ctl = decode(protocol.encode_control(Control.PAUSE))
    assert ctl.control() == Control.PAUSE
    assert decode(protocol.encode_control(42)).control() == 42
    with pytest.raises(ValueError):
        protocol.encode_control(300)


def test_decode_rejects_empty_and_oversized():
    with pytest.raises(ProtocolError, match="empty"):
        decode(b"")
    with pytest.raises(ProtocolError, match="larger"):
        decode(b"\x01" + bytes(100), max_bytes=50)
    with pytest.raises(ProtocolError):
        decode("text frame")  # type: ignore[arg-type]


def test_unknown_kind_is_ignored():
    assert decode(b"\x07abc") is None
    assert decode(b"\xff") is None


def test_payload_validation():
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode(b"\x02\xff\xfe").text
    with pytest.raises(ProtocolError, match="JSON"):
        decode(b"\x04{not json").json()
    with pytest.raises(ProtocolError, match="object"):
        decode(b"\x04[1,2]").json()
    with pytest.raises(ProtocolError, match="one byte"):
        decode(b"\x03").control()
    assert json.loads(protocol.encode_metadata({"x": "é"})[1:]) == {"x": "é"}


# -- query parameters ---------------------------------------------------------------------------


def test_no_params_keeps_defaults():
    defaults = EngineSettings(SamplingParams(0.5, 10), SamplingParams(0.9, 100), seed=3)
    r = parse_query({}, defaults)
    assert r.settings == defaults
    assert r.applied == {} and r.ignored == {} and r.unknown == ()


def test_kyutai_client_params():
    q = {
        "text_temperature": "0.7",
        "text_topk": "25",
        "audio_temperature": "0.8",
        "audio_topk": "250",
        "pad_mult": "0",
        "text_seed": "1234",
        "audio_seed": "1234",
        "repetition_penalty": "1.0",
        "repetition_penalty_context": "64",
        "worker_auth_id": "x",
    }
    q.update(pad_mult="-1.5", audio_seed="99", repetition_penalty="1.3", repetition_penalty_context="32")
    r = parse_query(q)
    s = r.settings
    assert (s.text.temperature, s.text.top_k, s.audio.temperature, s.audio.top_k) == (0.7, 25, 0.8, 250)
    assert s.seeds == (1234, 99)
    assert s.text_controls == TextControls(repetition_penalty=1.3, repetition_penalty_context=32, pad_mult=-1.5)
    assert r.ignored == {}  # every parameter Kyutai's client sends is used
    assert r.unknown == ("worker_auth_id",)
    assert r.applied["text_seed"] == 1234 and r.applied["audio_seed"] == 99 and r.applied["pad_mult"] == -1.5
    d = r.describe()
    assert (d["text_seed"], d["audio_seed"], d["repetition_penalty"], d["pad_mult"]) == (1234, 99, 1.3, -1.5)


def test_seed_precedence():
    assert parse_query({"audio_seed": "5"}).settings.seeds == (None, 5)
    assert parse_query({"text_seed": "1", "audio_seed": "2"}).settings.seeds == (1, 2)
    # `seed` seeds both streams; a stream's own seed takes precedence.
    assert parse_query({"seed": "9"}).settings.seeds == (9, 9)
    assert parse_query({"seed": "9", "text_seed": "1"}).settings.seeds == (1, 9)
    # A query's `seed` replaces the server's per-stream defaults too.
    defaults = EngineSettings(text_seed=4, audio_seed=5)
    assert parse_query({"seed": "9"}, defaults).settings.seeds == (9, 9)
    assert parse_query({}, defaults).settings.seeds == (4, 5)


def test_integer_formats():
    assert parse_query({"text_topk": "25.0"}).settings.text.top_k == 25
    assert parse_query({"audio_topk": " 7 "}).settings.audio.top_k == 7
    assert parse_query({"text_temperature": "0"}).settings.text.temperature == 0.0


@pytest.mark.parametrize(
    "name,value,fragment",
    [
        ("text_temperature", "abc", "must be a number"),
        ("text_temperature", "-1", ">= 0"),
        ("audio_temperature", "nan", "finite"),
        ("audio_temperature", "inf", "finite"),
        ("audio_temperature", "1e9", "<= 100"),
        ("text_topk", "2.5", "integer"),
        ("text_topk", "-3", ">= 0 and <= 1000000"),
        ("audio_topk", "", "integer"),
        ("text_seed", "-1", ">= 0"),
        ("audio_seed", str(2**64), f"<= {2**63 - 1}"),
        ("seed", "x", "integer"),
        ("pad_mult", "nope", "number"),
        ("repetition_penalty", "0", "> 0"),
        ("repetition_penalty", "1e6", "<= 100"),
        ("pad_mult", "inf", "finite"),
        ("repetition_penalty_context", "1.5", "integer"),
        ("repetition_penalty_context", "-1", ">= 0 and <= 100000"),
    ],
)
def test_bad_values_raise_clear_errors(name, value, fragment):
    with pytest.raises(ParamError) as info:
        parse_query({name: value})
    assert name in str(info.value) and fragment in str(info.value)


def test_repeated_param():
    assert parse_query([("text_topk", "5"), ("text_topk", "5")]).settings.text.top_k == 5
    with pytest.raises(ParamError, match="twice"):
        parse_query([("text_topk", "5"), ("text_topk", "6")])


# -- a persona model's role prompt and voice (NVIDIA's PersonaPlex client's names) ----------------------------


def test_persona_parameters_as_nvidias_client_sends_them():
    q = protocol.parse_query({"text_prompt": "  You enjoy having a good conversation. ", "voice_prompt": "NATF2.pt"})
    assert q.persona == {"text_prompt": "You enjoy having a good conversation.", "voice": "NATF2"}
    assert q.settings.text_prompt == "You enjoy having a good conversation." and q.settings.voice == "NATF2"
    assert q.unknown == ()


def test_empty_persona_parameters_keep_the_servers_defaults():
    defaults = EngineSettings(text_prompt="Be a pirate.", voice="VARM4")
    q = protocol.parse_query({"text_prompt": "", "voice_prompt": " "}, defaults)
    assert q.persona == {} and (q.settings.text_prompt, q.settings.voice) == ("Be a pirate.", "VARM4")
    q = protocol.parse_query({"voice_prompt": "NATM0"}, defaults)
    assert (q.settings.text_prompt, q.settings.voice) == ("Be a pirate.", "NATM0")


@pytest.mark.parametrize("raw", ["../voices/NATF0", "/etc/passwd", "a b", "x" * 65, ".hidden", "NATF0.pt/x"])
def test_a_voice_in_a_url_is_a_name_never_a_path(raw):
    with pytest.raises(protocol.ParamError, match="is not a voice name") as e:
        protocol.parse_query({"voice_prompt": raw})
    assert "\n" not in str(e.value) and "/api/info" in str(e.value)


def test_a_prompt_longer_than_any_context_is_refused_before_tokenizing():
    ok = "a" * protocol.MAX_PROMPT_CHARS
    assert protocol.parse_query({"text_prompt": ok}).settings.text_prompt == ok
    with pytest.raises(protocol.ParamError, match=f"at most {protocol.MAX_PROMPT_CHARS}"):
        protocol.parse_query({"text_prompt": ok + "a"})


def test_encode_persona_is_parse_querys_inverse():
    params = protocol.encode_persona("Be brief.\nBe kind.", "NATF1")
    assert params == {"text_prompt": "Be brief.\nBe kind.", "voice_prompt": "NATF1"}
    q = protocol.parse_query(params)
    assert (q.settings.text_prompt, q.settings.voice) == ("Be brief.\nBe kind.", "NATF1")
    assert protocol.encode_persona(None, None) == {}


def test_text_only_model_ignores_the_knobs_that_do_nothing_with_a_note():
    """A speech-to-text model reads greedily: temperatures and seeds sent anyway are validated, then reported in
    `ignored` with the reason; pad_mult (which still moves the argmax) applies; what runs is greedy."""
    from moshi_mlx.settings import GREEDY, TEXT_ONLY_NOTE

    q = protocol.parse_query({"text_temperature": "0.9", "audio_topk": "10", "seed": "3", "pad_mult": "0.5"},
                             EngineSettings(), text_only=True)
    assert q.ignored == {"text_temperature": TEXT_ONLY_NOTE, "audio_topk": TEXT_ONLY_NOTE, "seed": TEXT_ONLY_NOTE}
    assert q.applied == {"pad_mult": 0.5}
    assert q.settings.text == GREEDY and q.settings.audio == GREEDY and q.settings.seeds == (None, None)
    assert q.describe()["text_temperature"] == 0.0 and q.describe()["pad_mult"] == 0.5
    with pytest.raises(protocol.ParamError):  # still checked: a bad value is one clear line, not silence
        protocol.parse_query({"text_temperature": "-1"}, EngineSettings(), text_only=True)
    # Moshi itself: nothing ignored, the temperature applies
    assert protocol.parse_query({"text_temperature": "0.9"}).settings.text.temperature == 0.9


def test_text_only_knob_table_offers_only_what_acts():
    from moshi_mlx.server.info import knobs_info
    from moshi_mlx.settings import TEXT_ONLY_KNOBS

    assert [k["name"] for k in knobs_info(text_only=True)] == list(TEXT_ONLY_KNOBS)
    assert len(knobs_info()) > len(TEXT_ONLY_KNOBS)

