"""Bad shape/config numbers end as one typed line naming the field, never a crash.

Every source (HF config.json, a converted model's manifest, GGUF metadata,
``edgemoe synth``) goes through ``edgemoe/arch/validate.py`` before anything is
sized from it or handed to ggml. Each config.json case is checked through
``edgemoe.load`` and ``edgemoe.cli.main`` (inspect and run) in-process; a
representative case per source also runs the CLI as a subprocess, to show the
exit status is 1 and not a signal (ggml aborts on ``eps < 0``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import VOCAB, build_tiny
from expect import assert_cli_error, assert_main_error, error_line

import edgemoe
from edgemoe.arch.validate import MAX_EXPERT, MAX_FFN, MAX_LAYER, MAX_VOCAB
from edgemoe.errors import ConfigError, EdgeMoEError, ModelFileError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
N_EXPERT_KEY = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts"}
EXPERT_FFN_KEY = {
    "mixtral": "intermediate_size",
    "olmoe": "intermediate_size",
    "gpt_oss": "intermediate_size",
}
HUGE = 10**3999  # 4000 digits: json parses it, float() overflows, repr is long

NAN, INF = math.nan, math.inf
NOT_INTS = [-1, 0, 1.5, True, False, None, "64", [64], {"n": 64}, NAN, INF, HUGE]
NOT_FLOATS = [-1.0, 0, 0.0, NAN, INF, -INF, None, True, "tiny", [1e-5], HUGE]


def _int_keys(family: str) -> list[str]:
    return [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "num_experts_per_tok",
        N_EXPERT_KEY.get(family, "num_experts"),
        EXPERT_FFN_KEY.get(family, "moe_intermediate_size"),
    ]


def _cases(family: str) -> list[tuple[str, object, str]]:
    """(key, bad value, text the message must hold) for one family."""
    cases = [(k, v, k) for k in _int_keys(family) for v in NOT_INTS]
    cases += [(k, v, k) for k in ("rms_norm_eps", "rope_theta") for v in NOT_FLOATS]
    nullable = [-1, 0, 1.5, True, "8", NAN]  # null means "derive it"
    cases += [(k, v, k) for k in ("num_key_value_heads", "head_dim") for v in nullable]
    cases += [
        # Caps: generous for real models, named in the message.
        ("num_hidden_layers", 10**9, f"1..{MAX_LAYER} (EdgeMoE's cap)"),
        ("vocab_size", MAX_VOCAB + 1, f"1..{MAX_VOCAB} (EdgeMoE's cap)"),
        ("hidden_size", 65537, "1..65536 (EdgeMoE's cap)"),
        ("num_attention_heads", 4097, "1..4096 (EdgeMoE's cap)"),
        ("max_position_embeddings", 2**24 + 1, f"1..{2**24} (EdgeMoE's cap)"),
        (N_EXPERT_KEY.get(family, "num_experts"), MAX_EXPERT + 1, f"1..{MAX_EXPERT}"),
        (
            EXPERT_FFN_KEY.get(family, "moe_intermediate_size"),
            MAX_FFN + 1,
            "1..1048576",
        ),
        # Fields that must agree with each other.
        (
            "num_experts_per_tok",
            5,
            "experts per token (n_expert_used) 5 must be in 1..4",
        ),
        ("head_dim", 33, "head_dim must be even"),
        ("bos_token_id", VOCAB, f"bos_token_id must be an integer in 0..{VOCAB - 1}"),
        ("bos_token_id", -1, "bos_token_id"),
        ("bos_token_id", 1.0, "bos_token_id"),
        (
            "eos_token_id",
            [0, VOCAB],
            f"eos_token_ids must be an integer in 0..{VOCAB - 1}",
        ),
        ("eos_token_id", "</s>", "eos_token_id"),
        ("eos_token_id", [0, None], "eos_token_id"),
        ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
        ("tie_word_embeddings", None, "tie_word_embeddings"),
    ]
    if family != "olmoe":
        cases += [("sliding_window", v, "sliding_window") for v in (-1, 1.5, "4k", INF)]
    if family.startswith("qwen"):
        cases += [
            ("mlp_only_layers", [-1], "mlp_only_layers"),
            ("mlp_only_layers", ["a"], "mlp_only_layers"),
            ("mlp_only_layers", 1, "mlp_only_layers"),
            ("mlp_only_layers", [10**9], "mlp_only_layers"),
            ("decoder_sparse_step", 0, "decoder_sparse_step"),
            ("decoder_sparse_step", 10**9, "decoder_sparse_step"),
            ("use_sliding_window", "no", "use_sliding_window"),
            ("norm_topk_prob", 1, "norm_topk_prob"),
        ]
    if family == "qwen2_moe":
        key = "shared_expert_intermediate_size"
        cases += [(key, v, key) for v in (-1, 1.5, None, MAX_FFN + 1, NAN)]
    if family == "olmoe":
        cases += [("clip_qkv", v, "clip_qkv") for v in (-1.0, 0, NAN, INF, "6")]
    if family == "gpt_oss":
        cases += [("swiglu_limit", v, "swiglu_limit") for v in (-1.0, 0, NAN, "7")]
        cases += [
            ("layer_types", ["sliding_attention"], "layer_types must list 2"),
            ("layer_types", ["full_attention", "linear"], "layer_types must list 2"),
            ("layer_types", "full", "layer_types"),
            ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "original_max"),
            ("rope_parameters", {"rope_type": "dynamic"}, "rope_type 'dynamic'"),
            ("rope_parameters", [1], "rope_parameters must be an object"),
        ]
    return cases


def _id(value) -> str:
    return "4000-digits" if value is HUGE else repr(value)[:20]


CASES = [
    pytest.param(f, key, value, needle, id=f"{f}-{key}={_id(value)}")
    for f in FAMILIES
    for key, value, needle in _cases(f)
]


# -- helpers ---------------------------------------------------------------------


def check_api(path: Path, exc: type, *needles: str) -> str:
    with pytest.raises(EdgeMoEError) as info:
        edgemoe.load(path)
    assert type(info.value) is exc, repr(info.value)
    msg = str(info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def check_main(capsys, path: Path, *needles: str) -> None:
    for argv in (["inspect", path], ["run", path, "-p", "hi", "-n", "1"]):
        assert_main_error(capsys, argv, *needles)


def check_cli(cli, path: Path, *needles: str) -> None:
    for argv in (["inspect", path], ["run", path, "-p", "hi", "-n", "1"]):
        assert_cli_error(cli(*argv), *needles)


def with_config(src: Path, dst: Path, key: str, value) -> Path:
    """A copy of model ``src`` (weights linked) whose config.json has ``key``
    set to ``value``; rope_theta goes where the reader looks first."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "config.json":
            (dst / p.name).symlink_to(p)
    cfg = json.loads((src / "config.json").read_text())
    if key == "rope_theta" and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = value
    else:
        cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))  # NaN, Infinity allowed
    return dst


# -- HF config.json --------------------------------------------------------------


@pytest.mark.parametrize("family, key, value, needle", CASES)
def test_bad_config_value(tiny_model, tmp_path, capsys, family, key, value, needle):
    model = with_config(tiny_model(family), tmp_path / "m", key, value)
    path = str(model / "config.json")
    msg = check_api(model, ConfigError, path, needle)
    assert len(msg) < 400, msg  # a 4000-digit value is summarised, not printed
    check_main(capsys, model, path, needle)


@pytest.mark.parametrize(
    "family, key, value, needles",
    [
        ("mixtral", "rms_norm_eps", -1.0, ("rms_norm_eps", "(0, 1]", "got -1.0")),
        ("qwen3_moe", "rms_norm_eps", NAN, ("rms_norm_eps", "got nan")),
        ("olmoe", "num_hidden_layers", 10**9, ("num_hidden_layers", "1..1024")),
        ("qwen2_moe", "moe_intermediate_size", 0, ("moe_intermediate_size", "got 0")),
        ("mixtral", "rope_theta", INF, ("rope_theta", "got inf")),
        ("qwen3_moe", "head_dim", 0, ("head_dim",)),
        ("mixtral", "hidden_size", HUGE, ("hidden_size", "about 4000 digits")),
    ],
    ids=["eps-1", "eps-nan", "layers-1e9", "expert-ffn-0", "theta-inf", "hd-0", "huge"],
)
def test_bad_config_cli(tiny_model, tmp_path, cli, family, key, value, needles):
    model = with_config(tiny_model(family), tmp_path / "m", key, value)
    check_cli(cli, model, str(model / "config.json"), *needles)


def test_good_configs_still_load(tiny_model):
    """The checks refuse nothing a real (tiny) model has."""
    for family in FAMILIES:
        with edgemoe.load(tiny_model(family), n_ctx=16) as m:
            assert m.spec.rms_eps == pytest.approx(1e-5)
            assert isinstance(m.spec.rope_theta, float)


# -- a converted model's manifest --------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from edgemoe.converters.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("manifest")
    src = build_tiny("mixtral", root / "src", hidden_size=256)
    out = root / "edge"
    convert(src, out, ConvertOptions(calib_tokens=64, calib_window=32))
    return out


def with_spec(src: Path, dst: Path, key: str, value) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["spec"][key] = value
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("rms_eps", -1.0, "rms_eps must be a finite number in (0, 1], got -1.0"),
        ("rms_eps", 0.0, "rms_eps must be a finite number in (0, 1], got 0.0"),
        ("rms_eps", True, "rms_eps must be a finite number in (0, 1], got True"),
        ("rope_theta", -5.0, "rope_theta must be a finite number"),
        ("rope_theta", 0, "rope_theta must be a finite number"),
        ("n_layer", 10**9, "n_layer must be an integer in 1..1024 (EdgeMoE's cap)"),
        ("n_embd", 64.0, "n_embd must be an integer in 1..65536, got 64.0"),
        ("n_head", False, "n_head must be an integer"),
        ("head_dim", 0, "head_dim must be an integer in 1..4096, got 0"),
        ("expert_ffn", 0, "expert_ffn) must be positive, got 0"),
        ("n_expert_used", 0, "n_expert_used) 0 must be in 1.."),
        ("n_vocab", HUGE, "n_vocab must be an integer"),
        ("sliding_window", -1, "sliding_window must be an integer in 1.."),
        ("clip_qkv", 0.0, "clip_qkv must be a finite number"),
        ("bos_token_id", VOCAB, f"bos_token_id must be an integer in 0..{VOCAB - 1}"),
        ("eos_token_ids", [VOCAB + 5], "eos_token_ids must be an integer in 0.."),
        ("moe_layers", [1, 0], "moe_layers must list true/false"),
        ("tie_embeddings", "no", "tie_embeddings must be true or false"),
        ("qk_norm", "sometimes", "qk_norm must be one of"),
        ("attention", "mla", "MLA attention needs kv_lora_rank, qk_nope_dim"),
        ("attention", "sparse", "attention must be one of 'gqa', 'mla'"),
    ],
)
def test_bad_manifest_spec(converted, tmp_path, capsys, key, value, needle):
    model = with_spec(converted, tmp_path / "m", key, value)
    path = str(model / "manifest.json")
    check_api(model, ConfigError, f"{path}: spec: ", needle)
    check_main(capsys, model, path, needle)


@pytest.mark.parametrize("value", [NAN, INF])
def test_manifest_non_finite_is_refused(converted, tmp_path, value):
    """The manifest reader's JSON refuses NaN/Infinity outright; whatever a
    manifest is read with, ModelSpec's own check refuses them too."""
    model = with_spec(converted, tmp_path / "m", "rms_eps", value)
    check_api(model, ModelFileError, "is not a JSON number")
    from edgemoe.format.reader import read_manifest

    spec = read_manifest(converted).spec
    for field in ("rms_eps", "rope_theta", "clip_qkv"):
        with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
            dataclasses.replace(spec, **{field: value})


def test_bad_manifest_spec_cli(converted, tmp_path, cli):
    model = with_spec(converted, tmp_path / "m", "rms_eps", -1.0)
    check_cli(cli, model, str(model / "manifest.json"), "rms_eps", "got -1.0")


# -- GGUF metadata (written by the repo's own writer, then edited in place) ---------


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    from edgemoe.checkpoint import open_checkpoint
    from edgemoe.converters.llama_gguf import write_gguf

    ckpt = open_checkpoint(tiny_model("mixtral"))
    try:
        return write_gguf(ckpt, tmp_path_factory.mktemp("gguf") / "t.gguf", "F32")
    finally:
        ckpt.close()


def gguf_with(src: Path, dst: Path, key: str, value) -> Path:
    """A copy of ``src`` with scalar metadata ``key`` overwritten in place
    (same type, same size: only the value changes)."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader
    return dst


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("llama.attention.layer_norm_rms_epsilon", -1.0, "got -1.0"),
        ("llama.attention.layer_norm_rms_epsilon", 0.0, "got 0.0"),
        ("llama.attention.layer_norm_rms_epsilon", NAN, "got nan"),
        ("llama.rope.freq_base", INF, "llama.rope.freq_base must be a finite number"),
        ("llama.block_count", 10**6, "llama.block_count must be an integer in 1..1024"),
        ("llama.vocab_size", 2**30, "llama.vocab_size must be an integer in 1.."),
        ("llama.feed_forward_length", 0, "llama.feed_forward_length must be"),
        ("llama.expert_used_count", 0, "(n_expert_used) 0 must be in 1..4"),
        ("tokenizer.ggml.bos_token_id", VOCAB + 1, "bos_token_id must be an integer"),
    ],
)
def test_bad_gguf_metadata(tiny_gguf, tmp_path, capsys, key, value, needle):
    path = gguf_with(tiny_gguf, tmp_path / "m.gguf", key, value)
    field = "rms_epsilon" if "epsilon" in key else needle.split(" ")[0]
    # Like every other fault in a GGUF's metadata (tests/test_bad_input.py).
    check_api(path, ModelFileError, str(path), "bad llama.* metadata", field, needle)
    check_main(capsys, path, str(path), needle)


def test_bad_gguf_eps_cli(tiny_gguf, tmp_path, cli):
    key = "llama.attention.layer_norm_rms_epsilon"
    path = gguf_with(tiny_gguf, tmp_path / "m.gguf", key, -1.0)
    check_cli(cli, path, str(path), f"{key} must be a finite number", "got -1.0")


# -- edgemoe synth -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--layers", "1000000"],
            "layers must be an integer in 1..1024 (EdgeMoE's cap)",
        ),
        (["--layers", "0"], "layers must be an integer in 1..1024, got 0"),
        (["--seed", "-1"], "seed must be an integer in 0.."),
    ],
)
def test_synth_refuses_bad_sizes(tmp_path, cli, args, needle):
    out = tmp_path / "out"
    proc = cli("synth", *args, "-o", out)
    assert proc.returncode == 1, proc.stderr
    assert needle in error_line(proc.stderr)
    assert not out.exists()


def test_synth_api_checks_overrides():
    from edgemoe.converters import synth

    with pytest.raises(ConfigError, match=r"layers must be an integer in 1\.\.1024"):
        synth.preset_config("demo", layers=10**9)
    with pytest.raises(ConfigError, match="synth preset 'demo': hidden_size must be"):
        synth.preset_config("demo", hidden_size=10**6)
    with pytest.raises(ConfigError, match="synth preset 'demo': rms_norm_eps must be"):
        synth.preset_config("demo", rms_norm_eps=-1.0)
    with pytest.raises(ConfigError, match="seed must be"):
        synth.SyntheticCheckpoint(synth.preset_config("demo", layers=1), seed=-1)
