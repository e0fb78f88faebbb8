"""GGUF vocabularies tokenized by llama.cpp itself (vocab-only model load).

Reimplementing llama.cpp's tokenizers (BPE pre-tokenizer regexes per model,
SentencePiece, WordPiece ...) would be a second source of truth; loading the
vocabulary alone costs no weights and splits text exactly as llama.cpp does.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from edgemoe.checkpoint.tokenizer import Tokenizer
from edgemoe.env import prepare_environment
from edgemoe.errors import ModelFileError

_LOG_CB = None


def quiet_llama(llama_cpp) -> None:
    """Route llama.cpp's log lines to nowhere (they would interleave with output)."""
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


# tokenizer.ggml.model values llama.cpp's vocab loader knows (0.3.x).
KNOWN_MODELS = ("no_vocab", "none", "llama", "bert", "gpt2", "t5", "rwkv", "plamo2")


def check_vocab(fields: dict[str, Any], n_vocab: int, path: str | Path) -> None:
    """Refuse what llama.cpp's vocab loader asserts on (an abort that takes
    the process down) or reads past: duplicate token strings, an unknown
    tokenizer model, parallel arrays of other lengths, fewer tokens than
    the model has logits (a sampled id llama.cpp could not look up)."""

    def bad(problem: str) -> ModelFileError:
        return ModelFileError(path, f"GGUF vocabulary: {problem}")

    model = fields.get("tokenizer.ggml.model")
    if model not in KNOWN_MODELS:
        raise bad(f"tokenizer.ggml.model {model!r} is not one of {KNOWN_MODELS}")
    tokens = fields.get("tokenizer.ggml.tokens")
    if model in ("no_vocab", "none"):
        raise bad("the GGUF has no vocabulary to tokenize with")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise bad("tokenizer.ggml.tokens must be a list of strings")
    # llama.cpp reads token strings as C strings: "a\0b" is "a" to it, and
    # then a duplicate (its assert) though distinct here.
    if any("\0" in t for t in tokens):
        i = next(i for i, t in enumerate(tokens) if "\0" in t)
        raise bad(f"token {i} contains a NUL byte")
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise bad(f"token {dup!r} appears more than once in tokenizer.ggml.tokens")
    if len(tokens) < n_vocab:
        raise bad(f"{len(tokens)} tokens for a model with {n_vocab} logits")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        arr = fields.get(key)
        if arr is not None and (not isinstance(arr, list) or len(arr) != len(tokens)):
            n = len(arr) if isinstance(arr, list) else type(arr).__name__
            raise bad(f"{key} has {n} entries for {len(tokens)} tokens")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None and not (
        isinstance(merges, list) and all(isinstance(m, str) for m in merges)
    ):
        raise bad("tokenizer.ggml.merges must be a list of strings")


class LlamaVocab(Tokenizer):
    """The tokenizer stored in a GGUF file, run by llama.cpp."""

    def __init__(
        self,
        path: str | Path,
        chat_template: str | None = None,
        fields: dict[str, Any] | None = None,
        n_vocab: int = 0,
    ):
        """``fields``: the GGUF's ``tokenizer.*`` metadata, checked (see
        ``check_vocab``) before llama.cpp's loader sees the file."""
        if fields is not None:
            check_vocab(fields, n_vocab, path)
        prepare_environment()
        import llama_cpp

        self._l = llama_cpp
        quiet_llama(llama_cpp)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelFileError(path, "llama.cpp could not load the GGUF vocabulary")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        v = self._vocab
        self.origin = str(path)
        bos = llama_cpp.llama_vocab_bos(v)
        self.bos_id = bos if bos >= 0 else None
        self._n = llama_cpp.llama_vocab_n_tokens(v)
        # Every end-of-generation token llama.cpp knows (eos, eot, eom ...).
        is_eog = llama_cpp.llama_vocab_is_eog
        self.eos_ids = tuple(t for t in range(self._n) if is_eog(v, t))
        self.bos_token = self._piece(bos, special=True) if bos >= 0 else ""
        eos = llama_cpp.llama_vocab_eos(v)
        self.eos_token = self._piece(eos, special=True) if eos >= 0 else ""
        if chat_template is None:
            raw = llama_cpp.llama_model_chat_template(self._model, None)
            chat_template = raw.decode("utf-8", "replace") if raw else None
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._n

    def _piece(self, token: int, special: bool) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self._l.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            out = (self._l.llama_token * cap)()
            # add_special adds BOS only where the vocabulary asks for it.
            n = self._l.llama_tokenize(
                self._vocab, data, len(data), out, cap, add_special, True
            )
            if n >= 0:
                return list(out[:n])
            cap = -n

    def decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        arr = (self._l.llama_token * len(ids))(*ids)
        cap = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self._l.llama_detokenize(
                self._vocab, arr, len(ids), buf, cap, True, False
            )
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n

    def close(self) -> None:
        if self._model:
            self._l.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
