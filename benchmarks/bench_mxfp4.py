"""Nested planes from MXFP4 experts: the perplexity change against running
MXFP4 as stored.

    python benchmarks/bench_mxfp4.py [--model ../shared/fixtures/code-mixtral]

gpt-oss ships its experts in MXFP4, and no trained gpt-oss fits this machine,
so the trained fixture stands in: its experts are quantized to MXFP4 (32
weights per block along each row, as gpt-oss's are) and written as a GGUF
with a float32 backbone. Perplexity over the held-out text (256-token
windows, as ``edgemoe eval``; every number from the EdgeMoE runtime) of: the
float model; that GGUF with its experts run as stored (ggml's MXFP4 kernels,
which pair them with Q8_0 activations); the same GGUF converted into nested
planes (fitted to the dequantized MXFP4 weights, float32 backbone) at each
level. Writes benchmarks/out/mxfp4.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "code-mixtral"


class MXFP4Experts:
    """A checkpoint whose routed-expert matrices load as ggml MXFP4 rows
    (quantized from their float values), and are written as such."""

    def __init__(self, ckpt):
        self._ckpt = ckpt

    def __getattr__(self, name):
        return getattr(self._ckpt, name)

    def stored_type(self, name: str) -> int | None:
        from edgemoe.checkpoint.base import GGML_MXFP4, is_expert_matrix

        return GGML_MXFP4 if is_expert_matrix(name) else None

    def load(self, name: str):
        from edgemoe.checkpoint.base import GGML_MXFP4, Weight, is_expert_matrix
        from edgemoe.quant import mxfp4

        w = self._ckpt.load(name)
        if not is_expert_matrix(name):
            return w
        x = w.to_float32()  # [E, N, K]
        data = mxfp4.ggml_from_hf(*mxfp4.quantize_hf(x))  # [E, N, K / 32 * 17]
        return Weight(name, GGML_MXFP4, w.shape, np.ascontiguousarray(data))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--text", default=None, help="default: MODEL/heldout.txt")
    ap.add_argument("--levels", default="2,4,8")
    args = ap.parse_args()

    import edgemoe
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.converters.llama_gguf import write_gguf
    from edgemoe.quant.types import NestedQuant
    from edgemoe.runtime.perplexity import perplexity

    src = Path(args.model)
    text = Path(args.text or src / "heldout.txt").read_text(encoding="utf-8")
    work = OUT / "mxfp4"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = open_checkpoint(src)
    try:
        gguf = write_gguf(MXFP4Experts(ckpt), work / "mxfp4.gguf", "F32")
    finally:
        ckpt.close()
    plan = NestedQuant.parse(args.levels)
    report = convert(
        gguf, work / "edge", ConvertOptions(levels=plan, backbone_type="F32")
    )

    def ppl(path, **load) -> float:
        with edgemoe.load(path, **load) as m:
            return perplexity(m, m.tokenize(text, add_special=False), 256).perplexity

    spec = report.manifest.spec
    n_w = 3 * spec.expert_ffn * spec.n_embd * spec.n_expert
    n_w *= len(report.manifest.moe_layers)
    rows = [
        ("float (transformers-exact)", 16.0, ppl(src)),
        ("MXFP4, run as stored", 4.25, ppl(gguf)),
    ]
    for lv in reversed(plan.levels):
        bits = report.level_bytes[lv] * 8 / n_w
        rows.append(
            (f"nested level {lv} from MXFP4", bits, ppl(report.out, force_level=lv))
        )
    mx = rows[1][2]
    print("| experts | bits/weight | perplexity | vs MXFP4 | vs float |")
    print("|---|---|---|---|---|")
    for name, bits, p in rows:
        print(
            f"| {name} | {bits:.2f} | {p:.3f} | {100 * (p / mx - 1):+.2f}% "
            f"| {100 * (p / rows[0][2] - 1):+.2f}% |"
        )
    out = OUT / "mxfp4.json"
    out.write_text(
        json.dumps(
            {
                "model": str(src),
                "rows": [
                    {"experts": n, "bits_per_weight": b, "perplexity": p}
                    for n, b, p in rows
                ],
            },
            indent=2,
        )
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
