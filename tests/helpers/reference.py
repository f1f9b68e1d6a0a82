"""The committed reference fixture's model shape (tests/fixtures/), shared by the parity test and
benchmarks/reference_agreement.py."""

from __future__ import annotations

from moshi_mlx.models.config import LmConfig, TransformerConfig


def fixture_config(sizes: dict, delays: list[int]) -> LmConfig:
    return LmConfig(
        transformer=TransformerConfig(
            d_model=sizes["d_model"], num_heads=sizes["num_heads"], num_layers=sizes["num_layers"],
            dim_feedforward=sizes["dim_feedforward"], context=3000,
        ),
        depformer=TransformerConfig(
            d_model=sizes["dep_d_model"], num_heads=sizes["dep_num_heads"], num_layers=sizes["dep_num_layers"],
            dim_feedforward=sizes["dep_dim_feedforward"], context=8, positional_embedding="none",
        ),
        text_in_vocab_size=sizes["text_card"] + 1,
        text_out_vocab_size=sizes["text_card"],
        audio_vocab_size=sizes["card"] + 1,
        audio_delays=tuple(delays),
    )
