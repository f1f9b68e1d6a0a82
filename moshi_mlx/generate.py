"""Streaming generation: one 80 ms frame of user codes in, Moshi's text token and audio codes out.

Codebook delays are handled here. Streams are laid out in "positions": codebook k at position p
holds frame p - delay[k], and step t samples position t. The model's input at step t is position
t - 1 of every stream (Moshi's own tokens sampled at the previous step, the user's frame
t - 1 - delay), with the learned start tokens (text `text_card`, audio `card`) where a stream has
nothing yet. This is how Kyutai's MLX and Rust implementations and its training-time forward align
the streams. A complete output frame is known `max_delay` steps after its first codebook was sampled.

A persona prompt (moshi_mlx.persona) runs as *forced* steps: `submit(user, forced=frame)` decides Moshi's own
frame (text and generated codebooks) instead of sampling it; each stream's token lands at position step + its
delay, so with delays a prompt frame still decides a position or two after the prompt (those codebooks are then
fed through the depformer as given). A step may also take its input as a stored embedding (`embedding=`:
a voice preset). `begin_conversation()` marks the end of the prompt: frames count from 0 again after it, and
`snapshot()` / `restore()` save and put back everything the prompt left (KV cache, token buffers).

A conditioned model (Hibiki) adds its condition to every step's input. With classifier-free guidance
(cfg_coef C != 1) each step runs a batch of two, the chosen condition and `very_bad`, on the same tokens, and
samples text and every audio codebook from C * l_good - (C - 1) * l_bad, as Kyutai's PyTorch LMGen does; the
sampled tokens feed both rows. With C == 1 the step is a single row: guidance off costs nothing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .conditioning import conditions_for
from .models.cache import prefill_context
from .models.lm import Lm, cfg_combine
from .sampling import make_sampler, make_text_sampler
from .settings import (
    DEFAULT_AUDIO_SAMPLING,
    DEFAULT_TEXT_CONTROLS,
    DEFAULT_TEXT_SAMPLING,
    SamplingParams,
    TextControls,
)


@dataclass(frozen=True)
class StepOutput:
    """One complete output frame."""

    frame: int  # index of the frame these tokens belong to (0-based)
    text_token: int
    audio_codes: np.ndarray  # [generated_codebooks] int32, each in [0, audio_card); empty for a text-only model


PREFILL_CHUNK = 64  # prompt positions per temporal call in LmGen.prefill (bounds its activations)


@dataclass(frozen=True)
class GenSnapshot:
    """Everything an LmGen's prompt left behind, to start further conversations from (see LmGen.snapshot)."""

    steps: int
    kv: list[tuple[list[mx.array], list[mx.array]]]  # per layer: keys, values of the first `steps` slots
    last_generated: mx.array | None
    user_history: tuple[np.ndarray, ...]
    generated_history: tuple[np.ndarray, ...]
    forced: dict[int, tuple[np.ndarray, np.ndarray]]
    prompt_steps: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for keys, values in self.kv for a in (*keys, *values))


@dataclass
class StepTimings:
    """Opt-in per-step timings, recorded by `LmGen` when attached as `gen.timings`.

    Timing the two halves needs a sync between them (the app's step runs them as one async
    graph), so it costs a little; with `gen.timings = None` (the default) the step is unchanged.
    """

    temporal_ms: list[float] = field(default_factory=list)  # embeddings, temporal transformer, text sampling
    depformer_ms: list[float] = field(default_factory=list)  # every generated codebook, incl. sampling
    _mark: float = 0.0

    def start(self) -> None:
        self._mark = time.perf_counter()

    def lap(self, into: list[float], *arrays: mx.array) -> None:
        mx.eval(*arrays)
        now = time.perf_counter()
        into.append((now - self._mark) * 1e3)
        self._mark = now


class PendingStep:
    """A step whose computation has been queued on the device (see LmGen.submit)."""

    def __init__(
        self, gen: "LmGen", step: int, tokens: mx.array, text_logits: mx.array | None = None,
        extra_heads: list[mx.array] | None = None,
    ) -> None:
        self._gen = gen
        self.step = step
        self._tokens = tokens
        self._text_logits = text_logits
        self._extra_heads = extra_heads

    @property
    def extra_heads(self) -> list[np.ndarray] | None:
        """Each extra head's probabilities [extra_heads_dim] (float32) at this step, if the LmGen computes them
        (`LmGen(extra_heads=True)`), as Kyutai's `step_with_extra_heads` returns them; else None."""
        if self._extra_heads is None:
            return None
        return [np.array(p[0, 0]) for p in self._extra_heads]

    @property
    def text_logits(self) -> np.ndarray | None:
        """This step's text logits [text_out_vocab] as float32, if the LmGen keeps them (else None)."""
        if self._text_logits is None:
            return None
        return np.array(self._text_logits[0].astype(mx.float32))

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
        keep_text_logits: bool = False,
        text_controls: TextControls = DEFAULT_TEXT_CONTROLS,
        text_seed: int | None = None,
        audio_seed: int | None = None,
        kv_bits: int = 16,
        context: int | None = None,
        condition: str | None = None,
        cfg_coef: float = 1.0,
        extra_heads: bool = False,
    ) -> None:
        if batch != 1:
            raise NotImplementedError("streaming generation runs one conversation (batch 1)")
        self.model = model
        self.config = model.config
        # Opt-in: the step's text logits stay referenced for PendingStep.text_logits (tools, plots).
        self.keep_text_logits = keep_text_logits
        # Opt-in: each step also runs the model's extra heads (Kyutai's semantic VAD) on the temporal output.
        self.extra_heads = extra_heads and bool(model.extra_heads)
        self._delays = np.array(self.config.audio_delays, dtype=np.int64)
        self._gen_delays = self._delays[: self.config.generated_codebooks]
        self._user_delays = self._delays[self.config.generated_codebooks :]
        # Learned start tokens of Moshi's own streams: text `text_card`, audio `card`.
        self._start_np = np.array([self.config.text_out_vocab_size] + [self.config.audio_card] * self.config.generated_codebooks, dtype=np.int32)
        self._start = mx.array(self._start_np[None, :])
        # Text tokens the repetition penalty never counts: padding, end of padding, start.
        self._not_words = mx.array(
            [self.config.text_padding_id, self.config.end_of_text_padding_id, self.config.text_out_vocab_size]
        )
        self._kv_bits, self._context = kv_bits, context
        self._cache = None
        self._rows = 0  # batch rows each step runs: 2 under guidance, else 1
        self.timings: StepTimings | None = None  # attach one to have each step time its two halves
        self.configure(text_sampling, audio_sampling, seed, text_controls, text_seed, audio_seed, condition, cfg_coef)
        self.reset()

    def configure(
        self,
        text_sampling: SamplingParams,
        audio_sampling: SamplingParams,
        seed: int | None = None,
        text_controls: TextControls = DEFAULT_TEXT_CONTROLS,
        text_seed: int | None = None,
        audio_seed: int | None = None,
        condition: str | None = None,
        cfg_coef: float = 1.0,
    ) -> None:
        """New sampling settings. `seed` seeds both streams; `text_seed` / `audio_seed` take precedence.

        `condition` (None: the model's default) and `cfg_coef` apply to a conditioned model only; anything
        else is a one-line ConditioningError. Call `reset()` before the next step.
        """
        rows = conditions_for(self.config, condition, cfg_coef)
        self.condition = rows[0] if rows else None  # {conditioner: value} of the row that is sampled
        self.cfg_coef = float(cfg_coef)
        guided = len(rows) > 1
        # [rows, 1, D]: each row's condition, computed once per setting (a look-up and a projection).
        self._condition = mx.concatenate([self.model.condition(r) for r in rows], axis=0) if rows else None
        if self._condition is not None:
            mx.eval(self._condition)
        batch = max(len(rows), 1)
        if self._cache is None or self._rows != batch:
            self._cache = None  # the old rows' windows go before the new ones are allocated
            self._cache = self.model.make_cache(batch, kv_bits=self._kv_bits, context=self._context)
            self._rows = batch
        self.text_sampling = text_sampling
        self.audio_sampling = audio_sampling
        self.text_controls = text_controls
        self._text_sampler = make_text_sampler(
            text_sampling, text_controls, self.config.text_out_vocab_size, self.config.text_padding_id
        )
        audio_sampler = self._audio_sampler = make_sampler(audio_sampling, self.config.audio_card)
        # The depformer's shapes never change, so it is traced once; fusing its small ops
        # saves launches (a few % on CPU, more where kernel launches cost more, as on GPUs).
        # The closure must not hold `self`: that cycle kept a finished LmGen (and its KV cache, up to GBs)
        # alive until the next garbage collection.
        depformer = self.model.depformer
        coef = self.cfg_coef if guided else None
        self._depformer = mx.compile(
            lambda hidden, text, keys: depformer.sample(hidden, text, audio_sampler, keys, cfg_coef=coef)
        )
        self.seed = seed
        self.text_seed = text_seed if text_seed is not None else seed
        self.audio_seed = audio_seed if audio_seed is not None else seed
        self._text_key = self._stream_key(self.text_seed, 0)
        self._audio_key = self._stream_key(self.audio_seed, 1)

    @property
    def window(self) -> int:
        """Steps the attention window holds (a persona prompt must fit in it)."""
        return self._cache.capacity

    @property
    def rows(self) -> int:
        """Batch rows each step runs: 2 under classifier-free guidance (cfg_coef != 1), else 1."""
        return self._rows

    @staticmethod
    def _stream_key(seed: int | None, stream: int) -> mx.array:
        # Text and audio take different halves of their seed's key: equal seeds give unrelated draws.
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
        key = mx.random.split(mx.random.key(seed), 2)[stream]
        mx.eval(key)
        return key

    def reset(self, seed: int | None = None, text_seed: int | None = None, audio_seed: int | None = None) -> None:
        """Start a new conversation; caches are reused, not reallocated.

        With seeds (given here or earlier; `seed` sets both), the conversation replays identically.
        """
        self._cache.reset()
        if seed is not None:
            self.seed = self.text_seed = self.audio_seed = seed
        self.text_seed = text_seed if text_seed is not None else self.text_seed
        self.audio_seed = audio_seed if audio_seed is not None else self.audio_seed
        if self.text_seed is not None:
            self._text_key = self._stream_key(self.text_seed, 0)
        if self.audio_seed is not None:
            self._audio_key = self._stream_key(self.audio_seed, 1)
        # The last N text tokens for the repetition penalty (-1: empty), kept on the device.
        size = self.text_controls.repetition_penalty_context if self.text_controls.penalises else 1
        self._recent = mx.full((1, size), -1, dtype=mx.int32)
        self.step_index = 0
        self._last_generated: mx.array | None = None  # device tokens of the previous step
        self._user_history: deque[np.ndarray] = deque(maxlen=self.config.max_delay + 2)
        self._generated_history: deque[np.ndarray] = deque(maxlen=self.config.max_delay + 1)
        self._pending: PendingStep | None = None
        # Prompt frames' tokens by position: (tokens [1 + generated], which of them are decided).
        self._forced: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.prompt_steps = 0  # steps a persona prompt took; the conversation's frames count from there

    def begin_conversation(self) -> None:
        """The prompt is over: the next step is the conversation's first (its frames count from 0)."""
        self.prompt_steps = self.step_index

    def _force(self, frame: np.ndarray) -> None:
        """Moshi's frame `step_index` is decided: each stream's token goes to position step + its delay."""
        frame = np.asarray(frame, dtype=np.int32).reshape(-1)
        width = 1 + self.config.generated_codebooks
        if frame.shape[0] != width:
            raise ValueError(f"expected a forced frame of {width} tokens (text first), got {frame.shape[0]}")
        for s, delay in enumerate([0, *self._gen_delays]):
            tokens, mask = self._forced.setdefault(
                self.step_index + int(delay), (np.zeros(width, np.int32), np.zeros(width, bool))
            )
            tokens[s], mask[s] = frame[s], True

    def prefill(
        self, steps: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], chunk: int = PREFILL_CHUNK
    ) -> None:
        """Run decided steps (user codes, Moshi's forced frame, optional embedding) as whole sequences.

        The same state as calling `step(user, forced=frame, embedding=e)` for each, but the temporal
        transformer takes up to `chunk` positions per call (matrix products instead of one row at a time).
        Every step must be wholly decided: nothing is sampled.
        """
        if self._pending is not None:
            raise RuntimeError("finish the pending step before a prefill")
        for start in range(0, len(steps), chunk):
            inputs = []
            for user, frame, embedding in steps[start:start + chunk]:
                user = np.asarray(user, dtype=np.int32).reshape(-1)
                tokens = self._input_tokens(user)
                self._force(frame)
                tokens_np, mask = self._forced.pop(self.step_index)
                early = np.concatenate([[False], self.step_index < self._gen_delays])
                if not (mask | early).all():
                    raise ValueError("a prefill step must decide every stream")
                decided = np.where(mask, tokens_np, self._start_np)
                if embedding is None:
                    inputs.append(self.model.embed_step(tokens))
                else:
                    inputs.append(mx.array(embedding).reshape(1, 1, -1).astype(self.model.dtype))
                self._last_generated = mx.array(decided[None, :])
                self._generated_history.append(decided)
                self.step_index += 1
            x = mx.concatenate(inputs, axis=1)
            if self._rows > 1:
                x = mx.broadcast_to(x, (self._rows, *x.shape[1:]))
            if self._condition is not None:
                x = x + self._condition.astype(x.dtype)
            ctx = prefill_context(self._cache.position, x.shape[1], self._cache.capacity)
            mx.eval(self.model.transformer(x, self._cache.layers, ctx))
            self._cache.position += x.shape[1]

    def snapshot(self) -> GenSnapshot:
        """The state after the steps so far (a prompt), to `restore` later instead of replaying them."""
        if self._pending is not None:
            raise RuntimeError("finish the pending step before a snapshot")
        steps = self.step_index
        if steps > self._cache.capacity:
            raise ValueError("the prompt no longer fits the attention window: nothing to snapshot")
        kv = self._cache.window_slices(steps)
        mx.eval(*[a for keys, values in kv for a in (*keys, *values)])
        return GenSnapshot(
            steps, kv, self._last_generated, tuple(self._user_history), tuple(self._generated_history),
            {p: (t.copy(), m.copy()) for p, (t, m) in self._forced.items()}, self.prompt_steps,
        )

    def restore(self, snap: GenSnapshot) -> None:
        """Back to the state of `snapshot()` (after a `reset()`: seeds and sampling stay as they are now)."""
        if self.step_index != 0:
            raise RuntimeError("restore a snapshot right after reset()")
        self._cache.restore_slices(snap.kv, snap.steps)
        self.step_index = snap.steps
        self._last_generated = snap.last_generated
        self._user_history.extend(snap.user_history)
        self._generated_history.extend(snap.generated_history)
        self._forced = {p: (t.copy(), m.copy()) for p, (t, m) in snap.forced.items()}
        self.prompt_steps = snap.prompt_steps

    def set_token_state(
        self, last_generated: np.ndarray, user_frames: list[np.ndarray], generated: list[np.ndarray],
        forced: dict[int, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Put the token buffers as a voice preset recorded them (its KV entries come from replayed steps)."""
        self._last_generated = mx.array(np.asarray(last_generated, np.int32)[None, :])
        self._user_history.clear()
        self._user_history.extend(np.asarray(f, np.int32) for f in user_frames)
        self._generated_history.clear()
        self._generated_history.extend(np.asarray(g, np.int32) for g in generated)
        self._forced = {p: (np.asarray(t, np.int32).copy(), np.asarray(m, bool).copy()) for p, (t, m) in forced.items()}

    def _input_tokens(self, user_codes: np.ndarray) -> mx.array:
        """Position step - 1 of every stream, start tokens where a stream has no frame yet."""
        step = self.step_index
        cfg = self.config
        self._user_history.append(user_codes)
        user = np.full(cfg.user_codebooks, cfg.audio_card, dtype=np.int32)
        for k, delay in enumerate(self._user_delays):
            if step - 1 - delay >= 0:  # the user's frame step - 1 - delay (the history ends with frame `step`)
                user[k] = self._user_history[-2 - delay][k]
        user_in = mx.array(user)[None, :]
        if self._last_generated is None:
            generated = self._start
        else:
            # Codebook k's previous position holds a real frame only once step - 1 >= its delay.
            ready = np.concatenate([[True], step - 1 >= self._gen_delays])
            generated = mx.where(mx.array(ready)[None, :], self._last_generated, self._start)
        return mx.concatenate([generated, user_in], axis=1)

    def submit(
        self, user_codes: np.ndarray, forced: np.ndarray | None = None, embedding: mx.array | np.ndarray | None = None
    ) -> PendingStep:
        """Queue one step on the device and return at once (mx.async_eval).

        The caller can do other work (e.g. decode the previous frame's audio) before
        calling `.result()`. Steps must be finished in order.
        `forced`: Moshi's frame for this step, decided (a prompt frame: text first, then the generated codebooks).
        `embedding`: [D] the temporal input to use instead of the tokens' embeddings (a voice preset's step).
        """
        if self._pending is not None:
            raise RuntimeError("finish the pending step (call .result()) before submitting another")
        user_codes = np.asarray(user_codes).reshape(-1).astype(np.int32)
        if user_codes.shape[0] != self.config.user_codebooks:
            raise ValueError(f"expected {self.config.user_codebooks} user codes, got {user_codes.shape[0]}")
        if user_codes.min() < 0 or user_codes.max() >= self.config.audio_card:
            raise ValueError(f"user codes must be in [0, {self.config.audio_card})")
        tokens = self._input_tokens(user_codes)
        if forced is not None:
            self._force(forced)
        decided = self._forced.pop(self.step_index, None)
        if decided is not None:
            # Positions before a codebook's delay hold its start token whatever is sampled there.
            early = np.concatenate([[False], self.step_index < self._gen_delays])
            if (decided[1] | early).all():
                return self._submit_decided(tokens, np.where(decided[1], decided[0], self._start_np), embedding)
        text_keys = mx.random.split(self._text_key, 2)
        audio_keys = mx.random.split(self._audio_key, 1 + self.config.generated_codebooks)
        self._text_key, self._audio_key = text_keys[0], audio_keys[0]
        # The temporal transformer stays eager: tracing it with mx.compile took seconds per
        # attended-length bucket (a stall mid-conversation) and gained nothing measurable.
        timings = self.timings
        if timings is not None:
            timings.start()
        rows = self._rows
        if rows > 1:  # guidance: the same tokens under each row's condition
            tokens = mx.broadcast_to(tokens, (rows, tokens.shape[1]))
        hidden, text_logits = self._temporal(tokens, embedding)
        if rows > 1:
            text_logits = cfg_combine(text_logits, self.cfg_coef)
        text_token = self._text_sampler(text_logits, self._recent, text_keys[1])
        if self.text_controls.penalises:
            word = mx.where((text_token[:, None] == self._not_words).any(axis=-1), -1, text_token)
            self._recent = mx.concatenate([self._recent[:, 1:], word[:, None]], axis=1)
        if timings is not None:
            timings.lap(timings.temporal_ms, hidden, text_token, audio_keys)
        if decided is not None and decided[1][0]:
            text_token = mx.array(decided[0][:1])
        # A text-only model (dep_q 0) has no depformer to run: its frame carries no audio codes.
        if self.config.text_only:
            audio = mx.zeros((1, 0), mx.int32)
        elif decided is not None:  # the few steps a prompt's last frames reach into (not traced: rare)
            audio = self.model.depformer.sample(
                hidden, text_token, self._audio_sampler, audio_keys[1:], cfg_coef=self.cfg_coef if rows > 1 else None,
                forced=mx.array(decided[0][None, 1:]), forced_mask=mx.array(decided[1][None, 1:]),
            )
        else:
            audio = self._depformer(hidden, text_token, audio_keys[1:])
        if timings is not None:
            timings.lap(timings.depformer_ms, audio)
        generated = mx.concatenate([text_token[:, None], audio], axis=1)
        self._cache.position += 1
        self._last_generated = generated
        kept = text_logits if self.keep_text_logits else None
        heads = self.model.extra_head_probs(hidden) if self.extra_heads else None
        extras = ([kept] if kept is not None else []) + (heads or [])
        mx.async_eval(generated, self._text_key, self._audio_key, self._recent, *extras)
        self._pending = PendingStep(self, self.step_index, generated, kept, heads)
        self.step_index += 1
        return self._pending

    def _temporal(self, tokens: mx.array, embedding: mx.array | np.ndarray | None) -> tuple[mx.array, mx.array]:
        if embedding is None:
            return self.model.temporal(tokens, self._cache.layers, self._cache.context(), self._condition)
        x = mx.array(embedding).reshape(1, 1, -1).astype(self.model.dtype)
        x = mx.broadcast_to(x, (tokens.shape[0], 1, x.shape[-1]))
        return self.model.temporal_embedded(x, self._cache.layers, self._cache.context(), self._condition)

    def _submit_decided(
        self, tokens: mx.array, frame: np.ndarray, embedding: mx.array | np.ndarray | None
    ) -> PendingStep:
        """A step whose every token is decided (a prompt frame): the temporal transformer only fills its cache.

        Nothing is sampled, so the random keys and the repetition window stay as they were.
        """
        if self._rows > 1:
            tokens = mx.broadcast_to(tokens, (self._rows, tokens.shape[1]))
        hidden, _ = self._temporal(tokens, embedding)
        generated = mx.array(frame[None, :].astype(np.int32))
        self._cache.position += 1
        self._last_generated = generated
        mx.async_eval(hidden)
        self._pending = PendingStep(self, self.step_index, generated)
        self.step_index += 1
        return self._pending

    def _finish(self, pending: PendingStep) -> StepOutput | None:
        if pending is not self._pending:
            raise RuntimeError("steps must be finished in the order they were submitted")
        self._pending = None
        self._generated_history.append(np.array(pending._tokens[0], copy=True))
        frame = pending.step - self.config.max_delay - self.prompt_steps
        if frame < 0:
            return None
        hist = self._generated_history
        text_token = int(hist[-1 - self.config.max_delay][0])
        codes = np.array([hist[-1 - (self.config.max_delay - d)][1 + k] for k, d in enumerate(self._gen_delays)])
        return StepOutput(frame=frame, text_token=text_token, audio_codes=codes.astype(np.int32))

    def step(
        self, user_codes: np.ndarray, forced: np.ndarray | None = None, embedding: mx.array | np.ndarray | None = None
    ) -> StepOutput | None:
        """Feed one frame of user codes; returns a complete Moshi frame once the delays have filled."""
        return self.submit(user_codes, forced, embedding).result()

