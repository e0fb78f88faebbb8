"""Bad input ends in one clear, typed line naming what is wrong, never a traceback.

Each case is checked through the Python API (exception type and message) and
through the CLI (exit status 1, a single ``error: ...`` line on stderr). The
required cases run the CLI as a subprocess, as users do; the rest call
``edgemoe.cli.main`` in-process to keep the suite fast.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from edgemoe.arch import supported
from edgemoe.checkpoint import open_checkpoint
from edgemoe.cli import main
from edgemoe.errors import (
    ConfigError,
    ContextOverflowError,
    EdgeMoEError,
    ModelFileError,
    UnsupportedArchitectureError,
)
from edgemoe.runtime.model import load

LONG_TEXT = "def parse(line):\n    return line.split(',')\n" * 20


# -- helpers -----------------------------------------------------------------------
from expect import assert_cli_error, assert_main_error  # noqa: E402


def raises(exc_type, fn, *needles: str) -> EdgeMoEError:
    """``fn()`` raises exactly ``exc_type`` with a one-line message holding
    every needle."""
    with pytest.raises(EdgeMoEError) as info:
        fn()
    assert type(info.value) is exc_type, repr(info.value)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return info.value


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def edit_tensors(model_dir: Path, edit) -> Path:
    """Rewrite ``model.safetensors`` of a (fp32) copy with ``edit(tensors)``."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return tiny_model("mixtral")


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    from edgemoe.converters.llama_gguf import write_gguf

    ckpt = open_checkpoint(tiny)
    try:
        return write_gguf(ckpt, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "Q8_0")
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def tiny_loaded(tiny):
    with load(tiny, n_ctx=64) as model:
        yield model


# -- 1. a missing model path --------------------------------------------------------
def test_missing_model_path(tmp_path, capsys, cli):
    missing = tmp_path / "no-such-model"
    raises(ModelFileError, lambda: open_checkpoint(missing), str(missing), "no such")
    raises(ModelFileError, lambda: load(missing), str(missing), "no such")
    assert_cli_error(cli("run", missing, "-p", "hi"), str(missing), "no such")
    for argv in (["inspect", missing], ["export-gguf", missing, "-o", tmp_path / "o"]):
        assert_main_error(capsys, argv, str(missing), "no such")
    assert not (tmp_path / "o").exists()


def test_directory_without_config(tmp_path, tiny_gguf, capsys):
    shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    raises(ModelFileError, lambda: load(tmp_path), "no config.json", "m.gguf")
    assert_main_error(capsys, ["inspect", tmp_path], "no config.json", "did you mean")


def test_safetensors_file_instead_of_directory(tiny, capsys):
    path = tiny / "model.safetensors"
    raises(ModelFileError, lambda: open_checkpoint(path), str(path), f"pass {tiny}")
    assert_main_error(capsys, ["inspect", path], f"pass {tiny}")


# -- 2. truncated safetensors -------------------------------------------------------
def _header_length(path: Path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


@pytest.mark.parametrize("where", ["tensor-data", "length-prefix", "json-header"])
def test_truncated_safetensors(tiny, tmp_path, where, cli):
    from edgemoe.checkpoint.safetensors import SafetensorsFile

    model = copy_model(tiny, tmp_path / "m")
    st = model / "model.safetensors"
    full = st.stat().st_size
    hlen = _header_length(st)
    f = SafetensorsFile(st)
    last = max(f.tensors.values(), key=lambda t: t.end)
    f.close()
    if where == "tensor-data":
        size = full - 100
        needles = ("truncated", f"tensor {last.name!r}", f"file has {size} bytes")
    elif where == "length-prefix":
        size = 5
        needles = ("truncated", "no safetensors header")
    else:
        size = 8 + hlen // 2
        needles = (f"header length {hlen}", f"file is {size} bytes")
    truncate(st, size)

    raises(ModelFileError, lambda: open_checkpoint(model), str(st), *needles)
    raises(ModelFileError, lambda: load(model), str(st), *needles)
    assert_cli_error(cli("run", model, "-p", "hi"), str(st), *needles)


def test_corrupt_safetensors_json(tiny, tmp_path, capsys):
    model = copy_model(tiny, tmp_path / "m")
    st = model / "model.safetensors"
    hlen = _header_length(st)
    with open(st, "r+b") as fh:  # same length, no longer JSON
        fh.seek(8)
        fh.write(b"{" * hlen)
    raises(ModelFileError, lambda: open_checkpoint(model), str(st), "corrupt")
    assert_main_error(capsys, ["inspect", model], str(st), "corrupt safetensors")


# -- 3. config.json -------------------------------------------------------------------
def _with_config(tiny: Path, dst: Path, text: str) -> Path:
    model = copy_model(tiny, dst)
    (model / "config.json").write_text(text)
    return model


def test_unknown_architecture_lists_supported(tiny, tmp_path, cli):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoForCausalLM"]
    model = _with_config(tiny, tmp_path / "m", json.dumps(cfg))
    hf = supported()["hf"]
    assert "MixtralForCausalLM" in hf and len(hf) >= 4
    needles = ("GPTNeoForCausalLM", str(model / "config.json"), *hf)
    err = raises(UnsupportedArchitectureError, lambda: load(model), *needles)
    assert err.supported == hf
    line = assert_cli_error(cli("inspect", model), *needles)
    assert "supported: " + ", ".join(hf) in line


@pytest.mark.parametrize("case", ["no-architectures", "empty-list", "malformed"])
def test_bad_config_json(tiny, tmp_path, case, cli):
    cfg = json.loads((tiny / "config.json").read_text())
    if case == "no-architectures":
        del cfg["architectures"]
        text, exc, needle = json.dumps(cfg), ConfigError, "no 'architectures' list"
    elif case == "empty-list":
        cfg["architectures"] = []
        text, exc, needle = json.dumps(cfg), ConfigError, "no 'architectures' list"
    else:
        text, exc, needle = (
            '{"architectures": ["Mixtral',
            ModelFileError,
            "not valid JSON",
        )
    model = _with_config(tiny, tmp_path / "m", text)
    path = str(model / "config.json")
    raises(exc, lambda: open_checkpoint(model), path, needle)
    assert_cli_error(cli("run", model, "-p", "hi"), path, needle)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("hidden_size", "64", "hidden_size must be a positive integer, got '64'"),
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer"),
        ("num_hidden_layers", None, "num_hidden_layers must be a positive integer"),
        ("hidden_size", 64.5, "hidden_size must be a positive integer, got 64.5"),
        ("rms_norm_eps", "tiny", "rms_norm_eps must be a number"),
        ("num_key_value_heads", 3, "n_head 4 is not a multiple of n_head_kv 3"),
        ("rope_parameters", "yes", "cannot read it as MixtralForCausalLM"),
    ],
)
def test_bad_config_values(tiny, tmp_path, capsys, key, value, needle):
    """Values the families would do arithmetic on fail as ConfigError naming the
    file and key, not as a TypeError or ZeroDivisionError."""
    cfg = json.loads((tiny / "config.json").read_text())
    cfg[key] = value
    model = _with_config(tiny, tmp_path / "m", json.dumps(cfg))
    path = str(model / "config.json")
    raises(ConfigError, lambda: open_checkpoint(model), path, needle)
    assert_main_error(capsys, ["inspect", model], path, needle)


# -- 4. GGUF ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wrong-magic", "random", "random-after-magic"])
def test_not_a_gguf(tmp_path, kind, cli):
    rng = np.random.default_rng(0)
    path = tmp_path / "model.gguf"
    if kind == "wrong-magic":
        path.write_bytes(b"GGUX" + struct.pack("<I", 3) + bytes(64))
        needles = ("not a GGUF file", "b'GGUX'", "expected b'GGUF'")
    elif kind == "random":
        data = rng.bytes(4096)
        assert data[:4] != b"GGUF"
        path.write_bytes(data)
        needles = ("not a GGUF file", "expected b'GGUF'")
    else:
        path.write_bytes(b"GGUF" + rng.bytes(4096))
        needles = ("corrupt GGUF",)
    raises(ModelFileError, lambda: open_checkpoint(path), str(path), *needles)
    raises(ModelFileError, lambda: load(path), str(path), *needles)
    assert_cli_error(cli("run", path, "-p", "hi"), str(path), *needles)


def test_gguf_truncated_in_tensor_data(tiny_gguf, tmp_path, cli):
    import gguf

    reader = gguf.GGUFReader(tiny_gguf)
    last = max(reader.tensors, key=lambda t: t.data_offset + t.n_bytes)
    end = int(last.data_offset + last.n_bytes)
    del reader
    data = tiny_gguf.read_bytes()
    assert end <= len(data)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: end - 10])
    needles = (
        str(path),
        f"truncated: tensor {last.name!r} ends at byte {end}",
        f"file has {end - 10} bytes",
    )
    raises(ModelFileError, lambda: open_checkpoint(path), *needles)
    raises(ModelFileError, lambda: load(path), *needles)
    assert_cli_error(cli("run", path, "-p", "hi"), *needles)


@pytest.mark.parametrize("size", [8, 30, 2000])
def test_gguf_truncated_in_header(tiny_gguf, tmp_path, capsys, size):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:size])
    needles = (str(path), "truncated: the header needs byte", f"file has {size} bytes")
    raises(ModelFileError, lambda: open_checkpoint(path), *needles)
    assert_main_error(capsys, ["inspect", path], *needles)


def _tiny_gguf(path: Path, **overrides) -> Path:
    """A header-only ``llama`` GGUF (one tensor) with some metadata replaced."""
    import gguf

    kv = {
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.block_count": 1,
        "llama.vocab_size": 16,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.feed_forward_length": 32,
        **overrides,
    }
    w = gguf.GGUFWriter(path, "llama")
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({}, "missing tensors: output_norm.weight"),
        (
            {"llama.embedding_length": "wide"},
            "metadata llama.embedding_length must be a positive integer, got 'wide'",
        ),
        (
            {"llama.attention.head_count": 0},
            "metadata llama.attention.head_count must be a positive integer, got 0",
        ),
        ({"llama.rope.freq_base": "high"}, "bad llama.* metadata"),
    ],
)
def test_gguf_bad_metadata(tmp_path, capsys, overrides, needle):
    path = _tiny_gguf(tmp_path / "m.gguf", **overrides)
    raises(ModelFileError, lambda: open_checkpoint(path), str(path), needle)
    assert_main_error(capsys, ["inspect", path], needle)


def test_gguf_corrupted_header_bytes_stay_typed(tiny_gguf, tmp_path):
    """Random damage to the metadata and tensor table: a typed error or a
    checkpoint, never an exception from inside gguf-py or numpy."""
    data = tiny_gguf.read_bytes()
    rng = np.random.default_rng(7)
    path = tmp_path / "damaged.gguf"
    typed = 0
    for _ in range(150):
        b = bytearray(data)
        for pos in rng.integers(4, 12000, size=2):
            b[int(pos)] = int(rng.integers(0, 256))
        path.write_bytes(bytes(b))
        try:
            open_checkpoint(path).close()
        except EdgeMoEError as e:
            assert "\n" not in str(e)
            typed += 1
    assert typed > 50  # the damage did reach the parser


# -- 5. prompt longer than the context -------------------------------------------------
def test_prompt_longer_than_context_cli(fixture_dir, tmp_path, cli):
    proc = cli("run", fixture_dir, "-p", LONG_TEXT, "-c", 16)
    line = assert_cli_error(proc, "longer than the context of 16 tokens", "--ctx")
    assert "prompt of " in line
    assert proc.stdout == ""  # the refused prompt is not echoed first


def test_prompt_longer_than_context_api(fixture_dir):
    with load(fixture_dir, n_ctx=16) as model:
        n = len(model.tokenize(LONG_TEXT))
        assert n > 16
        raises(
            ContextOverflowError,
            lambda: list(model.generate(LONG_TEXT, max_tokens=4)),
            f"prompt of {n} tokens",
            "context of 16 tokens",
        )
        raises(
            ContextOverflowError,
            lambda: model.logits(list(range(17))),
            "17 tokens do not fit the context of 16",
        )
        # The model is still usable afterwards.
        assert model.logits(list(range(16))).shape == (16, model.spec.n_vocab)


# -- tensors: missing, extra, mis-shaped -----------------------------------------------
EXPERT = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def test_missing_expert_tensor(tiny, tmp_path, capsys):
    model = edit_tensors(copy_model(tiny, tmp_path / "m"), lambda t: t.pop(EXPERT))
    raises(
        ModelFileError, lambda: load(model), str(model), f"missing tensors: {EXPERT}"
    )
    assert_main_error(capsys, ["run", model, "-p", "hi"], f"missing tensors: {EXPERT}")


def test_missing_plain_tensor_uses_checkpoint_name(tiny, tmp_path):
    model = edit_tensors(
        copy_model(tiny, tmp_path / "m"), lambda t: t.pop("model.norm.weight")
    )
    raises(
        ModelFileError, lambda: open_checkpoint(model), "missing tensors: model.norm"
    )


def test_expert_beyond_config(tiny, tmp_path):
    name = "model.layers.0.block_sparse_moe.experts.7.w1.weight"

    def add(t):
        t[name] = np.zeros((96, 64), np.float32)

    model = edit_tensors(copy_model(tiny, tmp_path / "m"), add)
    raises(
        ModelFileError,
        lambda: open_checkpoint(model),
        repr(name),
        "is expert 7, but config.json has 4 experts",
    )


def test_extra_unknown_tensor(tiny, tmp_path, capsys):
    name = "model.layers.0.mlp.adapter.weight"

    def add(t):
        t[name] = np.zeros((4, 64), np.float32)

    model = edit_tensors(copy_model(tiny, tmp_path / "m"), add)
    needles = ("tensors not used by MixtralForCausalLM", name)
    raises(ModelFileError, lambda: open_checkpoint(model), str(model), *needles)
    assert_main_error(capsys, ["inspect", model], *needles)


@pytest.mark.parametrize("shape", [(64, 32), (32, 60)], ids=["transposed", "narrow"])
def test_tensor_with_wrong_shape(tiny, tmp_path, capsys, shape):
    """k_proj is [32, 64]; a transposed copy holds as many values and must be
    refused all the same, not reshaped into a wrong matrix."""
    name = "model.layers.0.self_attn.k_proj.weight"

    def swap(t):
        t[name] = np.zeros(shape, np.float32)

    model = edit_tensors(copy_model(tiny, tmp_path / "m"), swap)
    needles = (repr(name), f"has shape {list(shape)}, expected [32, 64]")
    raises(
        ModelFileError, lambda: load(model), str(model / "model.safetensors"), *needles
    )
    assert_main_error(capsys, ["run", model, "-p", "hi"], *needles)


def test_non_float_tensor(tiny, tmp_path):
    def to_int(t):
        t["model.norm.weight"] = np.ones(64, np.int32)

    model = edit_tensors(copy_model(tiny, tmp_path / "m"), to_int)
    raises(ModelFileError, lambda: load(model), "'model.norm.weight'", "I32")


# -- eval --text -----------------------------------------------------------------------
def test_eval_text_missing(tiny, tmp_path, capsys):
    text = tmp_path / "missing.txt"
    assert_main_error(capsys, ["eval", tiny, "--text", text], str(text), "No such file")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert_main_error(
        capsys,
        ["eval", tiny, "--text", tmp_path / "latin1.txt"],
        "latin1.txt",
        "not UTF-8",
    )


def test_run_prompt_file_missing_or_not_text(tiny, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    assert_main_error(capsys, ["run", tiny, "-f", prompt], str(prompt), "cannot read")
    prompt.write_bytes(b"\xff\xfe\x00binary")
    assert_main_error(capsys, ["run", tiny, "-f", prompt], str(prompt), "not UTF-8")


# -- token ids -------------------------------------------------------------------------
def test_token_ids_out_of_vocabulary(tiny_loaded):
    m = tiny_loaded
    v = m.spec.n_vocab
    raises(ConfigError, lambda: m.logits([1, 2, v]), f"token id {v}", f"0..{v - 1}")
    raises(ConfigError, lambda: m.logits([-1, 2]), "token id -1")
    raises(ConfigError, lambda: m.logits([1, 2**70]), f"token id {2**70}")
    raises(ConfigError, lambda: m.logits(np.array([5, v + 3], np.uint32)), f"{v + 3}")
    raises(ConfigError, lambda: m.logits([1, 2.5]), "integers, got 2.5 at index 1")
    raises(ConfigError, lambda: m.logits([7, "a"]), "integers, got 'a' at index 1")
    raises(ConfigError, lambda: m.logits(np.ones(3)), "integers, got 1.0 at index 0")
    raises(ConfigError, lambda: m.logits([[1, 2]]), "1-D", "(1, 2)")
    raises(ConfigError, lambda: m.logits([]), "at least one token")
    raises(ConfigError, lambda: list(m.generate([3, v], max_tokens=1)), f"token id {v}")
    assert m.logits([1, 2, v - 1]).shape == (3, v)


# -- options ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, needles",
    [
        (dict(n_ctx=-1), ("n_ctx must be >= 0, got -1",)),
        (dict(n_ctx="16"), ("n_ctx must be an integer, got '16'",)),
        (dict(n_ctx=10**9), ("n_ctx 1000000000", "context of 512 tokens")),
        (dict(n_batch=0), ("n_batch must be >= 1, got 0",)),
        (dict(n_threads=0), ("n_threads must be in 1..512, got 0",)),
        (dict(device="tpu"), ("device must be", "'tpu'")),
        (dict(n_ctxx=16), ("unknown load option(s) ['n_ctxx']", "'n_ctx'")),
    ],
)
def test_bad_load_option(tiny, options, needles):
    raises(ConfigError, lambda: load(tiny, **options), *needles)


def test_bad_generate_option(tiny_loaded):
    m = tiny_loaded
    raises(ConfigError, lambda: list(m.generate("hi", max_token=3)), "['max_token']")
    raises(ConfigError, lambda: list(m.generate("hi", temperature=-1)), "temperature")
    raises(ConfigError, lambda: list(m.generate("hi", top_p=0)), "top_p")
    raises(ConfigError, lambda: list(m.generate(42)), "prompt must be")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["-c", "-1"], "n_ctx must be >= 0, got -1"),
        (["-t", "0"], "n_threads must be in 1..512, got 0"),
        (["-n", "-1"], "max_tokens must be >= 0, got -1"),
        (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    ],
)
def test_bad_option_value_cli(tiny, capsys, argv, needle):
    assert_main_error(capsys, ["run", tiny, "-p", "hi", *argv], needle)


def test_bad_option_value_cli_subprocess(tiny, tmp_path, cli):
    assert_cli_error(cli("run", tiny, "-p", "hi", "-c", "-1"), "n_ctx")


def test_usage_errors_exit_2(tiny, capsys):
    for argv in (
        ["run", str(tiny)],  # neither -p nor -f
        ["run", str(tiny), "-p", "a", "-f", "b"],
        ["run", str(tiny), "-p", "hi", "-c", "lots"],
        ["run", str(tiny), "-p", "hi", "--device", "tpu"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
        err = capsys.readouterr().err
        assert "usage:" in err and "Traceback" not in err


# -- outputs: nothing a user had is overwritten ----------------------------------------
def test_export_gguf_refuses_existing_output(fixture_dir, tmp_path, capsys):
    from edgemoe.converters.llama_gguf import write_gguf

    out = tmp_path / "model.gguf"
    before = b"a file the user had\n" * 100
    out.write_bytes(before)
    ckpt = open_checkpoint(fixture_dir)
    try:
        raises(
            ModelFileError,
            lambda: write_gguf(ckpt, out, "Q8_0"),
            str(out),
            "already exists",
            "--force",
        )
    finally:
        ckpt.close()
    assert_main_error(
        capsys, ["export-gguf", fixture_dir, "-o", out], str(out), "already exists"
    )
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_failed_forced_export_keeps_existing_output(tiny, tmp_path, capsys):
    """--force replaces the file only once the new one is complete: a tensor that
    fails to load halfway leaves the old file as it was and no partial file."""

    def to_int(t):
        t["model.norm.weight"] = np.ones(64, np.int32)

    model = edit_tensors(copy_model(tiny, tmp_path / "m"), to_int)
    out = tmp_path / "model.gguf"
    before = b"GGUF keep me" * 50
    out.write_bytes(before)
    assert_main_error(
        capsys,
        ["export-gguf", model, "-o", out, "--force", "--type", "F16"],
        "model.norm.weight",
        "not a float type",
    )
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "model.gguf"]


def test_export_gguf_bad_output_paths(tiny, tmp_path, capsys):
    assert_main_error(
        capsys,
        ["export-gguf", tiny, "-o", tmp_path, "--force"],
        str(tmp_path),
        "is a directory",
    )
    nowhere = tmp_path / "no-dir" / "x.gguf"
    assert_main_error(
        capsys, ["export-gguf", tiny, "-o", nowhere], "no-dir", "no such directory"
    )
    assert_main_error(
        capsys,
        ["export-gguf", tiny, "-o", tmp_path / "x.gguf", "--type", "Q9_9"],
        "'Q9_9'",
        "Q8_0",
    )
    assert list(tmp_path.iterdir()) == []


def test_synth_unknown_preset(tmp_path, capsys):
    from edgemoe.converters import synth

    raises(
        ConfigError,
        lambda: synth.preset_config("mixtral-9x9b"),
        "'mixtral-9x9b'",
        *synth.PRESETS,
    )
    out = tmp_path / "out"
    assert_main_error(
        capsys,
        ["synth", "--preset", "mixtral-9x9b", "-o", out],
        "unknown preset 'mixtral-9x9b'",
        "demo",
    )
    assert not out.exists()


def test_synth_refuses_existing_outputs(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for extra in ([], ["--force"]):
        assert_main_error(capsys, ["synth", "-o", f, *extra], str(f), "is a file")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert_main_error(capsys, ["synth", "-o", d], str(d), "not empty")
    assert_main_error(
        capsys, ["synth", "--gguf", "Q8_0", "-o", f], str(f), "already exists"
    )
    assert f.read_text() == "mine"
    assert [p.name for p in d.iterdir()] == ["keep.txt"]
