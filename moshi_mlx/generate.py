"""Streaming generation: one 80 ms frame of user codes in, Moshi's text token and audio codes out.

Codebook delays are handled here. At step t the model reads, for every stream, the token of
"position" t where codebook k at position p holds frame p - delay[k]. Moshi's sampled tokens
become the next position's input, so a complete output frame (all codebooks of one time
step) is known `max_delay` steps after its first codebook was sampled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .models.lm import NO_TOKEN, Lm
from .sampling import DEFAULT_AUDIO_SAMPLING, DEFAULT_TEXT_SAMPLING, SamplingParams, make_sampler


@dataclass(frozen=True)
class StepOutput:
    """One complete output frame."""

    frame: int  # index of the frame these tokens belong to (0-based)
    text_token: int
    audio_codes: np.ndarray  # [generated_codebooks] int32, each in [0, audio_card)


class PendingStep:
    """A step whose computation has been queued on the device (see LmGen.submit)."""

    def __init__(self, gen: "LmGen", step: int, tokens: mx.array) -> None:
        self._gen = gen
        self.step = step
        self._tokens = tokens

    @property
    def raw_tokens(self) -> np.ndarray:
        """This step's sampled tokens in the delayed layout: [text, codebook 0..K-1] (waits for them)."""
        return np.array(self._tokens[0])

    def result(self) -> StepOutput | None:
        return self._gen._finish(self)


class LmGen:
    def __init__(
        self,
        model: Lm,
        text_sampling: SamplingParams = DEFAULT_TEXT_SAMPLING,
        audio_sampling: SamplingParams = DEFAULT_AUDIO_SAMPLING,
        seed: int | None = None,
        batch: int = 1,
        kv_bits: int = 16,
        context: int | None = None,
    ) -> None:
        if batch != 1:
            raise NotImplementedError("streaming generation runs one conversation (batch 1)")
        self.model = model
        self.config = model.config
        self._delays = np.array(self.config.audio_delays, dtype=np.int64)
        self._gen_delays = self._delays[: self.config.generated_codebooks]
        self._user_delays = self._delays[self.config.generated_codebooks :]
        self._cache = model.make_cache(batch, kv_bits=kv_bits, context=context)
        self.configure(text_sampling, audio_sampling, seed)
        self.reset()

    def configure(
        self, text_sampling: SamplingParams, audio_sampling: SamplingParams, seed: int | None = None
    ) -> None:
        self.text_sampling = text_sampling
        self.audio_sampling = audio_sampling
        self._text_sampler = make_sampler(text_sampling, self.config.text_out_vocab_size)
        audio_sampler = make_sampler(audio_sampling, self.config.audio_card)
        # The depformer's shapes never change, so it is traced once; fusing its small ops
        # saves launches (a few % on CPU, more where kernel launches cost more, as on GPUs).
        # The closure must not hold `self`: that cycle kept a finished LmGen (and its KV cache, up to GBs)
        # alive until the next garbage collection.
        depformer = self.model.depformer
        self._depformer = mx.compile(lambda hidden, text, keys: depformer.sample(hidden, text, audio_sampler, keys))
        self.seed = seed
        self._key = mx.random.key(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))
        mx.eval(self._key)

    def reset(self, seed: int | None = None) -> None:
        """Start a new conversation; caches are reused, not reallocated.

        With a seed (given here or earlier), the conversation replays identically.
        """
        self._cache.reset()
        if seed is not None:
            self.seed = seed
        if self.seed is not None:
            self._key = mx.random.key(self.seed)
            mx.eval(self._key)
        self.step_index = 0
        self._last_generated: mx.array | None = None  # device tokens of the previous step
        hist = self.config.max_delay + 1
        self._user_history: deque[np.ndarray] = deque(maxlen=hist)
        self._generated_history: deque[np.ndarray] = deque(maxlen=hist)
        self._pending: PendingStep | None = None

    def _input_tokens(self, user_codes: np.ndarray) -> mx.array:
        step = self.step_index
        cfg = self.config
        self._user_history.append(user_codes)
        user = np.full(cfg.user_codebooks, NO_TOKEN, dtype=np.int32)
        for k, delay in enumerate(self._user_delays):
            if step >= delay:
                user[k] = self._user_history[-1 - delay][k]
        user_in = mx.array(user)[None, :]
        if self._last_generated is None:
            generated = mx.full((1, 1 + cfg.generated_codebooks), NO_TOKEN, dtype=mx.int32)
        else:
            # A delayed codebook has nothing real before step == its delay.
            ready = np.concatenate([[step > 0], step > self._gen_delays])
            generated = mx.where(mx.array(ready)[None, :], self._last_generated, NO_TOKEN)
        return mx.concatenate([generated, user_in], axis=1)

    def submit(self, user_codes: np.ndarray) -> PendingStep:
        """Queue one step on the device and return at once (mx.async_eval).

        The caller can do other work (e.g. decode the previous frame's audio) before
        calling `.result()`. Steps must be finished in order.
        """
        if self._pending is not None:
            raise RuntimeError("finish the pending step (call .result()) before submitting another")
        user_codes = np.asarray(user_codes).reshape(-1).astype(np.int32)
        if user_codes.shape[0] != self.config.user_codebooks:
            raise ValueError(f"expected {self.config.user_codebooks} user codes, got {user_codes.shape[0]}")
        if user_codes.min() < 0 or user_codes.max() >= self.config.audio_card:
            raise ValueError(f"user codes must be in [0, {self.config.audio_card})")
        tokens = self._input_tokens(user_codes)
        keys = mx.random.split(self._key, 2 + self.config.generated_codebooks)
        self._key = keys[0]
        # The temporal transformer stays eager: tracing it with mx.compile took seconds per
        # attended-length bucket (a stall mid-conversation) and gained nothing measurable.
        hidden, text_logits = self.model.temporal(tokens, self._cache.layers, self._cache.context())
        text_token = self._text_sampler(text_logits, keys[1])
        audio = self._depformer(hidden, text_token, keys[2:])
        generated = mx.concatenate([text_token[:, None], audio], axis=1)
        self._cache.position += 1
        self._last_generated = generated
        mx.async_eval(generated, self._key)
        self._pending = PendingStep(self, self.step_index, generated)
        self.step_index += 1
        return self._pending

    def _finish(self, pending: PendingStep) -> StepOutput | None:
        if pending is not self._pending:
            raise RuntimeError("steps must be finished in the order they were submitted")
        self._pending = None
        self._generated_history.append(np.array(pending._tokens[0], copy=True))
        frame = pending.step - self.config.max_delay
        if frame < 0:
            return None
        hist = self._generated_history
        text_token = int(hist[-1 - self.config.max_delay][0])
        codes = np.array([hist[-1 - (self.config.max_delay - d)][1 + k] for k, d in enumerate(self._gen_delays)])
        return StepOutput(frame=frame, text_token=text_token, audio_codes=codes.astype(np.int32))

    def step(self, user_codes: np.ndarray) -> StepOutput | None:
        """Feed one frame of user codes; returns a complete Moshi frame once the delays have filled."""
        return self.submit(user_codes).result()

