"""Quality of the nested levels against float and the usual baselines.

    python benchmarks/bench_quality.py [--model ../shared/fixtures/code-mixtral]

Converts the model (default levels 2,4,8), then scores each model over two
texts in 256-token windows (as ``edgemoe eval``): the model's held-out text,
and the standard library's test suites (the fixture was trained on the
standard library without them; ``--no-stdlib-tests`` leaves them out). Rows:
the float model; each nested level; independent round-to-nearest per group
of 64 at 8/4/2 bits; and the top 2 bits sliced from a per-group int8 grid.
Per text, the perplexity change from float and the mean KL divergence from
float's next-token distribution (llama.cpp's ``--kl-divergence``), each with
its standard error over windows (each window's difference from float is one
paired sample: a row is scored on float's own tokens, so the noise of the
text itself cancels). Every number is computed by the EdgeMoE runtime; only
the expert weights differ. Writes benchmarks/out/quality.json and prints a
markdown table.
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
WINDOW = 256
STDLIB_TEST_CHARS = 250_000
"""About 100k tokens of the fixture's tokenizer: standard errors a quarter of
the held-out text's, in about a minute more."""


def stdlib_tests() -> tuple[str, list[str]] | None:
    """The first test files of this Python's standard library (``test_a*``
    onwards, whole files) up to ``STDLIB_TEST_CHARS``, and their names; None
    where the install leaves the test suites out (as some distributions do)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(root.glob("test_*.py"))
    if not files:
        return None
    parts, names, n = [], [], 0
    for f in files:
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        names.append(f.name)
        n += len(parts[-1])
        if n >= STDLIB_TEST_CHARS:
            break
    return "\n".join(parts), names


def paired(values: list, counts: list) -> tuple[float, float]:
    """Token mean of per-window sums ``values`` over ``counts`` tokens, and
    its standard error with windows as the samples."""
    import numpy as np

    v, n = np.asarray(values, np.float64), np.asarray(counts, np.float64)
    mean = v.sum() / n.sum()
    if len(v) < 2:
        return mean, math.nan
    resid = v - n * mean
    return mean, math.sqrt((resid**2).sum() * len(v) / (len(v) - 1)) / n.sum()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--text", default=None, help="default: MODEL/heldout.txt")
    ap.add_argument("--no-stdlib-tests", action="store_true")
    ap.add_argument("--levels", default="2,4,8")
    args = ap.parse_args()

    import numpy as np

    import edgemoe
    from edgemoe.checkpoint import open_checkpoint, tokenizer_for
    from edgemoe.converters.convert import ConvertOptions, convert
    from edgemoe.quant.baselines import ExpertsTransformed, rtn_minmax, sliced_int8
    from edgemoe.quant.types import NestedQuant
    from edgemoe.runtime.model import LoadOptions, Model
    from edgemoe.runtime.perplexity import log_softmax, windows

    src = Path(args.model)
    texts = {"held-out": Path(args.text or src / "heldout.txt").read_text("utf-8")}
    files: list[str] = []
    found = None if args.no_stdlib_tests else stdlib_tests()
    if found is not None:
        texts["stdlib tests"], files = found
    elif not args.no_stdlib_tests:
        print("this Python has no standard-library test suites: held-out text only")
    dst = OUT / "quality" / "edge"
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    plan = NestedQuant.parse(args.levels)
    # A float32 backbone: only the experts differ from the float model.
    report = convert(src, dst, ConvertOptions(levels=plan, backbone_type="F32"))

    reference: dict = {}  # (text, window) -> float's log-probabilities, its NLL
    float_nll: dict = {}  # text -> float's mean NLL per scored token

    def score(model) -> dict:
        """Per text, per window: the NLL sum's and the KL divergence sum's
        difference from float, and the tokens scored (each but a window's
        first). One pass over the windows gives both."""
        out = {}
        with model as m:
            for name, text in texts.items():
                tokens = m.tokenize(text, add_special=False)
                nlls, dnll, kl, counts = [], [], [], []
                for i, chunk in enumerate(windows(tokens, WINDOW)):
                    lp = log_softmax(m.logits(chunk)[:-1])  # [T, V]
                    nll = -lp[np.arange(len(chunk) - 1), chunk[1:]].sum()
                    nlls.append(nll)
                    if (name, i) not in reference:  # the float model, first
                        reference[name, i] = (lp.astype(np.float32), nll)
                    ref, ref_nll = reference[name, i]
                    ref = ref.astype(np.float64)
                    dnll.append(nll - ref_nll)
                    kl.append((np.exp(ref) * (ref - lp)).sum())
                    counts.append(len(chunk) - 1)
                out[name] = (dnll, kl, counts)
                # The float model is scored first: its NLL is the base.
                float_nll.setdefault(name, sum(nlls) / sum(counts))
        return out

    def transformed(fn):
        ckpt = ExpertsTransformed(open_checkpoint(src), fn)
        return Model(ckpt, tokenizer_for(ckpt), LoadOptions())

    rows = [("float (transformers-exact)", None, score(edgemoe.load(src)))]
    n_w = 3 * report.manifest.spec.expert_ffn * report.manifest.spec.n_embd
    n_w *= report.manifest.spec.n_expert * len(report.manifest.moe_layers)
    for lv in reversed(plan.levels):
        bpw = 8 * report.level_bytes[lv] / n_w
        model = edgemoe.load(dst, force_level=lv)
        rows.append((f"EdgeMoE nested level {lv}", bpw, score(model)))
    for bits in (8, 4, 2):
        bpw = bits + 32 / 64  # fp16 scale and min per 64
        model = transformed(lambda w, b=bits: rtn_minmax(w, b))
        rows.append((f"round-to-nearest {bits}-bit, g64", bpw, score(model)))
    model = transformed(lambda w: sliced_int8(w, 2))
    rows.append(("top 2 bits of int8 grid, g64", 2 + 32 / 64, score(model)))

    records = []
    for name, bpw, scored in rows:
        rec = {"name": name, "bpw": bpw}
        for t, (dnll, kl, counts) in scored.items():
            d, d_se = paired(dnll, counts)
            k, k_se = paired(kl, counts)
            rec[t] = {
                "tokens": int(sum(counts)),
                "perplexity": math.exp(float_nll[t] + d),
                "change": math.expm1(d),
                "change_se": math.exp(d) * d_se,  # delta method
                "kl_divergence": k,
                "kl_se": k_se,
            }
        records.append(rec)

    head = "| experts | bits/weight |"
    rule = "|---|---|"
    for t in texts:
        tokens = records[0][t]["tokens"]
        head += f" {t} ({tokens:,} tokens): perplexity | vs float | KL divergence |"
        rule += "---|---|---|"
    lines = [head, rule]
    for rec in records:
        bpw = rec["bpw"]
        line = f"| {rec['name']} | {'16 (bf16)' if bpw is None else f'{bpw:.2f}'} |"
        for t in texts:
            r = rec[t]
            se = "" if bpw is None else f" ± {100 * r['change_se']:.2f}"
            kse = "" if bpw is None else f" ± {r['kl_se']:.5f}"
            line += (
                f" {r['perplexity']:.3f} | {100 * r['change']:+.2f}%{se} |"
                f" {r['kl_divergence']:.5f}{kse} |"
            )
        lines.append(line)
    print("\n".join(lines))
    (OUT / "quality.json").write_text(
        json.dumps(
            {
                "model": str(src),
                "levels": list(plan.levels),
                "python": sys.version.split()[0],
                "stdlib_test_files": files,
                "rows": records,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
