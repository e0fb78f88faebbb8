"""A GGUF vocabulary is checked before llama.cpp's vocab loader sees it:
duplicate token strings made it abort the process (GGML_ASSERT)."""

from __future__ import annotations

import pytest

import edgemoe
from edgemoe.checkpoint import open_checkpoint
from edgemoe.converters.llama_gguf import hf_vocab_fields, write_gguf
from edgemoe.errors import ModelFileError


def gguf_with_vocab(tiny_model, tmp_path, change):
    src = tiny_model("mixtral")
    ckpt = open_checkpoint(src)
    try:
        vocab = hf_vocab_fields(src, ckpt.spec.n_vocab)
        change(vocab)
        return write_gguf(ckpt, tmp_path / "m.gguf", "Q8_0", vocab=vocab)
    finally:
        ckpt.close()


def dup(v):
    v["tokenizer.ggml.tokens"][5] = v["tokenizer.ggml.tokens"][6]


def short(v):
    v["tokenizer.ggml.tokens"] = v["tokenizer.ggml.tokens"][:-3]
    v["tokenizer.ggml.token_type"] = v["tokenizer.ggml.token_type"][:-3]


def types(v):
    v["tokenizer.ggml.token_type"] = v["tokenizer.ggml.token_type"][:-1]


def nul(v):
    v["tokenizer.ggml.tokens"][7] = v["tokenizer.ggml.tokens"][7][:1] + "\0x"


def model(v):
    v["tokenizer.ggml.model"] = "sentencepiece-ish"


@pytest.mark.parametrize(
    "change, needle",
    [
        (dup, "appears more than once"),
        (short, "tokens for a model with"),
        (types, "token_type has"),
        (nul, "contains a NUL byte"),
        (model, "tokenizer.ggml.model 'sentencepiece-ish'"),
    ],
)
def test_bad_vocabulary_is_a_typed_error(tiny_model, tmp_path, cli, change, needle):
    path = gguf_with_vocab(tiny_model, tmp_path, change)
    with pytest.raises(ModelFileError, match="GGUF vocabulary"):
        edgemoe.load(path)
    proc = cli("run", path, "-p", "hi", "-n", "1")
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-500:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_good_vocabulary_loads(tiny_model, tmp_path):
    path = gguf_with_vocab(tiny_model, tmp_path, lambda v: None)
    with edgemoe.load(path) as m:
        assert m.detokenize(m.tokenize("hello")) == "hello"
