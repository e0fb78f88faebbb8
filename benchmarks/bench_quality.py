"""Quality of the nested levels against float and the usual baselines.

    python benchmarks/bench_quality.py [--model ../shared/fixtures/code-mixtral]

Converts the model (default levels 2,4,8), then reports perplexity over its
held-out text (256-token windows, as ``edgemoe eval``) for: the float model;
each nested level; independent round-to-nearest per group of 64 at 8/4/2
bits; and the top 2 bits sliced from a per-group int8 grid. Every number is
computed by the EdgeMoE runtime; only the expert weights differ. Writes
benchmarks/out/quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "code-mixtral"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--text", default=None, help="default: MODEL/heldout.txt")
    ap.add_argument("--levels", default="2,4,8")
    args = ap.parse_args()

    import numpy as np

    import edgemoe
    from edgemoe.checkpoint import open_checkpoint, tokenizer_for
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.quant.baselines import ExpertsTransformed, rtn_minmax, sliced_int8
    from edgemoe.quant.types import NestedQuant
    from edgemoe.runtime.model import LoadOptions, Model

    src = Path(args.model)
    text = Path(args.text or src / "heldout.txt").read_text(encoding="utf-8")
    dst = OUT / "quality" / "edge"
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    plan = NestedQuant.parse(args.levels)
    # A float32 backbone: only the experts differ from the float model.
    report = convert(src, dst, ConvertOptions(levels=plan, backbone_type="F32"))

    reference = []  # the float model's log-probabilities per window

    def ppl(model) -> tuple[float, float]:
        """Perplexity, as ``edgemoe eval`` computes it (256-token windows,
        each scored but its first token), and the mean KL divergence from the
        float model over the same tokens: llama.cpp's --kl-divergence, far
        less noisy than a perplexity difference between two nearby
        quantizations. One pass over the windows gives both."""
        with model as m:
            tokens = m.tokenize(text, add_special=False)
            nll, kl = [], []
            for i, start in enumerate(range(0, len(tokens) - 1, 256)):
                chunk = np.asarray(tokens[start : start + 256])
                lp = m.logits(chunk)[:-1].astype(np.float64)  # [T, V] log-softmax
                lp -= lp.max(axis=-1, keepdims=True)
                lp -= np.log(np.exp(lp).sum(axis=-1, keepdims=True))
                nll.append(-lp[np.arange(len(chunk) - 1), chunk[1:]])
                if len(reference) <= i:
                    reference.append(lp.astype(np.float32))
                ref = reference[i].astype(np.float64)
                kl.append((np.exp(ref) * (ref - lp)).sum(axis=-1))
        return math.exp(np.concatenate(nll).mean()), float(np.concatenate(kl).mean())

    def transformed(fn):
        ckpt = ExpertsTransformed(open_checkpoint(src), fn)
        return Model(ckpt, tokenizer_for(ckpt), LoadOptions())

    rows = [("float (transformers-exact)", None, ppl(edgemoe.load(src)))]
    n_w = 3 * report.manifest.spec.expert_ffn * report.manifest.spec.n_embd
    n_w *= report.manifest.spec.n_expert * len(report.manifest.moe_layers)
    for lv in reversed(plan.levels):
        bpw = 8 * report.level_bytes[lv] / n_w
        rows.append(
            (f"EdgeMoE nested level {lv}", bpw, ppl(edgemoe.load(dst, force_level=lv)))
        )
    for bits in (8, 4, 2):
        bpw = bits + 32 / 64  # fp16 scale and min per 64
        rows.append(
            (
                f"round-to-nearest {bits}-bit, g64",
                bpw,
                ppl(transformed(lambda w, b=bits: rtn_minmax(w, b))),
            )
        )
    rows.append(
        (
            "top 2 bits of int8 grid, g64",
            2 + 32 / 64,
            ppl(transformed(lambda w: sliced_int8(w, 2))),
        )
    )
    base = rows[0][2][0]
    lines = [
        "| experts | bits/weight | perplexity | vs float | KL divergence |",
        "|---|---|---|---|---|",
    ]
    for name, bpw, (p, kl) in rows:
        b = "16 (bf16)" if bpw is None else f"{bpw:.2f}"
        lines.append(
            f"| {name} | {b} | {p:.3f} | {100 * (p / base - 1):+.2f}% | {kl:.5f} |"
        )
    print("\n".join(lines))
    (OUT / "quality.json").write_text(
        json.dumps(
            {
                "model": str(src),
                "levels": list(plan.levels),
                "rows": [
                    {"name": n, "bpw": b, "perplexity": p, "kl_divergence": kl}
                    for n, b, (p, kl) in rows
                ],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
