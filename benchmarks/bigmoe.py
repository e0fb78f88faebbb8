"""BigMoeOnEdge (github.com/Helldez/BigMoeOnEdge), a llama.cpp-based expert
streamer, as an engine of bench_pressure.py.

It runs llama.cpp's own graph and, through llama.cpp's public eval callback
at the router's top-k node, reads exactly the routed experts from storage
(O_DIRECT, parallel lanes) into an LRU expert cache of ``--cache-mb``. Its
CLI decodes greedily from a text prompt. bench_pressure.py teacher-forces
every engine from one token stream, so that all route the same tokens (a
greedy run routes whatever each engine's quantization makes it generate;
on random weights how repetitive that is, and so the cache's hit rate,
changes from prompt to prompt). FORCING patches that in: with
``BMOE_FORCED_TOKENS`` naming a JSON list of ids, the first
``BMOE_FORCED_PROMPT`` are the prompt and the rest are fed, one per decode,
in place of its argmax. Nothing else it does changes.

Build it once against the llama.cpp that llama-cpp-python pins (the one our
llama.cpp rows run), with OLMoE added to its architecture registry: one row,
as its docs/adding-a-model.md describes for models built by llama.cpp's
``build_moe_ffn``:

    python benchmarks/bigmoe.py build BIGMOE_SRC LLAMA_CPP_SRC

BIGMOE_SRC is a checkout of BigMoeOnEdge (without its submodule),
LLAMA_CPP_SRC llama-cpp-python's ``vendor/llama.cpp`` (its sdist has it). The
binary is BIGMOE_SRC/build/cli/bmoe-cli. Its multi-token-prediction drafting
calls llama.cpp's ``common`` speculative API, which changed after the
llama.cpp it pins (a ``common_batch`` in place of a ``llama_batch``, no
``n_past``): those three calls are compiled out (SHIMS). The benchmark does not
draft (no ``--mtp``), so what it runs is unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

MIB = 1 << 20
# What the process holds besides the expert cache and the dense weights: its
# compute buffers (a context of ~100 tokens), KV cache, I/O buffers and code.
# At the 50% limit of the routed model (1,063 MiB; `bench_pressure.py
# --limits 0.5 --runs 1 --engines bigmoe:q4km` with each value) 192 MiB was
# OOM-killed and 224-384 ran, the larger the cache the faster (9.6-13.1 t/s
# at 224-256, 7.8 at 384); below its own floor (1,500 MiB) the cache needs
# --force-cache.
RESERVE = 256 * MIB
CACHE_FLOOR_MIB = 1500
ROW = '    {"olmoe", {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}},\n'
ANCHOR = '    {"qwen2moe", {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}},\n'
SHIMS = {  # in core/src/engine/session.cpp, only on the --mtp path
    "common_speculative_process(im.mtp.get(), im.mtp_batch)": "false",
    "common_speculative_process(im.mtp.get(), pf)": "false",
    "dp.n_past = n_past;": "(void) n_past;",
}


FORCING_HELPERS = r"""
// EdgeMoE's bench_pressure.py (benchmarks/bigmoe.py): teacher forcing.
static std::vector<int> bench_forced_ids() {
    std::vector<int> ids;
    const char * path = std::getenv("BMOE_FORCED_TOKENS");
    if (!path) return ids;
    std::ifstream in(path);
    std::string text((std::istreambuf_iterator<char>(in)),
                     std::istreambuf_iterator<char>());
    for (char & c : text) if (c == '[' || c == ']' || c == ',') c = ' ';
    std::istringstream ss(text);
    int v;
    while (ss >> v) ids.push_back(v);
    return ids;
}
static size_t bench_forced_prompt() {
    const char * n = std::getenv("BMOE_FORCED_PROMPT");
    return n ? (size_t) std::atoi(n) : 0;
}
static llama_token bench_next(llama_token argmax_tok) {
    static const std::vector<int> ids = bench_forced_ids();
    static size_t next = bench_forced_prompt();
    if (ids.empty() || next >= ids.size()) return argmax_tok;
    return (llama_token) ids[next++];
}
"""
FORCING_PROMPT = """
    if (std::getenv("BMOE_FORCED_TOKENS")) {  // EdgeMoE bench: the stream's prompt
        const std::vector<int> ids = bench_forced_ids();
        const size_t n = std::min(bench_forced_prompt(), ids.size());
        tokens.assign(ids.begin(), ids.begin() + n);
        n_prompt = (int) tokens.size();
    }
"""
FORCING = {  # in core/src/engine/session.cpp
    "namespace bmoe {": (
        "#include <cstdlib>\n#include <fstream>\n#include <sstream>\n"
        + FORCING_HELPERS
        + "\nnamespace bmoe {"
    ),
    "    tokens.resize(n_prompt);\n": "    tokens.resize(n_prompt);\n" + FORCING_PROMPT,
    "argmax(logits, im.n_vocab)": "bench_next(argmax(logits, im.n_vocab))",
}


def _patch(path: Path, edits: dict, first_only: tuple = ()) -> None:
    text = path.read_text()
    if "bench_next" in text:
        return  # patched by an earlier build
    for old, new in edits.items():
        if old not in text:
            sys.exit(f"error: {path}: {old!r} not found; this version is not known")
        text = text.replace(old, new, 1 if old in first_only else -1)
    path.write_text(text)


def build(src: Path, llama_cpp: Path) -> Path:
    registry = src / "core" / "src" / "moe" / "arch_registry.cpp"
    text = registry.read_text()
    if ROW not in text:
        if ANCHOR not in text:
            sys.exit(f"error: {registry}: no qwen2moe row to add olmoe after")
        registry.write_text(text.replace(ANCHOR, ANCHOR + ROW, 1))
    session = src / "core" / "src" / "engine" / "session.cpp"
    _patch(session, SHIMS | FORCING, first_only=("namespace bmoe {",))
    link = src / "third_party" / "llama.cpp"
    if link.is_dir() and not link.is_symlink() and not any(link.iterdir()):
        link.rmdir()  # the empty submodule directory of a plain checkout
    if not link.exists():
        link.symlink_to(llama_cpp.resolve())
    build_dir = src / "build"
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(build_dir),
         "-DCMAKE_BUILD_TYPE=Release", "-DBMOE_BUILD_TESTS=OFF"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build_dir), "-j", "2", "--target", "bmoe-cli"],
        check=True,
    )
    return build_dir / "cli" / "bmoe-cli"


def expert_bytes(gguf: Path) -> tuple[int, int]:
    """Bytes of the routed experts' tensors (what it streams), and of the
    experts one token routes to across the layers (its cache's cycle)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def meta(key: str) -> int:
        return int(reader.fields[f"{arch}.{key}"].parts[-1][0])

    total = sum(int(t.n_bytes) for t in reader.tensors if "_exps." in t.name)
    return total, total * meta("expert_used_count") // meta("expert_count")


def command(binary: Path, gguf: Path, limit: int, tokens: Path, prompt: int,
            gen: int, threads: int) -> tuple[list[str], dict]:  # fmt: skip
    """Its CLI and environment: the first ``prompt`` ids of the JSON list
    ``tokens`` prefilled, the next ``gen`` decoded; an expert cache of what
    the limit leaves after the dense weights (which it holds in anonymous
    memory, its default) and RESERVE, capped at every expert. A cache that
    cannot hold one token's experts is off (0): below that cycle its LRU
    evicts what the next layer needs, and its docs/cache-sizing.md says 0
    is then strictly better."""
    experts, cycle = expert_bytes(gguf)
    dense = gguf.stat().st_size - experts
    cache = max(0, min(experts, limit - dense - RESERVE))
    cache = cache // MIB if cache >= cycle else 0
    cmd = [
        str(binary), "-m", str(gguf), "--moe-stream", "--cache-mb", str(cache),
        "-t", str(threads), "-c", str(prompt + gen + 8), "-n", str(gen),
        "-p", "(the forced prompt)",
    ]  # fmt: skip
    if 0 < cache < CACHE_FLOOR_MIB:
        cmd.append("--force-cache")
    env = dict(
        os.environ, BMOE_FORCED_TOKENS=str(tokens), BMOE_FORCED_PROMPT=str(prompt)
    )
    return cmd, env


def parse(stdout: str) -> dict:
    """The numbers its CLI prints after a run."""
    gen = re.search(r"generation: (\d+) tokens, .*\(([\d.]+) tok/s\)", stdout)
    pre = re.search(r"prefill: \d+ tokens, ([\d.]+) s .*model load ([\d.]+) s", stdout)
    read = re.search(r"moe-stream: read ([\d.]+) MiB", stdout)
    hit = re.search(r"moe-cache: ([\d.]+)% hit", stdout)
    if not (gen and pre):
        raise ValueError("no generation/prefill summary in its output")
    return {
        "generated": int(gen.group(1)),
        "decode_tps": float(gen.group(2)),
        "ttft_s": float(pre.group(1)),
        "load_s": float(pre.group(2)),
        "expert_bytes_read": int(float(read.group(1)) * MIB) if read else None,
        "cache_hit_pct": float(hit.group(1)) if hit else None,
    }


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "build":
        sys.exit(__doc__)
    print(build(Path(sys.argv[2]), Path(sys.argv[3])))
