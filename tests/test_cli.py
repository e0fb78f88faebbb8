"""The ``edgemoe`` command end to end on the trained fixture and synthetic models.

Two checks run the command as a subprocess (what users type); the rest call
``edgemoe.cli.main`` in-process, which is what the console script runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgemoe.cli import main

PROMPT = "def main():"
STATS = re.compile(r"^\[ Prompt: \d+\.\d t/s \| Generation: \d+\.\d t/s \]$", re.M)
PEAK = re.compile(r"^peak memory: [\d,]+ MiB RSS$", re.M)


def run_main(capsys, *argv) -> tuple[str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out, err


@pytest.fixture(scope="module")
def heldout_head(fixture_dir, tmp_path_factory) -> Path:
    """The first ~3000 characters of the fixture's held-out text (a fast eval)."""
    text = (fixture_dir / "heldout.txt").read_text(encoding="utf-8")[:3000]
    path = tmp_path_factory.mktemp("text") / "head.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fixture_gguf(fixture_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "code-mixtral.Q8_0.gguf"
    assert main(["export-gguf", str(fixture_dir), "-o", str(out)]) == 0
    return out


# -- run ---------------------------------------------------------------------------
def test_run_greedy_subprocess(fixture_dir, tmp_path, capsys, cli):
    proc = cli("run", fixture_dir, "-p", PROMPT, "--temp", 0, "-n", 8)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # Prompt echoed, then 8 generated tokens of the trained code model.
    assert proc.stdout.startswith(PROMPT)
    completion = proc.stdout[len(PROMPT) :]
    assert len(completion.strip()) >= 8
    assert STATS.search(proc.stderr), proc.stderr
    assert PEAK.search(proc.stderr), proc.stderr
    assert "generated 8 in" in proc.stderr
    assert "finish: length" in proc.stderr
    # Greedy is deterministic: the in-process command prints the same text.
    out, err = run_main(capsys, "run", fixture_dir, "-p", PROMPT, "--temp", 0, "-n", 8)
    assert out == proc.stdout
    assert STATS.search(err) and PEAK.search(err)


def test_run_prompt_file_no_echo_and_stop(fixture_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPT, encoding="utf-8")
    full, _ = run_main(capsys, "run", fixture_dir, "-p", PROMPT, "--temp", 0, "-n", 8)
    greedy = ("--temp", 0, "-n", 8)
    out, _ = run_main(
        capsys, "run", fixture_dir, "-f", tmp_path / "p.txt", "--no-echo", *greedy
    )
    assert out == full[len(PROMPT) :]
    # A stop string cuts the completion before it and is not printed.
    stop = full[len(PROMPT) :].strip()[:3]
    out, err = run_main(
        capsys, "run", fixture_dir, "-p", PROMPT, "--temp", 0, "-n", 8, "--stop", stop
    )
    assert stop not in out[len(PROMPT) :]
    assert "finish: stop" in err


# -- eval --------------------------------------------------------------------------
def test_eval_json(fixture_dir, heldout_head, capsys):
    from tokenizers import Tokenizer

    out, _ = run_main(
        capsys, "eval", fixture_dir, "--text", heldout_head, "--window", 128, "--json"
    )
    res = json.loads(out)
    assert {"perplexity", "tokens", "nll", "windows", "window"} <= set(res)
    ids = (
        Tokenizer.from_file(str(fixture_dir / "tokenizer.json"))
        .encode(heldout_head.read_text(encoding="utf-8"), add_special_tokens=False)
        .ids
    )
    # Windows of 128 without overlap; each scores all but its first token.
    windows = -(-(len(ids) - 1) // 128)
    assert res["windows"] == windows
    assert res["tokens"] == len(ids) - windows
    assert res["window"] == 128
    # transformers on the same windows: a perplexity too low fails as well.
    from refs import transformers_perplexity

    ref, ref_tokens = transformers_perplexity(fixture_dir, heldout_head, window=128)
    assert res["tokens"] == ref_tokens
    assert abs(res["perplexity"] / ref - 1) < 0.005, (res, ref)


def test_eval_text_report(fixture_dir, heldout_head, capsys):
    out, _ = run_main(capsys, "eval", fixture_dir, "--text", heldout_head, "-c", 64)
    assert re.fullmatch(
        r"perplexity: \d+\.\d{4} over \d+ tokens \(\d+ windows of 64, [\d.]+ s\)\n", out
    ), out


# -- inspect -----------------------------------------------------------------------
def test_inspect_json(fixture_dir, capsys):
    out, _ = run_main(capsys, "inspect", fixture_dir, "--json")
    rep = json.loads(out)
    assert rep["architecture"] == "MixtralForCausalLM"
    assert rep["family"] == "mixtral"
    assert rep["format"] == "hf-safetensors"
    assert abs(rep["parameters"] - 15.5e6) <= 0.2e6
    s = rep["spec"]
    assert (s["n_layer"], s["n_expert"], s["n_expert_used"]) == (4, 8, 2)
    # Two of eight experts are active: active = dense part + experts / 4.
    dense = rep["parameters"] - rep["expert_parameters"]
    assert rep["active_parameters"] == dense + rep["expert_parameters"] // 4
    assert rep["weight_bytes"] == 2 * rep["parameters"]  # bf16
    # embeddings, final norm, output + per layer 2 norms, q/k/v/o, router and
    # the three stacked expert tensors.
    assert len(rep["tensors"]) == 3 + 4 * 10


def test_inspect_gguf(fixture_dir, fixture_gguf, capsys):
    out, _ = run_main(capsys, "inspect", fixture_gguf)
    assert f"model        {fixture_gguf} (gguf)" in out
    assert "architecture llama (family mixtral)" in out
    assert "parameters   15.5 M total" in out
    assert "experts      8 per layer, 2 active, FFN 512" in out
    gguf_rep = json.loads(run_main(capsys, "inspect", fixture_gguf, "--json")[0])
    hf_rep = json.loads(run_main(capsys, "inspect", fixture_dir, "--json")[0])
    assert gguf_rep["parameters"] == hf_rep["parameters"]
    assert gguf_rep["file_bytes"] == fixture_gguf.stat().st_size
    types = {t["name"]: t["type"] for t in gguf_rep["tensors"]}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # routers stay F32
    out, _ = run_main(capsys, "inspect", fixture_gguf, "--tensors")
    assert re.search(
        r"^  blk\.3\.ffn_down_exps\.weight +Q8_0 +\[8, 256, 512\]", out, re.M
    )


# -- export-gguf -------------------------------------------------------------------
def test_export_gguf(fixture_dir, fixture_gguf, heldout_head, tmp_path, capsys):
    assert fixture_gguf.read_bytes()[:4] == b"GGUF"
    # Q8_0 at ~8.5 bits per weight: about half the bf16 checkpoint.
    size = fixture_gguf.stat().st_size
    assert 15.5e6 * 1.0 < size < 15.5e6 * 1.2
    # The export scores the text as the checkpoint does (same tokens through
    # llama.cpp's tokenizer, Q8_0 within a percent).
    args = ("--text", heldout_head, "--window", 128, "--json")
    hf = json.loads(run_main(capsys, "eval", fixture_dir, *args)[0])
    gg = json.loads(run_main(capsys, "eval", fixture_gguf, *args)[0])
    assert gg["tokens"] == hf["tokens"]
    assert abs(gg["perplexity"] / hf["perplexity"] - 1) < 0.01
    # Prints where it wrote; --force replaces an existing file.
    out = tmp_path / "again.gguf"
    out.write_bytes(b"old")
    stdout, _ = run_main(
        capsys, "export-gguf", fixture_dir, "-o", out, "--type", "Q4_0", "--force"
    )
    assert stdout.startswith(f"wrote {out} (")
    assert out.read_bytes()[:4] == b"GGUF"
    assert out.stat().st_size < size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.gguf"]


# -- demo, synth ---------------------------------------------------------------------
def test_demo(capsys):
    out, err = run_main(capsys, "demo", "-n", 8)
    assert "RANDOM WEIGHTS" in err
    assert "generated 8 in" in err
    # The same resident budgets convert, inspect and profile print.
    assert re.search(r"--- level 8: experts [\d.]+ MiB, all resident from \d+ MiB", err)
    assert STATS.search(err)
    assert out.startswith("def main():")


def test_synth_then_run_subprocess(tmp_path, cli):
    model = tmp_path / "synth-demo"
    proc = cli("synth", "--preset", "demo", "--layers", 2, "-o", model)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {model}: ")
    assert "RANDOM WEIGHTS" in proc.stdout
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    assert "RANDOM WEIGHTS" in cfg["edgemoe_synthetic"]
    proc = cli("run", model, "-p", "hello", "-n", 6, "--temp", 0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hello")
    assert "generated 6 in" in proc.stderr or "finish: stop" in proc.stderr
    assert STATS.search(proc.stderr) and PEAK.search(proc.stderr)


def test_synth_gguf_then_inspect(tmp_path, capsys):
    out = tmp_path / "demo.gguf"
    stdout, _ = run_main(
        capsys, "synth", "--preset", "demo", "--layers", 1, "--gguf", "Q8_0", "-o", out
    )
    assert stdout.startswith(f"wrote {out}: ")
    rep = json.loads(run_main(capsys, "inspect", out, "--json")[0])
    assert rep["format"] == "gguf"
    assert rep["spec"]["n_layer"] == 1
    assert rep["spec"]["n_expert"] == 8


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K", "Q6_K", "Q4_0"])
def test_synth_gguf_of_each_quant_type_runs_as_in_llamacpp(tmp_path, capsys, qtype):
    """K-quant synth GGUFs are quantized by edgemoe.quant (gguf-py has no
    K-quant encoder): llama.cpp loads them and computes the logits EdgeMoE does."""
    import numpy as np

    import edgemoe
    from edgemoe.runtime.llamacpp import LlamaCpp

    out = tmp_path / f"demo-{qtype}.gguf"
    run_main(
        capsys, "synth", "--preset", "demo", "--layers", 1, "--gguf", qtype, "-o", out
    )
    prompt = list(range(10, 30))
    with LlamaCpp(out, n_ctx=64, f32_cache=True) as ref:
        want = ref.eval(prompt)
    with edgemoe.load(out, n_ctx=64) as model:
        got = model.eval(prompt)
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("flag, repack", [([], True), (["--no-repack"], False)])
def test_no_repack_reaches_the_loader(monkeypatch, flag, repack):
    """``--no-repack`` (llama.cpp's flag) loads weights in the file's layout."""
    from edgemoe import cli
    from edgemoe.commands.options import load_model
    from edgemoe.runtime import model

    seen = {}
    monkeypatch.setattr(model, "load", lambda path, **options: seen.update(options))
    args = cli.build_parser().parse_args(["run", "m.gguf", "-p", "x", *flag])
    load_model(args)
    assert seen["repack"] is repack


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"edgemoe \d+\.\d+\.\d+\n", capsys.readouterr().out)


@pytest.mark.parametrize(
    "argv, usage, hint",
    [
        (["run", "m", "-p", "x", "--budgte", "3GiB"], "usage: edgemoe run", "--budget"),
        (["bench", "m", "--n-promt", "3"], "usage: edgemoe bench", "--n-prompt"),
        (["inspect", "m", "--jsn"], "usage: edgemoe inspect", "--json"),
        (["rnu", "m"], "usage: edgemoe [", "run"),
    ],
)
def test_a_misspelt_option_or_command_is_named_with_a_suggestion(
    capsys, argv, usage, hint
):
    """The command's own usage (not the top level's) and "did you mean",
    exit 2, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert usage in err and f"(did you mean {hint}?)" in err, err
    assert "Traceback" not in err


def test_every_option_has_help():
    """``--help`` of every command explains each option it lists."""
    from edgemoe.cli import build_parser

    parser = build_parser()
    missing = [
        f"{name} {'/'.join(a.option_strings)}"
        for name, sub in parser.commands.items()
        for a in sub._actions
        if a.option_strings and not a.help
    ]
    assert missing == []
