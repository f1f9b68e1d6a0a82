"""Speech to timed words with a Kyutai speech-to-text model (text-only LM: `dep_q` 0, `stt_config`).

An STT model writes each word `audio_delay_seconds` after the audio that holds it (Kyutai's delayed streams),
so a transcript needs three things this module does once for every front end:

* **the lag**: the text token the model samples at step t stands for the audio `audio_delay_seconds` before
  frame t; the word's times are moved back by that much, into the input's time base (seconds from the first
  input sample);
* **the end of the input**: after the last frame the model is fed `audio_delay_seconds` of silence (rounded up
  to whole frames), so the last words come out; the model was trained with `audio_silence_prefix_seconds` of
  silence before the speech, which is fed first (and not counted in the input's time base);
* **word boundaries**, as Kyutai's scripts read them (delayed-streams-modeling `stt_from_file_*.py`): a
  SentencePiece piece starting with "▁" begins a word (the scripts print it as a space), the other pieces
  continue it; the end-of-padding token (id 0) closes the word before it. A word starts at the step of its
  first piece and ends at the step that closes it (the next end of padding or the next word); a word still
  open when the input ends is given at most one second.

Step alignment: our LmGen's step t is given input frame t and reads frame t - 1 (the training layout; Kyutai's
MLX and Rust convention). Kyutai's PyTorch LMGen reads frame t itself at step t, so its script stamps the same
token one frame (80 ms) earlier than we do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .audio.frames import FRAME_RATE, FRAME_SIZE, FrameChunker
from .errors import MoshiError
from .generate import LmGen
from .models.config import SttConfig

#: Kyutai's scripts give a word still open at the end of the input at most this long.
LAST_WORD_MAX_SECONDS = 1.0
#: Semantic end of turn, as Kyutai's scripts and Unmute read the extra heads: head 2's first probability above
#: 0.5. Said once, then again only after a new word (which re-arms it).
END_OF_TURN_HEAD, END_OF_TURN_THRESHOLD = 2, 0.5
#: What each extra head's first probability means: no voice activity over the next this many seconds (Kyutai's
#: stt-rs, for kyutai/stt-1b-en_fr: 0.5 s, 1 s, 2 s, 3 s). Head 2, the end of turn, is the 2 s pause.
PAUSE_HORIZONS_S = (0.5, 1.0, 2.0, 3.0)


def heads_note() -> str:
    """One line saying what the VAD numbers are (help texts, transcript JSON)."""
    horizons = ", ".join(f"head {i}: {s:g} s" for i, s in enumerate(PAUSE_HORIZONS_S))
    return (f"each extra head's probability that the speaker is silent for the next ({horizons}); an end of turn is "
            f"head {END_OF_TURN_HEAD} above {END_OF_TURN_THRESHOLD}, as Kyutai's scripts and Unmute read it")


class TranscribeError(MoshiError, ValueError):
    """The model cannot transcribe (not a text-only model, or no stt_config); one line."""


class PieceSource(Protocol):
    """What the word timer needs of a tokenizer: readable text for a token, None for the silent ones."""

    def piece(self, token: int) -> str | None: ...


class FrameEncoder(Protocol):
    """What the transcriber needs of Mimi: one 80 ms frame of 24 kHz PCM -> the model's codebooks."""

    def encode_frame(self, pcm: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Word:
    """One transcribed word; times in seconds from the start of the input."""

    text: str
    start: float
    end: float


class WordTimer:
    """The model's text tokens, step by step -> words with their times (pure: no model, no audio).

    `offset_seconds` is what a step's own time (step / frame_rate) exceeds the input's time base by: the
    silence fed before the input plus the model's audio delay.
    """

    def __init__(
        self, tokenizer: PieceSource, offset_seconds: float, end_of_padding_id: int = 0,
        frame_rate: float = FRAME_RATE,
    ) -> None:
        self._tokenizer = tokenizer
        self._offset = offset_seconds
        self._end_of_padding = end_of_padding_id
        self._frame_rate = frame_rate
        self._text = ""
        self._start: int | None = None  # step of the open word's first piece
        self.steps = 0
        self.steps_with_text = 0  # steps whose token was a piece of text
        self.opened = 0  # words opened so far: the open word's number, for a front end that announces it early
        self.last_was_text = False  # the last token was a piece of text (the open word may still grow)

    @property
    def partial(self) -> str:
        """The open word's text so far ("" when none is open)."""
        return self._text if self._start is not None else ""

    @property
    def open_start(self) -> float | None:
        """The open word's start (input seconds), None when no word is open."""
        return self._time(self._start) if self._start is not None else None

    def shift(self, seconds: float) -> None:
        """The input's clock jumped ahead by `seconds` (frames dropped before the model saw them)."""
        self._offset -= seconds

    def _time(self, step: float) -> float:
        return max(0.0, step / self._frame_rate - self._offset)

    def _close(self, step: float) -> list[Word]:
        if self._start is None:
            return []
        text, start = self._text.strip(), self._start
        self._text, self._start = "", None
        return [Word(text, self._time(start), self._time(step))] if text else []

    def push(self, token: int) -> list[Word]:
        """The token sampled at the next step; returns the words it closes (none or one)."""
        step = self.steps
        self.steps += 1
        self.last_was_text = False
        if token == self._end_of_padding:
            return self._close(step)
        piece = self._tokenizer.piece(token)
        if piece is None:  # padding and other silent ids
            return []
        self.steps_with_text += 1
        self.last_was_text = True
        closed: list[Word] = []
        if piece.startswith(" ") or self._start is None:
            closed = self._close(step)
            self._start = step
            self.opened += 1
        self._text += piece
        return closed

    def finish(self, limit: float | None = None) -> list[Word]:
        """Close a word still open after the last step: it ends there, at most one second after its start.
        `limit` (seconds, the input's duration) caps the times."""
        if self._start is None:
            return []
        end = min(float(self.steps), self._start + LAST_WORD_MAX_SECONDS * self._frame_rate)
        words = self._close(end)
        if limit is None:
            return words
        return [Word(w.text, min(w.start, limit), min(w.end, limit)) for w in words]


def _frames(seconds: float) -> int:
    return math.ceil(round(seconds * FRAME_RATE, 6))  # 0.5 s -> 7 frames (ceil of 6.25), as Kyutai's scripts


class Transcriber:
    """Streams 80 ms PCM frames through Mimi and an STT model's LmGen and hands out timed words.

    `feed(frame)` returns the words that frame completed (usually none); `finish()` flushes the model with
    its audio delay of silence and returns the rest. `stt` defaults to the model's own `stt_config`.
    """

    def __init__(
        self, gen: LmGen, encoder: FrameEncoder, tokenizer: PieceSource, stt: SttConfig | None = None
    ) -> None:
        config = gen.config
        if not config.text_only:
            raise TranscribeError(f"a transcript needs a text-only (speech-to-text) model; this one has dep_q "
                                  f"{config.generated_codebooks}")
        stt = stt or config.stt
        if stt is None:
            raise TranscribeError("the model's config has no stt_config (audio_delay_seconds): not an STT model")
        self.gen, self.encoder, self.stt = gen, encoder, stt
        self.prefix_frames = _frames(stt.audio_silence_prefix_seconds)
        self.flush_frames = _frames(stt.audio_delay_seconds)
        offset = self.prefix_frames / FRAME_RATE + stt.audio_delay_seconds
        self.timer = WordTimer(tokenizer, offset, config.end_of_text_padding_id)
        self.frames = 0  # input frames fed
        # Each extra head's first probability at the last step (None: the model has none). Kyutai's scripts
        # take head 2's above 0.5 as the speaker's end of turn (semantic VAD).
        self.pause_probabilities: tuple[float, ...] | None = None
        # Input seconds at which an end of turn was detected (the end of the frame that showed it; not moved back
        # by the delay: this is when a listener would know). Needs LmGen(extra_heads=True) and 3+ heads.
        self.turn_ends: list[float] = []
        self._turn_armed = True
        self._silence = np.zeros(FRAME_SIZE, np.float32)
        self._finished = False
        self._primed = False
        self.skipped = 0  # input frames a live runner dropped (counted in `frames`)
        self.last_token: int | None = None  # the text token of the last step (None while the delays fill)

    def _step(self, pcm: np.ndarray) -> list[Word]:
        return self._step_codes(self.encoder.encode_frame(pcm))

    def _step_codes(self, codes: np.ndarray) -> list[Word]:
        codes = np.asarray(codes).reshape(-1)[: self.gen.config.user_codebooks]
        pending = self.gen.submit(codes)
        heads = pending.extra_heads
        out = pending.result()
        if heads is not None:
            self.pause_probabilities = tuple(float(h[0]) for h in heads)
        self.last_token = out.text_token if out is not None else None
        pieces_before = self.timer.steps_with_text
        words = self.timer.push(out.text_token) if out is not None else []
        if self.timer.steps_with_text != pieces_before:
            self._turn_armed = True  # a new piece of text: the next end of turn is news again
        probs = self.pause_probabilities
        if probs is not None and len(probs) > END_OF_TURN_HEAD and probs[END_OF_TURN_HEAD] > END_OF_TURN_THRESHOLD:
            if self._turn_armed:
                heard = min(max(0, self.gen.step_index - self.prefix_frames) + self.skipped, self.frames)
                self.turn_ends.append(heard / FRAME_RATE)
            self._turn_armed = False
        return words

    def _check_open(self) -> None:
        if self._finished:
            raise TranscribeError("this transcript is finished; start a new Transcriber")

    def prime(self) -> list[Word]:
        """Feed the model's silence prefix (`audio_silence_prefix_seconds`), once, before the first frame.
        `feed` does it by itself; a live runner calls it ahead, while no audio is waiting."""
        self._check_open()
        if self._primed:
            return []
        self._primed = True
        words: list[Word] = []
        for _ in range(self.prefix_frames):
            words += self._step(self._silence)
        return words

    def feed(self, pcm: np.ndarray) -> list[Word]:
        """One frame (FRAME_SIZE samples, 24 kHz mono float32) of the input."""
        self._check_open()
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if pcm.shape[0] != FRAME_SIZE:
            raise TranscribeError(f"a frame is {FRAME_SIZE} samples, got {pcm.shape[0]}")
        words = self.prime()
        self.frames += 1
        return words + self._step(pcm)

    def feed_codes(self, codes: np.ndarray) -> list[Word]:
        """One input frame already encoded by Mimi (a pipeline encodes on its own thread); after `prime()`."""
        self._check_open()
        words = self.prime()
        self.frames += 1
        return words + self._step_codes(codes)

    def skip(self, frames: int) -> None:
        """`frames` input frames were dropped before the next one (a live runner that fell behind): the input's
        clock moves on by that much. Words already inside the model's delay are then stamped up to that much
        late: the model cannot tell which audio it missed."""
        if frames <= 0:
            return
        self.frames += frames
        self.skipped += frames
        self.timer.shift(frames / FRAME_RATE)

    def finish(self, duration: float | None = None) -> list[Word]:
        """Feed the audio delay's worth of silence, close the last word; times capped at the input's end
        (`duration` in seconds, default the frames fed: a padded last frame counts whole)."""
        if self._finished:
            return []
        self._finished = True
        words: list[Word] = []
        for _ in range(self.flush_frames):
            words += self._step(self._silence)
        duration = self.frames / FRAME_RATE if duration is None else duration
        words = [Word(w.text, min(w.start, duration), min(w.end, duration)) for w in words]
        return words + self.timer.finish(limit=duration)


def transcribe(
    frames: Iterable[np.ndarray], gen: LmGen, encoder: FrameEncoder, tokenizer: PieceSource,
    stt: SttConfig | None = None, duration: float | None = None,
) -> Iterator[Word]:
    """Timed words of a whole input given as 80 ms frames (a file's last frame zero-padded; `duration`, its
    real length in seconds, caps the times), as they come."""
    transcriber = Transcriber(gen, encoder, tokenizer, stt)
    for frame in frames:
        yield from transcriber.feed(frame)
    yield from transcriber.finish(duration)


def frames_of(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """24 kHz mono blocks of any size -> 80 ms frames, the last one padded with silence (a file's end)."""
    chunker = FrameChunker()
    for block in blocks:
        yield from chunker.push(block)
    rest = chunker.rest()
    if rest.size:
        yield np.concatenate([rest, np.zeros(FRAME_SIZE - rest.size, np.float32)])
