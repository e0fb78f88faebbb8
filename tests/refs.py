"""Float references for what ggml computes (imported by tests, not a test)."""

from __future__ import annotations

import math

import numpy as np


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX, where llama.cpp's extra buffer types (its
    defaults) crash on MoE GGUFs (shared/docs/engine.md §8)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " amx_tile" in line for line in fh)
    except OSError:
        return False


def q8(x: np.ndarray, block: int) -> np.ndarray:
    """ggml's activation quantization (Q8_K per 256 / Q8_0 per 32), dequantized."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], block):
            v = x[r, b : b + block]
            if block == 256:  # quantize_row_q8_K_ref: scale from the signed max
                m = v[np.argmax(np.abs(v))]
                iscale = np.float32(-127.0) / m
                q = np.minimum(np.trunc(iscale * v + np.copysign(0.5, iscale * v)), 127)
                out[r, b : b + block] = q * (np.float32(1.0) / iscale)
            else:  # quantize_row_q8_0_ref
                d = np.float32(np.abs(v).max() / 127.0)
                d16 = np.float32(np.float16(d))
                q = np.round(v / d) if d else np.zeros_like(v)
                out[r, b : b + block] = q * d16
    return out


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
