"""The models bench_pressure.py runs, made where missing, and their token
streams: the routed benchmark model (the OLMoE-1B-7B shape with 8 layers and
designed routing, converters/synth_routing.py) or the trained fixture; each
as EdgeMoE's conversion, llama.cpp's own Q4_K_M and EdgeMoE's level-4 GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
FIXTURE = HERE.parent.parent / "shared" / "fixtures" / "code-mixtral"
LAYERS = 8


def _edgemoe(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgemoe", *args]
    print("$ edgemoe " + " ".join(args), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=OUT, stdout=subprocess.DEVNULL)


def _q4km(src_hf: Path, dst: Path) -> None:
    """llama.cpp's own Q4_K_M: our F16 export of the source, quantized by
    llama.cpp (in a child: it holds the whole model)."""
    f16 = dst.with_suffix(".f16.gguf")
    _edgemoe("export-gguf", str(src_hf), "-o", str(f16), "--type", "F16", "--force")
    code = (
        "import llama_cpp as L, sys\n"
        "p = L.llama_model_quantize_default_params()\n"
        "p.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_K_M\n"
        "src, dst = (a.encode() for a in sys.argv[1:])\n"
        "sys.exit(L.llama_model_quantize(src, dst, p))"
    )
    subprocess.run([sys.executable, "-c", code, str(f16), str(dst)], check=True)
    f16.unlink()


def prepare(name: str) -> dict:
    """Paths of the model's files, made where missing."""
    from edgemoe.converters import synth
    from edgemoe.converters.synth_routing import TopicRouting

    work = OUT / "pressure" / name
    work.mkdir(parents=True, exist_ok=True)
    if name == "fixture":
        hf = FIXTURE
    else:
        hf = work / "hf"
        if not (hf / "config.json").exists():
            print(f"synthesising {hf} ...", file=sys.stderr)
            cfg = synth.preset_config(
                "olmoe-1b-7b", layers=LAYERS, routing=TopicRouting()
            )
            synth.write_hf(cfg, hf, force=True)
    paths = {
        "hf": hf,
        "edge": work / "edge",
        "l4": work / "level4-Q4_K.gguf",
        "q4km": work / "Q4_K_M.gguf",
    }
    if not (paths["edge"] / "manifest.json").exists():
        _edgemoe("convert", str(hf), "-o", str(paths["edge"]), "--force")
    if not paths["l4"].exists():
        _edgemoe(
            "export-gguf", str(paths["edge"]), "-o", str(paths["l4"]),
            "--level", "4", "--type", "Q4_K",
        )  # fmt: skip
    if not paths["q4km"].exists():
        _q4km(hf, paths["q4km"])
    return paths


def token_stream(name: str, paths: dict, n: int) -> list[int]:
    if name == "fixture":
        from edgemoe.checkpoint import open_checkpoint, tokenizer_for

        ckpt = open_checkpoint(paths["edge"])
        try:
            text = (FIXTURE / "heldout.txt").read_text()
            ids = tokenizer_for(ckpt).encode(text, False)
        finally:
            ckpt.close()
        return (ids * (n // len(ids) + 1))[:n]
    from edgemoe.converters.synth_routing import TopicRouting

    cfg = json.loads((paths["hf"] / "config.json").read_text())
    routing = TopicRouting.from_dict(cfg["edgemoe_routing"])
    return routing.stream(n, cfg["vocab_size"])


def model_files(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else [path]


def drop_cache(paths: list[Path]) -> None:
    from edgemoe.runtime.io_queue import drop_cached

    for p in paths:
        for f in model_files(p):
            drop_cached(f)
