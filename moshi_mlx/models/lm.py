"""The Moshi language model: embeddings, temporal transformer, depformer and heads.

Parameter names match the published MLX checkpoints (kyutai/moshi{ko,ka}-mlx-*) exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn

from ..sampling import Sampler
from .cache import FrameCache, RotatingKVCache, StepContext, TemporalCache
from .conditioners import ConditionError, ConditionProvider
from .config import KYUTAI_NORMS, LmConfig, TransformerConfig
from .transformer import Transformer, make_norm

# Token id meaning "this stream has no token here yet": it embeds to exact zeros.
NO_TOKEN = -1


def embed(table: nn.Module, tokens: mx.array) -> mx.array:
    """Embedding lookup where NO_TOKEN gives a zero vector.

    Works for nn.Embedding and nn.QuantizedEmbedding alike (a quantized table would
    otherwise return its last row for index -1).
    """
    present = tokens >= 0
    vectors = table(mx.maximum(tokens, 0))
    return vectors * present[..., None].astype(vectors.dtype)


class LowRankEmbedding(nn.Module):
    """An embedding of rank r < width, then a linear map up (Kyutai's depformer_low_rank_embeddings)."""

    def __init__(self, vocab_size: int, rank: int, dims: int) -> None:
        super().__init__()
        self.weight = mx.random.normal((vocab_size, rank))
        self.low_rank = nn.Linear(rank, dims, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.low_rank(self.weight[tokens])


def cfg_combine(logits: mx.array, coef: float) -> mx.array:
    """Classifier-free guidance: rows [:B] scored with the chosen condition, rows [B:] with the `very_bad` one.

    Returns B rows of `coef * good - (coef - 1) * bad`, computed as Kyutai's PyTorch LMGen writes it,
    `bad + (good - bad) * coef` (same value, same rounding as the reference).
    """
    good, bad = mx.split(logits, 2, axis=0)
    return bad + (good - bad) * coef


def quantizes(name: str) -> bool:
    """Whether the parameter `name` is quantized with the model: all but the conditioners' tiny tables, which
    Kyutai keeps in float (their width, e.g. 16, is below any group size)."""
    return not name.startswith("condition_provider.")


def quantize_predicate(path: str, module: nn.Module) -> bool:
    """For nn.quantize's class_predicate: the modules `quantizes` allows."""
    return hasattr(module, "to_quantized") and quantizes(path)


def _norm_from_kyutai(name: str, dims: int) -> nn.Module:
    kind, eps = KYUTAI_NORMS[name]
    return make_norm(TransformerConfig(d_model=dims, num_heads=1, num_layers=0, dim_feedforward=0, context=1,
                                       norm=kind, norm_eps=eps))


class DepformerSlice(nn.Module):
    """Weights for one generated codebook of the depth transformer."""

    def __init__(self, cfg: LmConfig, in_vocab_size: int) -> None:
        super().__init__()
        dep = cfg.depformer
        rank = cfg.depformer_low_rank_embeddings
        self.emb = nn.Embedding(in_vocab_size, dep.d_model) if rank is None else LowRankEmbedding(in_vocab_size, rank, dep.d_model)
        self.linear_in = nn.Linear(cfg.transformer.d_model, dep.d_model, bias=False)
        self.transformer = Transformer(dep)
        if cfg.depformer_out_norm is not None:  # Kyutai's depformer_norms.{k}
            self.out_norm = _norm_from_kyutai(cfg.depformer_out_norm, dep.d_model)
        self.linear_out = nn.Linear(dep.d_model, cfg.audio_card, bias=False)
        self._normed = cfg.depformer_out_norm is not None

    def head(self, x: mx.array) -> mx.array:
        """Logits of this step from the depformer's output."""
        return self.linear_out(self.out_norm(x) if self._normed else x)


class Depformer(nn.Module):
    """The depth transformer: one slice per generated codebook. A text-only model (dep_q 0) has no slice and
    samples nothing; it keeps this empty module so every model has the same attributes."""

    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        self._card = cfg.audio_card
        # Slice 0 reads the text token just sampled; slice k reads audio codebook k-1.
        self.slices = [
            DepformerSlice(cfg, cfg.text_in_vocab_size if k == 0 else cfg.audio_vocab_size)
            for k in range(cfg.generated_codebooks)
        ]
        self._positional = cfg.depformer.positional_embedding != "none"

    def _context(self, k: int) -> StepContext | None:
        """Step k of the frame, for a depformer with positions (rope / sin); None when it has none."""
        if not self._positional:
            return None
        index = mx.array(k, dtype=mx.int32)
        return StepContext(position=index, slot=index[None], mask=mx.ones((1, 1, 1, k + 1), dtype=mx.bool_))

    def sample(
        self, hidden: mx.array, text_token: mx.array, sampler: Sampler, keys: mx.array, cfg_coef: float | None = None,
        forced: mx.array | None = None, forced_mask: mx.array | None = None,
    ) -> mx.array:
        """Sample the generated codebooks one after another; returns [B, K] int32.

        With `cfg_coef`, `hidden` has 2B rows (the chosen condition, then `very_bad`) and `text_token` B rows:
        each step scores both halves, samples B codes from `cfg_combine` of their logits, and feeds the same
        code back to both halves, as Kyutai's PyTorch LMGen does.
        Stays on device: each sampled code feeds the next slice without a host sync.
        `forced` / `forced_mask` ([B, K] int32 / bool): codebooks whose token is already decided (a persona
        prompt's frame that spills past the prompt through the delays): that token is returned and fed on.
        """
        if not self.slices:
            return mx.zeros((text_token.shape[0], 0), dtype=mx.int32)
        caches = [FrameCache() for _ in self.slices[0].transformer.layers]
        previous = text_token
        codes = []
        for k, piece in enumerate(self.slices):
            fed = previous if cfg_coef is None else mx.concatenate([previous, previous], axis=0)
            x = piece.linear_in(hidden) + embed(piece.emb, fed[:, None])
            x = piece.transformer(x, caches, self._context(k))
            logits = piece.head(x)[:, 0, :]
            if cfg_coef is not None:
                logits = cfg_combine(logits, cfg_coef)
            previous = sampler(logits, keys[k])
            if forced is not None:
                previous = mx.where(forced_mask[:, k], forced[:, k], previous)
            codes.append(previous)
        return mx.stack(codes, axis=1)

    def score(self, hidden: mx.array, tokens: mx.array) -> mx.array:
        """Teacher-forced logits for every position at once.

        hidden: [B, T, D] temporal outputs; tokens: [B, generated_codebooks, T] the tokens each
        slice reads (text for slice 0, codebook k-1 for slice k). Returns [B, K, T, audio_card].
        """
        batch, steps, dim = hidden.shape
        if not self.slices:
            return mx.zeros((batch, 0, steps, self._card), dtype=hidden.dtype)
        flat = hidden.reshape(batch * steps, 1, dim)  # positions are independent: fold them into the batch
        caches = [FrameCache() for _ in self.slices[0].transformer.layers]
        logits = []
        for k, piece in enumerate(self.slices):
            x = piece.linear_in(flat) + embed(piece.emb, tokens[:, k, :].reshape(batch * steps, 1))
            x = piece.transformer(x, caches, self._context(k))
            logits.append(piece.head(x).reshape(batch, steps, -1))
        return mx.stack(logits, axis=1)


class _WholeSequence:
    """Attention over a whole sequence in one call: causal, within the last `context` positions."""

    def __init__(self, steps: int, context: int) -> None:
        pos = mx.arange(steps)
        back = pos[:, None] - pos[None, :]
        self.mask = (back >= 0) & (back < context)

    def update(self, keys: mx.array, values: mx.array, ctx: StepContext | None) -> tuple[mx.array, mx.array, mx.array]:
        return keys, values, self.mask


class Lm(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.transformer.d_model
        self.text_emb = nn.Embedding(cfg.text_in_vocab_size, dim)
        self.audio_embs = [nn.Embedding(cfg.audio_vocab_size, dim) for _ in range(cfg.audio_codebooks)]
        self.transformer = Transformer(cfg.transformer)
        self.out_norm = make_norm(cfg.transformer)
        self.text_linear = nn.Linear(dim, cfg.text_out_vocab_size, bias=False)
        self.depformer = Depformer(cfg)
        # Kyutai's extra_heads: linear maps of the temporal output, read with `extra_head_probs`.
        self.extra_heads = [nn.Linear(dim, cfg.extra_heads_dim, bias=False) for _ in range(cfg.extra_heads_num_heads)]
        if cfg.is_conditioned:
            self.condition_provider = ConditionProvider(cfg.conditioners, dim)

    @property
    def dtype(self) -> mx.Dtype:
        return self.out_norm.weight.dtype

    def make_cache(self, batch: int = 1, kv_bits: int = 16, context: int | None = None) -> TemporalCache:
        """The temporal transformer's KV windows, allocated once per session.

        kv_bits: 16 keeps keys/values in the model's dtype; 8 or 4 stores them quantized.
        context: a shorter window than the checkpoint's (to fit a memory budget).
        """
        t = self.config.transformer
        window = t.context if context is None else min(int(context), t.context)
        # Only the key/value heads are stored (fewer than the query heads under kv_repeat).
        return TemporalCache(t.num_layers, batch, t.num_kv_heads, t.head_dim, window, self.dtype, kv_bits)

    def condition(self, values: Mapping[str, str]) -> mx.array:
        """The summed conditioning [1, 1, D] for `values` ({conditioner name: value}), in the model's dtype.

        Kyutai adds it to the temporal transformer's input at every step (fuser `sum`). Raises ConditionError
        for an unknown name or value, or for a model without conditioners.
        """
        if not self.config.is_conditioned:
            raise ConditionError("this model takes no condition")
        return self.condition_provider(values).astype(self.dtype)

    def _check_condition(self, condition: mx.array | None) -> None:
        if self.config.is_conditioned and condition is None:
            raise ConditionError("this model needs a condition (Lm.condition) at every step")
        if not self.config.is_conditioned and condition is not None:
            raise ConditionError("this model takes no condition")

    def temporal(
        self, tokens: mx.array, caches: list[RotatingKVCache], ctx: StepContext, condition: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """One step of the temporal transformer.

        tokens: [B, 1 + audio_codebooks] int32 (text first), NO_TOKEN where a stream is empty.
        condition: [B or 1, 1, D] added to the input embedding (a conditioned model needs one).
        Returns (normalised hidden state [B, 1, D], text logits [B, text_out_vocab]).
        """
        return self.temporal_embedded(self.embed_step(tokens), caches, ctx, condition)

    def embed_step(self, tokens: mx.array) -> mx.array:
        """The temporal transformer's input for one step of tokens [B, 1 + audio_codebooks]: [B, 1, D]."""
        x = embed(self.text_emb, tokens[:, :1])
        for k, table in enumerate(self.audio_embs):
            x = x + embed(table, tokens[:, k + 1 : k + 2])
        return x

    def temporal_embedded(
        self, x: mx.array, caches: list[RotatingKVCache], ctx: StepContext, condition: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """`temporal` from an already embedded input [B, 1, D] (a voice preset replays stored ones)."""
        self._check_condition(condition)
        if condition is not None:
            x = x + condition.astype(x.dtype)
        hidden = self.out_norm(self.transformer(x, caches, ctx))
        return hidden, self.text_linear(hidden)[:, 0, :]

    def extra_head_probs(self, hidden: mx.array) -> list[mx.array]:
        """Each extra head's softmax over the temporal output `hidden` (as Kyutai's step_with_extra_heads)."""
        return [mx.softmax(head(hidden).astype(mx.float32), axis=-1) for head in self.extra_heads]

    def start_tokens(self) -> mx.array:
        """The learned start token of every stream: text `text_card`, audio `card` ([1 + audio_codebooks])."""
        cfg = self.config
        return mx.array([cfg.text_out_vocab_size] + [cfg.audio_card] * cfg.audio_codebooks, dtype=mx.int32)

    def forward(self, tokens: mx.array, condition: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """Score a whole delayed token sequence in one call (teacher forcing).

        tokens: [B, 1 + audio_codebooks, T] int32 in the delayed layout LmGen steps through: column t
        holds what step t sampled (text, Moshi's codebooks) and the user's codebooks at position t
        (frame t - delay). Position t is predicted from columns < t; the learned start tokens stand in
        wherever a stream has no frame yet (t - 1 < its delay), exactly as in streaming.
        Returns text logits [B, T, text_out_vocab] and audio logits [B, generated_codebooks, T, audio_card]
        (the depformer reads the given text and codebook tokens), equal to stepping LmGen on the same tokens.
        condition: [B or 1, 1, D] added at every position, as in `temporal`.
        """
        self._check_condition(condition)
        cfg = self.config
        batch, streams, steps = tokens.shape
        if streams != 1 + cfg.audio_codebooks:
            raise ValueError(f"expected {1 + cfg.audio_codebooks} streams (text + audio codebooks), got {streams}")
        delays = mx.array([0, *cfg.audio_delays])[None, :, None]
        previous = mx.concatenate([mx.zeros((batch, streams, 1), dtype=tokens.dtype), tokens[:, :, :-1]], axis=2)
        started = mx.arange(steps)[None, None, :] - 1 >= delays
        inputs = mx.where(started, previous, self.start_tokens()[None, :, None])
        x = self.text_emb(inputs[:, 0])
        for k, table in enumerate(self.audio_embs):
            x = x + table(inputs[:, k + 1])
        if condition is not None:
            x = x + condition.astype(x.dtype)
        t = cfg.transformer
        window = _WholeSequence(steps, t.context)
        ctx = StepContext(position=mx.array(0, dtype=mx.int32), slot=mx.array([0], dtype=mx.int32), mask=window.mask)
        hidden = self.out_norm(self.transformer(x, [window] * t.num_layers, ctx))
        text_logits = self.text_linear(hidden)
        audio_logits = self.depformer.score(hidden, tokens[:, : cfg.generated_codebooks])
        return text_logits, audio_logits
