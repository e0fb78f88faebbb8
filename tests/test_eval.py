"""`edgemoe eval` perplexity on the trained fixture against transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np


def transformers_perplexity(path, text_path, window=256):
    """The same windows as edgemoe.runtime.perplexity, computed by transformers."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    ids = (
        Tokenizer.from_file(str(path / "tokenizer.json"))
        .encode(text_path.read_text(encoding="utf-8"), add_special_tokens=False)
        .ids
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=chunk).logits[0].double(), -1)
        total -= logp[:-1].gather(1, chunk[0, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
    return math.exp(total / count), count


def test_eval_matches_transformers_perplexity(fixture_dir, tmp_path):
    text = fixture_dir / "heldout.txt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemoe",
            "eval",
            str(fixture_dir),
            "--text",
            str(text),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # off the repo root, where `edgemoe` is the bare folder
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ref_ppl, ref_tokens = transformers_perplexity(fixture_dir, text)
    assert got["tokens"] == ref_tokens == 7076
    assert abs(got["perplexity"] / ref_ppl - 1) < 0.005
    # The fixture's README publishes 21.93 for this method.
    assert np.isclose(got["perplexity"], 21.93, atol=0.01)
