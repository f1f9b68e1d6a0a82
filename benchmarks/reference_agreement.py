#!/usr/bin/env python3
"""How closely we follow Kyutai's moshi-mlx 0.3.0 on quantized weights (q8, q4).

The f32 case is asserted in tests/test_reference_parity.py. Quantized arithmetic (bf16 activations,
bf16 scales) differs between MLX versions, so here it is only measured:

    python benchmarks/reference_agreement.py --ref-python /path/to/refvenv/bin/python

For each of q8 and q4 the reference quantizes the fixture's random weights (as its app does: bf16, then
nn.quantize) and records greedy generation; we load the quantized file with our loader and report
(a) free-running greedy agreement: steps whose 9 tokens all match, and the first step that differs;
(b) teacher-forced logits on the reference's own tokens: max |difference| of text and audio logits,
and how often the argmax agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moshi_mlx.generate import LmGen  # noqa: E402
from moshi_mlx.model_files.checkpoint import load_lm  # noqa: E402
from moshi_mlx.settings import GREEDY  # noqa: E402
from tests.helpers.reference import fixture_config  # noqa: E402

DTYPES = {"bf16": mx.bfloat16, "f32": mx.float32}


def measure(folder: Path, compute: str) -> dict:
    record = dict(np.load(folder / "reference_lm.npz"))
    meta = json.loads(str(record.pop("meta")))
    cfg = fixture_config(meta["sizes"], meta["audio_delays"])
    model = load_lm(folder / "reference_lm.safetensors", cfg, dtype=DTYPES[compute])
    gen = LmGen(model, GREEDY, GREEDY)
    same, first_diff = 0, None
    for step, user in enumerate(record["user_codes"]):
        pending = gen.submit(user)
        if np.array_equal(pending.raw_tokens, record["tokens"][step]):
            same += 1
        elif first_diff is None:
            first_diff = step
        pending.result()
    steps = meta["steps"]
    user = np.zeros((cfg.user_codebooks, steps), np.int32)
    for k, delay in enumerate(cfg.audio_delays[cfg.generated_codebooks :]):
        user[k, delay:] = record["user_codes"][: steps - delay, k]
    tokens = np.concatenate([record["tokens"].T, user], axis=0)[None]
    text, audio = model.forward(mx.array(tokens))
    text = np.array(text[0].astype(mx.float32))
    audio = np.array(audio[0].astype(mx.float32)).transpose(1, 0, 2)
    return {
        "dtype": meta["dtype"], "our_compute": compute, "steps": steps,
        "greedy_steps_identical": same, "first_divergent_step": first_diff,
        "text_logits_max_abs_diff": float(np.abs(text - record["text_logits"]).max()),
        "audio_logits_max_abs_diff": float(np.abs(audio - record["audio_logits"]).max()),
        "text_argmax_agreement": float((text.argmax(-1) == record["text_logits"].argmax(-1)).mean()),
        "audio_argmax_agreement": float((audio.argmax(-1) == record["audio_logits"].argmax(-1)).mean()),
    }


def ref_python(text: str) -> str:
    """The reference interpreter as the caller meant it: a path from the caller's folder (the runs happen in a
    temporary one), or a command name looked up on PATH."""
    if os.sep in text or (os.altsep and os.altsep in text):
        path = Path(text).expanduser().absolute()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: no such file ({path})")
        return str(path)
    found = shutil.which(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text}: not found on PATH")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref-python", required=True, type=ref_python, help="python of a venv with moshi-mlx 0.3.0")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("q8", "q4"):
            out = Path(tmp) / dtype
            script = REPO / "tests" / "fixtures" / "make_reference_fixture.py"
            run = subprocess.run([args.ref_python, str(script), "--dtype", dtype, "--out", str(out)], cwd=tmp, check=False)
            if run.returncode:
                raise SystemExit(f"error: the reference run ({args.ref_python}) failed with exit status {run.returncode}")
            for compute in ("bf16", "f32"):
                rows.append(measure(out, compute))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
