"""Our persona prompt against NVIDIA's PyTorch LMGen (tests/fixtures/personaplex, made by its make_fixtures.py).

The fixture is a scaled-down random PersonaPlex-shaped model (n_q 16, dep_q 16, card 2048), converted here
keeping 8 depformer steps as the app does. Greedy both sides, f32. Two voices: audio (its Mimi codes given,
Mimi bypassed on both sides) and the preset NVIDIA saved from that run, converted by `convert --voices`.

Alignment: NVIDIA's first LMGen call only primes its buffers, so its k-th temporal forward (k >= 1) is our
step k - 1; the text argmax at every forward is compared, prompt and conversation. NVIDIA's first conversation
step returns the prompt's last frame (ours withholds it: conversation frames count from 0), so its step t
returns our frame t - 1. The prompt runs both ways: step by step (its per-step text argmax compared too) and
as one prefill (LmGen.prefill: the temporal transformer over the whole prompt at once; conversation compared).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moshi_mlx.generate import LmGen
from moshi_mlx.persona import PersonaPrompt, play_prompt
from moshi_mlx.settings import GREEDY
from moshi_mlx.voices import Voice, load_voice

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "personaplex"
MOSHI_STREAMS = 9  # text + Moshi's 8 codebooks of NVIDIA's 17-row output


def _fixture_module():
    spec = importlib.util.spec_from_file_location("personaplex_make_fixtures", FIX / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import: torch is imported inside its main()
    return module


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from moshi_mlx.model_files.checkpoint import load_lm
    from moshi_mlx.model_files.convert import convert
    from moshi_mlx.models.config import LmConfig

    meta = json.loads((FIX / "meta.json").read_text())
    layout = json.loads((FIX / "layout.json").read_text())
    folder = tmp_path_factory.mktemp("personaplex")
    save_file(_fixture_module().random_state(layout, meta["seed"]), str(folder / "model.safetensors"))
    path = convert(folder / "model.safetensors", folder / "out", config=FIX / "config.json", dtype="f32",
                   log=lambda m: None, max_out_n_q=8)
    written = json.loads((folder / "out" / "config.json").read_text())
    return load_lm(path, LmConfig.from_dict(written))


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return load_file(str(FIX / "expected.safetensors"))


def _run(lm, expected, voice: Voice, encode, batched: bool) -> tuple[list[int], list]:
    gen = LmGen(lm, GREEDY, GREEDY, seed=0)
    argmax: list[int] = []
    temporal = gen._temporal

    def spy(tokens, embedding):
        hidden, logits = temporal(tokens, embedding)
        argmax.append(int(mx.argmax(logits[0]).item()))
        return hidden, logits

    gen._temporal = spy
    play_prompt(gen, PersonaPrompt(voice, tuple(int(t) for t in expected["text_tokens"])), encode, batched)
    outs = [gen.step(u) for u in expected["user_codes"]]
    return argmax, outs


def _check(argmax, outs, ref_argmax, ref_out, batched: bool) -> None:
    # A prefill runs the prompt in one call (no per-step text logits): the conversation's are compared.
    assert argmax == ref_argmax.tolist()[-len(argmax) if batched else 0:]
    assert len(argmax) == (len(outs) if batched else len(ref_argmax))
    assert outs[0] is None and (ref_out[0] >= 0).all()  # NVIDIA's is the prompt's last frame
    ours = np.array([[o.text_token, *o.audio_codes] for o in outs[1:]])
    np.testing.assert_array_equal(ours, ref_out[1:, :MOSHI_STREAMS])
    assert [o.frame for o in outs[1:]] == list(range(len(outs) - 1))
    assert len(outs) - 1 >= 20


@pytest.mark.parametrize("batched", [False, True], ids=["stepwise", "prefill"])
def test_audio_voice_matches_nvidia(lm, expected, batched):
    codes = iter(expected["voice_codes"])
    voice = Voice("wav", pcm=np.zeros(len(expected["voice_codes"]) * 1920, np.float32))
    argmax, outs = _run(lm, expected, voice, lambda pcm: next(codes), batched)
    _check(argmax, outs, expected["wav_text_argmax"], expected["wav_out"], batched)


@pytest.mark.parametrize("batched", [False, True], ids=["stepwise", "prefill"])
def test_preset_voice_matches_nvidia(lm, expected, batched):
    voice = load_voice(str(FIX / "voice.safetensors"), None)
    argmax, outs = _run(lm, expected, voice, None, batched)
    _check(argmax, outs, expected["preset_text_argmax"], expected["preset_out"], batched)
