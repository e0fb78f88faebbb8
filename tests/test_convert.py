"""`edgemoe convert`: quality per level on the trained fixture, byte accounting,
every family, and failures that must leave the user's files alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from refs import level_errors

import edgemoe
from edgemoe.converters.convert import ConvertOptions, convert
from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.format.reader import EdgeCheckpoint, read_manifest
from edgemoe.quant.baselines import ExpertsTransformed, rtn_minmax, sliced_int8
from edgemoe.runtime.perplexity import log_softmax, perplexity, windows


@pytest.fixture(scope="module")
def converted(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "code-mixtral-edge"
    convert(fixture_dir, out, ConvertOptions())
    return out


def ppl(path, text, **options) -> float:
    with edgemoe.load(path, **options) as m:
        return perplexity(m, m.tokenize(text, add_special=False), 256).perplexity


def fake_quant(fixture_dir, transform):
    """The float model with every expert matrix replaced by
    ``transform(matrix)``: the baselines (round-to-nearest, sliced int8)."""
    from edgemoe.checkpoint import open_checkpoint, tokenizer_for
    from edgemoe.runtime.model import LoadOptions, Model

    ckpt = ExpertsTransformed(open_checkpoint(fixture_dir), transform)
    return Model(ckpt, tokenizer_for(ckpt), LoadOptions())


def fake_quant_ppl(fixture_dir, text, transform) -> float:
    with fake_quant(fixture_dir, transform) as m:
        return perplexity(m, m.tokenize(text, add_special=False), 256).perplexity


def test_quality_per_level(fixture_dir, converted):
    text = (fixture_dir / "heldout.txt").read_text()
    base = ppl(fixture_dir, text)
    got = {lv: ppl(converted, text, force_level=lv) for lv in (8, 4, 2)}
    sliced = fake_quant_ppl(fixture_dir, text, lambda w: sliced_int8(w, 2))
    # Two-sided: a perplexity that drops is as wrong as one that rises
    # (quantization noise cannot make a model notably better).
    assert -0.005 < got[8] / base - 1 < 0.005
    assert -0.005 < got[4] / base - 1 < 0.01
    assert -0.005 < got[2] / base - 1 < 0.035
    assert got[2] < sliced


def log_probs(model, text: str) -> list[np.ndarray]:
    """Per 256-token window, log-softmax of each position's logits [T, V]."""
    with model as m:
        tokens = m.tokenize(text, add_special=False)
        return [log_softmax(m.logits(c)[:-1]) for c in windows(tokens, 256)]


FIRST_FITS_KL = {8: 0.00014, 4: 0.00064, 2: 0.01357}
"""Mean KL divergence from float over the held-out text of each level as
the first converter fitted it (numpy fits, commit e19e5f3, the last before
ggml's quantizers), a float32 backbone, computed as this test does."""


def test_levels_as_close_to_float_as_the_first_fits(fixture_dir, tmp_path):
    """The quality table unchanged or better since the quantizer change,
    measured where small differences show: the KL divergence of each level's
    next-token distribution from float's (experts only: a float32 backbone).
    Each level also beats round-to-nearest per group of 64 at about its bits
    (bench_quality's baselines). Measured 0.00012, 0.00051, 0.00856."""
    out = tmp_path / "f32"
    convert(fixture_dir, out, ConvertOptions(backbone_type="F32"))
    text = (fixture_dir / "heldout.txt").read_text()
    ref = log_probs(edgemoe.load(fixture_dir), text)

    def kl(model) -> float:
        got = log_probs(model, text)
        per = [(np.exp(r) * (r - g)).sum(axis=-1) for r, g in zip(ref, got)]
        return float(np.concatenate(per).mean())

    for lv in (8, 4, 2):
        got = kl(edgemoe.load(out, force_level=lv))
        assert got <= FIRST_FITS_KL[lv], (lv, got)
        if lv < 8:  # level 8 holds 9.75 bits: no 8-bit baseline matches it
            rtn = fake_quant(fixture_dir, lambda w, b=lv: rtn_minmax(w, b))
            assert got < kl(rtn), (lv, got)


def test_reading_a_level_reads_what_the_manifest_says(converted):
    ckpt = EdgeCheckpoint(converted)
    try:
        m = ckpt.manifest
        full = sum(ref.length for ref in m.experts[0][0])
        for i, level in enumerate(m.levels):
            refs = m.experts[0][0][: i + 1]
            read = sum(sum(n for _, n in ref.parts) for ref in refs)
            parts = [ckpt.read_plane(0, 0, p) for p in range(i + 1)]
            assert sum(x.nbytes for plane in parts for x in plane) == read
            assert read <= (level / 8 + 0.2) * full
        report = json.loads((converted / "manifest.json").read_text())
        assert report["plane_types"] == ["Q2_K", "Q2_K", "Q4_K"]
    finally:
        ckpt.close()


def test_inspect_reports_backbone_and_expert_bytes(converted):
    from edgemoe.report import inspect_report

    rep = inspect_report(str(converted), verify=True)
    assert rep["format"] == "edgemoe" and rep["verified"]
    assert rep["backbone_bytes"] == (converted / "backbone.gguf").stat().st_size
    assert set(rep["expert_bytes"]) == {"2", "4", "8"}
    assert (
        rep["expert_bytes"]["2"] < rep["expert_bytes"]["4"] < rep["expert_bytes"]["8"]
    )
    # 4 layers x 8 experts x 3 matrices of 512x256, Q2_K = 84 bytes per 256.
    assert rep["expert_bytes"]["2"] == 4 * 8 * 3 * 512 * 256 // 256 * 84


def test_inspect_text_counts_the_expert_planes_as_weights(converted, capsys):
    """The "weights" line of a converted model names the backbone and the
    planes, not the backbone alone."""
    from edgemoe.report import inspect_report, print_inspect

    print_inspect(inspect_report(str(converted)))
    line = next(
        x for x in capsys.readouterr().out.splitlines() if x.startswith("weights")
    )
    assert "backbone" in line and "+ expert planes" in line, line


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_other_families_convert_and_run(build_model, tmp_path, family):
    """Shared experts, dense layers, q/k norms and an expert FFN (64) padded to
    the 256-wide plane blocks. Random tiny models amplify any weight error
    through their layers, so the check is relative: with a float backbone,
    level 8 lands within 10% of the float logits (RMS over all positions; a
    structural mistake gives ~100%) and well inside level 4's error. (The
    largest single logit is no measure: one routing flip moves it 20% with
    noise of level 8's size.)"""
    src = build_model(family, hidden_size=256)
    out = tmp_path / "edge"
    convert(
        src,
        out,
        ConvertOptions(calib_tokens=512, calib_window=128, backbone_type="F32"),
    )
    ids = list(range(1, 25))
    with edgemoe.load(src) as ref:
        expected = ref.logits(ids)
    r8, r4, _ = level_errors(out, expected, ids)
    assert r8 < 0.1 and r8 < 0.5 * r4, (r8, r4)


def test_hidden_size_not_a_multiple_of_256_is_padded(tiny_model, tmp_path):
    """A hidden size of 64 (as gpt-oss's 2,880) is stored padded to the
    planes' 256-weight blocks: the runtime pads the activations with zeros
    and drops the padded outputs, so level 8 stays close to the float model
    and each level below is further away."""
    src = tiny_model("mixtral")
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(calib_tokens=512, backbone_type="F32"))
    assert read_manifest(out).expert_dim == 256
    ids = list(range(5, 37))
    with edgemoe.load(src) as m:
        expected = m.logits(ids)
    err = {}
    for level in (8, 4):
        with edgemoe.load(out, force_level=level) as m:
            got = m.logits(ids)
        err[level] = float(
            np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean())
        )
    assert err[8] < 0.1 and err[8] < err[4], err
    from edgemoe.converters.onnx_export import export_onnx

    with pytest.raises(ConfigError, match="ONNX export does not cover a padded hidden"):
        export_onnx(out, 8)


# -- failures ------------------------------------------------------------------
def copy_of(converted, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(converted, dst)
    return dst


def test_corrupted_shard_is_a_checksum_error(converted, tmp_path):
    model = copy_of(converted, tmp_path)
    shard = model / "experts-00001.gguf"
    data = bytearray(shard.read_bytes())
    ref = EdgeCheckpoint(model).manifest.experts[2][5][1]
    data[ref.offset + ref.parts[1][0] + 7] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        ModelFileError, match="checksum mismatch in layer 2 expert 5 plane 1"
    ):
        edgemoe.load(model)


def test_truncated_shard(converted, tmp_path):
    model = copy_of(converted, tmp_path)
    shard = model / "experts-00001.gguf"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(ModelFileError, match="experts-00001.gguf: truncated"):
        edgemoe.load(model)


def edited(converted, tmp_path, edit) -> object:
    """A copy of the converted model with ``edit(manifest_dict)`` applied."""
    model = copy_of(converted, tmp_path)
    path = model / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return model


def test_manifest_from_a_newer_version(converted, tmp_path):
    model = edited(converted, tmp_path, lambda d: d.update(version=99))
    with pytest.raises(ModelFileError, match="newer EdgeMoE"):
        edgemoe.load(model)


def test_manifest_inconsistency_is_named(converted, tmp_path):
    def far_offset(d):
        d["experts"][1][3][0]["offset"] = 10**12

    model = edited(converted, tmp_path, far_offset)
    with pytest.raises(ModelFileError, match="layer 1 expert 3 plane 0"):
        edgemoe.load(model)


def test_existing_output_is_refused_and_untouched(fixture_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ModelFileError, match="already exists"):
        convert(fixture_dir, out, ConvertOptions())
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_disk_full_leaves_the_previous_model_intact(
    fixture_dir, converted, tmp_path, monkeypatch
):
    import errno

    import gguf

    out = copy_of(converted, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def failing(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(ModelFileError, match="no space left"):
        convert(fixture_dir, out, ConvertOptions(force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_exported_gguf_runs_in_llamacpp_like_edgemoe(converted, tmp_path, cli):
    """export-gguf at level 2 as Q2_K copies the plane's blocks (its fp16 scales
    rescaled exactly), so llama.cpp computes the very model EdgeMoE runs at
    level 2: same logits, same 32 greedy tokens. Level 4 becomes Q4_K."""
    from refs import cpu_has_amx

    from edgemoe.runtime.llamacpp import LlamaCpp

    out2 = tmp_path / "l2.gguf"
    proc = cli("export-gguf", converted, "--level", 2, "--type", "Q2_K", "-o", out2)
    assert proc.returncode == 0, proc.stderr
    # llama.cpp at its defaults, as EdgeMoE at its own: both repack the Q4_K
    # backbone for ggml's interleaved kernels, which round a prefill
    # differently from the plain ones (~2e-2 in these logits, in both). On
    # AMX CPUs llama.cpp's defaults crash on MoE GGUFs (shared/docs/engine.md
    # §8): there both run their plain kernels.
    repack = not cpu_has_amx()
    with edgemoe.load(converted, force_level=2, repack=repack) as m:
        prompt = m.tokenize("def parse_args(argv):\n    parser = ")
        ours = [
            r.token
            for r in m.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
        ]
        m.reset()
        our_logits = m.eval(prompt)
    with LlamaCpp(out2, n_ctx=128, f32_cache=True, extra_bufts=repack) as ref:
        expected, _ = ref.greedy(prompt, 32)
        ref.reset()
        ref_logits = ref.eval(prompt)
    assert ours == expected
    assert np.abs(our_logits - ref_logits).max() < 1e-4

    out4 = tmp_path / "l4.gguf"
    proc = cli("export-gguf", converted, "--level", 4, "--type", "Q4_K", "-o", out4)
    assert proc.returncode == 0, proc.stderr
    with (
        edgemoe.load(out4, repack=repack) as g,
        LlamaCpp(out4, n_ctx=128, f32_cache=True, extra_bufts=repack) as ref,
    ):
        types = {g.checkpoint.info(n)[0] for n in g.checkpoint.names()}
        # Experts Q4_K; the backbone as stored (Q4_K_M: Q4_K, head and attn_v Q6_K).
        assert "Q4_K" in types and "Q6_K" in types
        got = [
            r.token
            for r in g.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
        ]
        assert got == ref.greedy(prompt, 32)[0]


@pytest.mark.parametrize("level", [2, 4])
def test_onnx_export_runs_in_onnxruntime_like_edgemoe(converted, tmp_path, level):
    """The ONNX graph carries the level's own blocks (MatMulNBits): its logits
    match EdgeMoE at that level up to activation quantization (ggml quantizes
    activations to 8 bits, onnxruntime keeps float32), and sit closer to that
    level than to any other."""
    import onnxruntime as ort

    from edgemoe.converters.onnx_export import export_onnx

    path = export_onnx(converted, level, tmp_path / "model.onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    with edgemoe.load(converted, force_level=level) as m:
        ids = m.tokenize(
            "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n"
        )
        ours = m.logits(ids)
    got = session.run(None, {"input_ids": np.array([ids], dtype=np.int64)})[0][0]
    assert got.shape == ours.shape
    diff = np.abs(got - ours).max()
    assert diff < 0.05 * np.abs(ours).max()
    # At most one near-tie top token flips (19 positions; the Q4_K_M
    # backbone's 8-bit activations in ggml against float in onnxruntime).
    assert (got.argmax(-1) != ours.argmax(-1)).sum() <= 1
    for other in {2, 4, 8} - {level}:
        with edgemoe.load(converted, force_level=other) as m:
            assert diff < np.abs(got - m.logits(ids)).max()


def test_convert_cli_errors_are_one_line(fixture_dir, tmp_path, cli):
    proc = cli("convert", fixture_dir, "-o", tmp_path / "out", "--levels", "2,3")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: level 3 adds 1 bits")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = cli("convert", tmp_path / "nope", "-o", tmp_path / "out")
    assert proc.returncode == 1 and "no such file or directory" in proc.stderr


def test_convert_cli_summary(fixture_dir, tmp_path, cli):
    proc = cli("convert", fixture_dir, "-o", tmp_path / "m", "--calib-tokens", 1024)
    assert proc.returncode == 0, proc.stderr
    for needle in (
        "2-bit",
        "4-bit",
        "8-bit",
        "2.62",
        "5.25",
        "9.75",
        "Q2_K + Q2_K + Q4_K",
        # The fixture is tiny: every packaged device holds it.
        "all 8 device profiles",
        "resident from",
        "experts stream from",
        "which fits: all 8 device profiles; edgemoe profile -m",
    ):
        assert needle in proc.stdout
    proc = cli("inspect", tmp_path / "m", "--json", "--verify")
    rep = json.loads(proc.stdout)
    assert rep["verified"] and set(rep["expert_bytes"]) == {"2", "4", "8"}
    assert rep["backbone_bytes"] > 0


def test_gguf_source_converts(fixture_dir, tmp_path):
    """A llama.cpp GGUF (quantized, pairwise-RoPE rows, vocab in metadata)
    converts too; its tokenizer travels in backbone.gguf."""
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.converters.llama_gguf import write_gguf

    src = tmp_path / "fixture-q8.gguf"
    ckpt = open_checkpoint(fixture_dir)
    try:
        write_gguf(ckpt, src, "Q8_0")
    finally:
        ckpt.close()
    out = tmp_path / "edge"
    convert(src, out, ConvertOptions(calib_tokens=1024))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == "gguf" and manifest["source"]["format"] == "gguf"
    assert not (out / "tokenizer.json").exists()
    text = (fixture_dir / "heldout.txt").read_text()[:6000]
    assert abs(ppl(out, text, force_level=8) / ppl(src, text) - 1) < 0.005
    with edgemoe.load(out) as m, edgemoe.load(src) as g:
        assert m.tokenize(text[:500]) == g.tokenize(text[:500])


def test_default_backbone_is_the_q4_k_m_mix(converted_fixture):
    """A conversion's backbone is llama.cpp's Q4_K_M mix, simplified: the head
    and the value projections Q6_K, the other matrices Q4_K, vectors and
    routers F32; an unknown type is refused by name."""
    from edgemoe.checkpoint.gguf_file import GGUFCheckpoint
    from edgemoe.converters.llama_gguf import write_gguf

    bb = GGUFCheckpoint(converted_fixture / "backbone.gguf", backbone_only=True)
    try:
        types = {n: bb.info(n)[0] for n in bb.names()}
    finally:
        bb.close()
    assert types["output.weight"] == "Q6_K"
    assert all(t == "Q6_K" for n, t in types.items() if n.endswith("attn_v.weight"))
    assert all(
        t == "Q4_K"
        for n, t in types.items()
        if n.endswith(("attn_q.weight", "attn_k.weight", "attn_output.weight"))
    )
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    with pytest.raises(ConfigError, match="Q4_K_M"):
        write_gguf(bb, converted_fixture / "never.gguf", "Q3_K_L")


def test_a_piped_convert_prints_progress_lines_with_a_moving_eta(fixture_dir, tmp_path):
    """Without a terminal, progress is plain lines (every few seconds; every
    call here): the share done only grows, layers and experts are named, and
    an ETA appears once there is a pace."""
    import io
    import re

    from edgemoe.commands.convert import convert_progress

    out = io.StringIO()
    progress = convert_progress(out, tty=False, every=0.0)
    convert(fixture_dir, tmp_path / "edge", ConvertOptions(calib_tokens=512), progress)
    lines = out.getvalue().splitlines()
    shares = [int(re.match(r"converting: (\d+)%", ln).group(1)) for ln in lines]
    assert shares == sorted(shares) and shares[-1] == 100 and shares[0] < 20
    assert any("backbone tensor" in ln for ln in lines)
    assert any("layer 4/4, experts 8/8" in ln for ln in lines)
    assert "\x1b" not in out.getvalue()  # no terminal codes in a log


def test_ctrl_c_during_convert_says_so_and_leaves_nothing(fixture_dir, tmp_path):
    """SIGINT mid-conversion: exit 130, one line saying nothing was written,
    no traceback, and neither the output nor its partial directory remains."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "edge"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemoe", "convert", str(fixture_dir), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".edge.partial") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted; nothing written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_nan_expert_weights_are_refused_by_name(tiny_model, tmp_path):
    """A damaged expert (NaN in its weights) stops the conversion with one
    error naming the tensor and expert, before any fit turns it into noise,
    and leaves no output."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "damaged"
    shutil.copytree(tiny_model("mixtral"), src)
    (st,) = src.glob("*.safetensors")
    tensors = load_file(st)
    name = next(n for n in tensors if "layers.1." in n and "experts.2.w3" in n)
    tensors[name][3, 5] = np.nan
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(
        ModelFileError, match=r"blk\.1\.ffn_up_exps\.weight, expert 2: NaN"
    ):
        convert(src, tmp_path / "edge")
    assert not (tmp_path / "edge").exists()
    assert not any(p.name.startswith(".edge.partial") for p in tmp_path.iterdir())
