"""Live captions of a speech-to-text model through the real entry points, on stand-in STT files (a tiny random
text-only model with Kyutai's STT layout and 4 VAD heads, the stand-in 8000-piece tokenizer, the random Mimi):

* `python -m moshi_mlx.local` on virtual JACK devices (espeak-ng speech into the microphone): words with times on
  stdout while it runs, the end-of-turn meter on the status line, no speaker stream, Ctrl-C, `--record` files;
* `python -m moshi_mlx.local_web` as a real process and an aiohttp WebSocket client: text pieces (0x02) and
  captions metadata (0x04), no audio back;
* bad input: one line, exit 2 (a usage error).

The random model's words are made-up pieces: the tests check timing, shape and plumbing, never the text.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest

from moshi_mlx.net import protocol
from moshi_mlx.net.protocol import Kind
from tests.helpers.apps import App, no_traceback
from tests.helpers.audio_env import ROOT, JackServer, base_env, read_wav, speech_wav
from tests.helpers.official_client import PANEL_SHOWN, official_client_dir, open_and_connect, schema_problems
from tests.helpers.web_process import LocalWeb
from tests.helpers.web_server import make_speech, opus_messages, stream

WORD_LINE = re.compile(r"^\s*(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\S+)$")


@pytest.fixture(scope="module")
def stt_flags(demo_files, tmp_path_factory) -> list[str]:
    """The flags that stand in for `--hf-repo kyutai/stt-...` (no download)."""
    from moshi_mlx.model_files.stand_ins import write_random_lm, write_stand_in_tokenizer
    from moshi_mlx.models.config import config_tiny_stt

    root = tmp_path_factory.mktemp("stt-files")
    weights, config = write_random_lm(config_tiny_stt(), None, root, seed=2)
    tokenizer = write_stand_in_tokenizer(root / "tokenizer_8000.model", 8000)
    return ["--moshi-weights", str(weights), "--lm-config", str(config), "--mimi-weights", str(demo_files.mimi_path),
            "--tokenizer", str(tokenizer)]


def test_terminal_captions_over_jack(jack_tools, stt_flags, tmp_path):
    speech = speech_wav(tmp_path / "speech.wav", rate=24000, pad=(0.5, 1.0))
    seconds = read_wav(speech)[0].size / 24000
    record = tmp_path / "rec"
    with JackServer(24000, 1920, log_dir=tmp_path) as jack:
        app = App([*stt_flags, "--input-device", "system", "--record", str(record)], jack.env)
        try:
            assert jack.wait_for_port("PortAudio:in_0", 90), app.stderr
            assert not any(p.startswith("PortAudio:out") for p in jack.ports()), "no speaker stream is opened"
            jack.disconnect("system:capture_1", "PortAudio:in_0")
            player = jack.play_into(speech, "PortAudio:in_0")
            player.wait(seconds + 30)
            time.sleep(1.0)
            words_while_running = [line for line in app.stdout.splitlines() if WORD_LINE.match(line)]
            took = app.interrupt()
        finally:
            app.kill()
    err, out = app.stderr, app.stdout
    assert app.proc.returncode == 130, err
    assert took < 3.0, f"exit took {took:.2f} s after SIGINT"
    no_traceback(err)
    assert "speaker:" not in err and "listening: live captions" in err
    assert "[status] end of turn " in err, err  # the meter, on the status line a non-tty prints once a second
    lines = [WORD_LINE.match(line) for line in out.splitlines() if line.strip()]
    assert lines and all(lines), out
    assert words_while_running, "words come while the session runs, not only at the end"
    starts = [float(m.group(1)) for m in lines]
    assert starts == sorted(starts) and all(float(m.group(1)) <= float(m.group(2)) for m in lines)
    m = re.search(r"session: ([\d.]+) s, (\d+) frames in, (\d+) captioned, (\d+) dropped \([\d.]+ s\), (\d+) words", err)
    assert m, err
    assert int(m.group(5)) == len(lines)

    # --record: the microphone as the model heard it, and the timed transcript with the VAD
    mic = list(record.glob("captions-*-mic.wav"))
    js = list(record.glob("captions-*-transcript.json"))
    txt = list(record.glob("captions-*-transcript.txt"))
    assert len(mic) == len(js) == len(txt) == 1, sorted(p.name for p in record.iterdir())
    assert not list(record.glob("*.partial.*"))
    audio, rate = read_wav(mic[0])
    assert rate == 24000 and audio.size / rate > seconds - 1.0 and np.abs(audio).max() > 0.01
    data = json.loads(js[0].read_text())
    assert [w["text"] for w in data["words"]] == [m.group(3) for m in lines]
    assert all(0 <= w["start"] <= w["end"] <= audio.size / rate + 0.01 for w in data["words"])
    assert data["vad"] and all(len(row) == 5 and 0 <= row[3] <= 1 for row in data["vad"])  # t + 4 heads
    assert isinstance(data["end_of_turn_detected_at"], list) and "head 2" in data["vad_note"]
    assert data["stt_config"]["audio_delay_seconds"] == 0.5
    assert txt[0].read_text().splitlines() == [line for line in out.splitlines() if line.strip()]


def test_bad_flag_for_captions_is_one_line(stt_flags):
    r = subprocess.run([sys.executable, "-m", "moshi_mlx.local", *stt_flags, "--output-device", "x"], env=base_env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2  # a usage error, as argparse's own
    assert r.stderr.strip().count("\n") == 0 and "plays nothing" in r.stderr, r.stderr


@pytest.mark.asyncio
async def test_web_server_sends_captions_not_audio(stt_flags, tmp_path):
    server = LocalWeb(tmp_path / "web.log", extra=stt_flags, demo=False)
    try:
        assert server.info()["model_kind"] == "speech-to-text model"
        speech = make_speech(tmp_path)[: 24000 * 4]
        async with aiohttp.ClientSession() as session, session.ws_connect(server.ws) as ws:
            first = await asyncio.wait_for(ws.receive(), 60)
            assert first.data == b"\x00"
            sender = asyncio.ensure_future(stream(ws, opus_messages(speech)))
            texts, captions, audio, infos = [], [], 0, []
            deadline = time.monotonic() + 60
            last_caption = time.monotonic()
            # Until the audio is sent and the captions have stopped (the server's periodic stats go on: not counted).
            while time.monotonic() < deadline and not (sender.done() and time.monotonic() - last_caption > 3):
                try:
                    msg = await asyncio.wait_for(ws.receive(), 30 if not sender.done() else 3)
                except asyncio.TimeoutError:
                    break
                m = protocol.decode(msg.data)
                if m is None:
                    continue
                if m.kind == Kind.AUDIO:
                    audio += 1
                elif m.kind == Kind.TEXT:
                    texts.append(m.text)
                elif m.kind == Kind.METADATA:
                    data = m.json()
                    (captions if data.get("type") == "captions" else infos).append(data)
                    if data.get("type") == "captions":
                        last_caption = time.monotonic()
            sender.cancel()
        assert audio == 0, "a speech-to-text model sends no audio"
        assert infos and infos[0]["type"] == "info" and infos[0]["text_only"] is True
        # every frame the server took is answered by one captions message (a busy CPU drops some: counted)
        stats = [i for i in infos if i["type"] == "stats"]
        assert len(captions) >= 10 and (not stats or stats[-1]["frames_out"] <= len(captions))
        frames = [c["frame"] for c in captions]
        assert frames == sorted(frames)
        assert all(0 <= c["end_of_turn"] <= 1 and len(c["pauses"]) == 4 for c in captions)
        assert all(schema_problems(c) == [] for c in captions)  # Kyutai's client checks every metadata message
        words = [w for c in captions for w in c["words"]]
        assert texts and words, "a random model writes pieces and words"
        assert all(w["start"] <= w["end"] for w in words)
    finally:
        server.stop()
    no_traceback(server.log)


@pytest.mark.asyncio
async def test_browser_shows_captions_and_the_end_of_turn_meter(chromium, mic_wav, stt_flags, tmp_path):
    """The web UI on a real local_web with an STT model, headless Chromium's fake microphone speaking: captions
    fill the transcript, the end-of-turn meter moves, no audio comes back and nothing is played."""
    from tests.helpers.browser import ARTIFACTS, Browser

    server = LocalWeb(tmp_path / "web.log", extra=stt_flags, demo=False)
    browser = await Browser(chromium, mic_wav).start()
    stats = "window.moshi.stats"
    try:
        await browser.goto(server.http + "/?rawmic=1&autoconnect=1")
        ok = await browser.wait_for(f"{stats}.captionFrames > 25 && {stats}.transcriptChars > 0", timeout=90)
        seen = json.loads(await browser.eval(f"JSON.stringify({stats})"))
        await browser.screenshot(ARTIFACTS / "browser_captions.png")
        assert ok, f"page stats: {seen}; console: {browser.console[-10:]}"
        assert seen["audioMessagesIn"] == 0 and seen["samplesDecoded"] == 0
        assert seen["serverInfo"]["text_only"] is True and 0 <= seen["endOfTurn"] <= 1
        shown = json.loads(await browser.eval(
            "JSON.stringify([document.getElementById('eot').hidden, document.getElementById('eot-value').textContent,"
            " document.getElementById('meter-out-box').closest('.meter-row').hidden,"
            " document.getElementById('transcript-title').textContent])"
        ))
        assert shown[0] is False and re.fullmatch(r"\d\.\d\d", shown[1]) and shown[2] is True
        assert shown[3] == "Live captions of what you say"
        # the settings form offers only the knobs that act on captions (greedy: no temperatures, no seeds)
        offered = json.loads(await browser.eval(
            "JSON.stringify(Array.from(document.querySelectorAll('#settings input'))"
            ".filter(i => !i.closest('[hidden]')).map(i => i.name))"
        ))
        assert offered == ["repetition_penalty", "repetition_penalty_context", "pad_mult"], offered
        # The save buttons: the microphone alone (mono) and the timed words, no empty Moshi channel; the
        # browser's crash-recovery store gives back the same (its copy lags at most one flush).
        assert await browser.wait_for("window.moshi.recording.words.length > 0", timeout=30)
        await asyncio.sleep(1.2)  # a journal flush (every 0.5 s) has stored the words seen so far
        saved = json.loads(await browser.eval(
            "(async () => { const r = window.moshi.recording; const store = await import('./recording-store.js');"
            " const k = await store.lastUnsaved();"
            " const channels = async (blob) => new DataView(await blob.arrayBuffer()).getUint16(22, true);"
            " const shown = (kind) => !document.querySelector(`#save button[data-save=${kind}]`).hidden;"
            " return JSON.stringify({textOnly: r.textOnly, moshi: r.moshi.length,"
            " micChannels: await channels(r.micWav()),"
            " words: r.words, json: JSON.parse(await r.jsonBlob().text()), txt: await r.textBlob().text(),"
            " buttons: ['stereo', 'mixed', 'mic', 'txt', 'json'].filter(shown),"
            " kept: {textOnly: k.textOnly, moshi: k.moshi.length, words: k.words,"
            " micChannels: await channels(k.micWav())}}); })()"
        ))
        assert saved["textOnly"] is True and saved["moshi"] == 0 and saved["micChannels"] == 1, saved
        assert saved["buttons"] == ["mic", "txt", "json"], saved["buttons"]
        words = saved["words"]
        assert words and all(w["start"] <= w["end"] for w in words)
        assert saved["json"]["words"][: len(words)] == words and "pieces" not in saved["json"]
        assert list(saved["json"]["channels"]) == ["mono"]
        txt_words = [line.split(maxsplit=2)[2] for line in saved["txt"].splitlines()]
        assert txt_words[: len(words)] == [w["text"] for w in words]
        kept = saved["kept"]
        assert kept["textOnly"] is True and kept["moshi"] == 0 and kept["micChannels"] == 1
        assert kept["words"] and kept["words"] == words[: len(kept["words"])], (kept["words"], words)
        assert not browser.errors, browser.errors
    finally:
        await browser.close()
        server.stop()
    no_traceback(server.log)


@pytest.mark.asyncio
async def test_kyutais_official_client_keeps_working(chromium, mic_wav, stt_flags, tmp_path):
    """Kyutai's own built client, served by local_web running an STT model: it connects, shows the server panel,
    streams the microphone and logs no error on our captions metadata (it plays nothing: no audio comes)."""
    from tests.helpers.browser import ARTIFACTS, Browser

    client = official_client_dir()
    if client is None:
        pytest.skip("Kyutai's built client not found (shared/kyutai-official-client/dist, or MOSHI_MLX_OFFICIAL_CLIENT)")
    server = LocalWeb(tmp_path / "web.log", extra=[*stt_flags, "--web-dir", str(client)], demo=False)
    browser = await Browser(chromium, mic_wav).start()
    try:
        await open_and_connect(browser, server.http + "/")
        assert await browser.wait_for(PANEL_SHOWN, timeout=40), browser.errors[:5]
        await asyncio.sleep(5)  # captions metadata arrive 12 times a second meanwhile
        await browser.screenshot(ARTIFACTS / "official_client_captions.png")
        text = await browser.eval("document.body.innerText")
        assert re.search(r"Audio played:\s*0:00\.00", text), text[:1000]  # nothing to play
        quirk = f"{server.http}/undefined"  # the client's own request for an undefined image, whatever the server
        errors = [e for e in browser.errors if not (e.startswith("network:") and e.endswith(quirk))]
        assert errors == [], errors[:5]
    finally:
        await browser.close()
        server.stop()
    log = server.log
    no_traceback(log)
    assert "conversation 1 starts" in log, log[-2000:]


@pytest.mark.asyncio
async def test_demo_stt_serves_labelled_captions(tmp_path):
    """`local_web --demo-stt`: the built-in STT stand-in, said to be a demo, answers with captions, no audio."""
    server = LocalWeb(tmp_path / "web.log", extra=["--demo-stt"], demo=False)
    try:
        info = server.info()
        assert info["demo"] is True and info["text_only"] is True and "speech-to-text" in info["model"]
        async with aiohttp.ClientSession() as session, session.ws_connect(server.ws) as ws:
            assert (await asyncio.wait_for(ws.receive(), 60)).data == b"\x00"
            await stream(ws, opus_messages(make_speech(tmp_path)[: 24000 * 2]))
            kinds = []
            while len([k for k in kinds if k == "captions"]) < 5:
                m = protocol.decode((await asyncio.wait_for(ws.receive(), 30)).data)
                if m is not None and m.kind == Kind.METADATA:
                    kinds.append(m.json()["type"])
                elif m is not None:
                    kinds.append(m.kind.name)
        assert "AUDIO" not in kinds
    finally:
        server.stop()
    assert "DEMO MODE: tiny random-weight speech-to-text model" in server.log
    no_traceback(server.log)


@pytest.mark.asyncio
async def test_web_reports_the_greedy_sampling_that_runs(tmp_path):
    """`local_web --demo-stt --text-temperature 0.9`: /api/info and the info message report what runs (greedy:
    text_temperature 0), /api/info offers only the knobs that act on captions, and a temperature sent in the query
    anyway is ignored with the reason (ignored_params, one server log line) while pad_mult applies."""
    from moshi_mlx.settings import TEXT_ONLY_KNOBS, TEXT_ONLY_NOTE

    server = LocalWeb(tmp_path / "web.log", extra=["--demo-stt", "--text-temperature", "0.9"], demo=False)
    try:
        info = server.info()
        assert info["defaults"]["text_temperature"] == 0.0 and info["defaults"]["text_topk"] == 0
        assert [k["name"] for k in info["knobs"]] == list(TEXT_ONLY_KNOBS)
        url = server.ws + "?text_temperature=0.5&text_seed=4&pad_mult=0.25"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            assert (await asyncio.wait_for(ws.receive(), 60)).data == b"\x00"
            while True:
                m = protocol.decode((await asyncio.wait_for(ws.receive(), 30)).data)
                if m is not None and m.kind == Kind.METADATA and m.json()["type"] == "info":
                    first = m.json()
                    break
        assert first["text_temperature"] == 0.0 and first["settings"]["text_temperature"] == 0.0
        assert first["settings"]["pad_mult"] == 0.25
        assert first["ignored_params"] == {"text_temperature": TEXT_ONLY_NOTE, "text_seed": TEXT_ONLY_NOTE}
    finally:
        server.stop()
    assert f"ignored text_temperature, text_seed: {TEXT_ONLY_NOTE}" in server.log
    assert f"note: --text-temperature ignored: {TEXT_ONLY_NOTE}" in server.log  # the flag, said once at start
    no_traceback(server.log)


def test_demo_stt_without_a_sound_card_captions_a_test_signal(tmp_path):
    """No default sound device (a HOME without an ALSA setup, on a machine without a sound card): `local
    --demo-stt` captions the demos' test signal instead, labelled DEMO, words on stdout as live captions print
    them; --record keeps the signal and the timed transcript. --demo-output (audio) is refused for it."""
    record = tmp_path / "rec"
    record.mkdir()
    env = base_env(HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "moshi_mlx.local", "--demo-stt", "--record", str(record)], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr
    assert "no usable sound device" in r.stderr and "DEMO MODE" in r.stderr and "DEMO done:" in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(re.fullmatch(r"\s*\d+\.\d\d\s+\d+\.\d\d\s+\S.*", line) for line in lines), r.stdout[:500]
    assert f"DEMO done: {len(lines)} made-up words" in r.stderr
    transcript = json.loads(next(record.glob("*.json")).read_text())
    assert len(transcript["words"]) == len(lines) and transcript["input"] == "the demo's test signal"
    pcm, rate = read_wav(next(record.glob("*.wav")))
    assert abs(pcm.size / rate - 10.0) < 0.1  # the signal
    bad = subprocess.run([sys.executable, "-m", "moshi_mlx.local", "--demo-stt", "--demo-output", "x.wav"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "writes no audio" in bad.stderr
