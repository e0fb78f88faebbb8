"""Each finding of the fuzzer's long runs (fuzz/run.py: 1,000, then 2,000,
then 10,000 cases per reader), as a regression test: a typed one-line error,
or a correct run."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from expect import assert_cli_error

from edgemoe.checkpoint.chat_template import render_chat
from edgemoe.errors import ConfigError

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def hf(tiny_model, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(tiny_model("mixtral"), dst)
    return dst


def rewrite_safetensors_header(path, change) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    blob = change(header)
    if not isinstance(blob, bytes):
        blob = json.dumps(blob).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda h: b"[" * 100_000 + b"]" * 100_000, "nested"),
        (lambda h: h[first_tensor(h)].update(dtype=["F32"]) or h, "unsupported dtype"),
        (lambda h: h[first_tensor(h)].update(dtype={"a": 1}) or h, "unsupported dtype"),
        (lambda h: h[first_tensor(h)].update(shape=[1.5, 2]) or h, "must be integers"),
        (lambda h: h[first_tensor(h)].update(shape=[2**32, 2**32]) or h, "do not hold"),
    ],
    ids=["deep", "dtype-list", "dtype-dict", "shape-float", "shape-wraps"],
)
def test_safetensors_header(hf, cli, change, needle):
    path = next(hf.glob("*.safetensors"))
    rewrite_safetensors_header(path, change)
    assert_cli_error(cli("inspect", hf), needle)


def test_deep_config_json(hf, cli):
    (hf / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_cli_error(cli("inspect", hf), "nested")


def test_surrogate_special_token_is_ignored(hf, cli):
    path = hf / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["eos_token"] = "\udcff"
    path.write_text(json.dumps(cfg))
    proc = cli("run", hf, "--chat", "-p", "hi", "-n", "1")
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_thread_count_is_bounded(hf, cli):
    assert_cli_error(cli("run", hf, "-p", "hi", "-n", "1", "-t", "100000"), "1..512")


@pytest.mark.parametrize(
    "template",
    ["{{ lipsum(1000000000) }}", "{{ messages|tojson(indent=1000000000) }}"],
)
def test_template_size_arguments(template):
    with pytest.raises(ConfigError, match="refused"):
        render_chat(template, MSGS)


def test_ordinary_lipsum_and_tojson_still_work():
    assert render_chat("{{ messages|tojson(indent=2) }}", MSGS).startswith("[")
    assert len(render_chat("{{ lipsum(1, html=False, min=5, max=10) }}", MSGS)) > 5


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(source=7), "source must be an object"),
        (lambda d: d["experts"].__setitem__(0, 3), "not experts"),
        (lambda d: d["experts"][0][0][0].update(crc32=1e400), "bad entry"),
        (lambda d: d["experts"][0][0][0].update(offset=1.5), "bad entry"),
        (lambda d: d["experts"][0][0][0].update(crc32=2**32), "bad entry"),
        (lambda d: d.update(chat_template=[1]), "chat_template must be a string"),
        (lambda d: d.update(shifts=7), "shifts"),
        (lambda d: d["hotness"][0][0].update(weight=10**400), "hotness"),
        (lambda d: d["hotness"][0].append(d["hotness"][0][0]), "has 9 entries"),
        (lambda d: d["hotness"][0].pop(), "has 7 entries"),
        # A part of 1 byte was read, then failed to reshape in an I/O thread
        # while the step waited for it (the fuzzer's manifest #170).
        (lambda d: d["experts"][0][0][1]["parts"][1].__setitem__(1, 1), "parts of"),
        (lambda d: d.update(expert_dim=1.5), "expert_dim 1.5"),
        (lambda d: d.update(expert_dim=10**9), "expert_dim 1000000000"),
        (lambda d: d.update(expert_dim=d["spec"]["n_embd"] - 1), "expert_dim"),
    ],
    ids=[
        "source",
        "experts",
        "crc-inf",
        "offset",
        "crc-33",
        "tpl",
        "shifts",
        "hot",
        "hot-grown",
        "hot-shrunk",
        "part-size",
        "dim-float",
        "dim-huge",
        "dim-short",
    ],
)
def test_manifest_entries(converted_fixture, tmp_path, cli, edit, needle):
    model = tmp_path / "m"
    shutil.copytree(converted_fixture, model)
    path = model / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d).replace("Infinity", "1e400"))
    assert_cli_error(cli("inspect", model), needle)


@pytest.mark.parametrize(
    "normalizer",
    [[""], "NFC", {"normalizers": []}, {"type": "Sequence", "normalizers": [[""]]}],
    ids=["list", "string", "no-type", "nested"],
)
def test_tokenizer_parts_must_be_typed_objects(hf, cli, normalizer):
    """A normalizer given as [""] was accepted by the tokenizers library and
    then panicked in Rust mid-encode (a backtrace, then a traceback)."""
    path = hf / "tokenizer.json"
    data = json.loads(path.read_text())
    data["normalizer"] = normalizer
    path.write_text(json.dumps(data))
    line = assert_cli_error(
        cli("run", hf, "--chat", "-p", "hi", "-n", "2"), "normalizer"
    )
    assert "must be an object with a" in line


def test_a_panic_inside_tokenizers_is_a_typed_error(hf):
    from edgemoe.checkpoint.tokenizer import HFTokenizer
    from edgemoe.errors import ModelFileError

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    class Panics:
        def encode(self, *a, **k):
            raise PanicException("index out of bounds")

        decode = encode

    tok = HFTokenizer(hf)
    tok._tok = Panics()
    with pytest.raises(ModelFileError, match="failed to encode: index out of bounds"):
        tok.encode("hi")
    with pytest.raises(ModelFileError, match="failed to decode"):
        tok.decode([1])


def test_nul_in_a_tokenizer_model_string(hf, cli):
    """A NUL in the BPE model's continuing_subword_prefix aborted the process
    inside tokenizers (a panic at its FFI boundary): refused before it loads."""
    path = hf / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["continuing_subword_prefix"] = "\u0000"
    path.write_text(json.dumps(data))
    assert_cli_error(
        cli("run", hf, "--chat", "-p", "hi", "-n", "2"),
        "model.continuing_subword_prefix contains a NUL character",
    )
