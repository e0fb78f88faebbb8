"""Tokenizers: the common interface and the HF ``tokenizer.json`` implementation.

GGUF vocabularies are tokenized by llama.cpp itself (runtime/llama_vocab.py), so
text is split exactly as llama.cpp splits it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from edgemoe.checkpoint.chat_template import render_chat
from edgemoe.checkpoint.files import MAX_JSON_BYTES, read_json, read_regular
from edgemoe.errors import ModelFileError


class Tokenizer(ABC):
    """Text <-> token ids, special tokens and the chat template."""

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    bos_token: str = ""
    eos_token: str = ""
    chat_template: str | None = None
    origin: str = ""

    @abstractmethod
    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Ids of ``text``; special-token strings in it become their ids."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens left out."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            origin=self.origin,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def _token_text(value: Any) -> str:
    # tokenizer_config.json stores special tokens as strings or AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content", "")
    text = value if isinstance(value, str) else ""
    try:  # a lone surrogate ("\udcff") makes the tokenizers library raise
        text.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return text


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` through the ``tokenizers`` library, plus the special
    tokens and chat template of ``tokenizer_config.json``."""

    def __init__(self, root: str | Path, eos_ids: tuple[int, ...] = (), bos_id=None):
        from tokenizers import Tokenizer as _Tok

        root = Path(root)
        path = root / "tokenizer.json"
        if not path.exists():
            raise ModelFileError(path, "file not found (EdgeMoE reads tokenizer.json)")
        # Read by us, not by path: a FIFO must not block, and the bytes are
        # size-capped before the Rust parser sees them.
        raw = read_regular(path, MAX_JSON_BYTES)
        try:
            self._tok = _Tok.from_str(raw.decode("utf-8"))
        except BaseException as e:  # noqa: BLE001
            # A Rust panic in tokenizers arrives as pyo3's PanicException,
            # a BaseException: a bad file, not a reason to die.
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ModelFileError(path, f"cannot load tokenizer: {e}") from None
        self.origin = str(root)
        cfg: dict[str, Any] = {}
        cfg_path = root / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = read_json(cfg_path)
            if not isinstance(cfg, dict):
                raise ModelFileError(cfg_path, "expected a JSON object")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            if not all(
                isinstance(t, dict) and isinstance(t.get("template"), str)
                for t in template
            ):
                raise ModelFileError(
                    cfg_path, "chat_template: a list must hold {name, template} objects"
                )
            named = {t.get("name"): t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            kind = type(template).__name__
            problem = f"chat_template must be a string, not {kind}"
            raise ModelFileError(cfg_path, problem)
        jinja_path = root / "chat_template.jinja"
        if template is None and jinja_path.exists():
            try:
                template = read_regular(jinja_path, 1 << 20).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ModelFileError(jinja_path, f"cannot read: {e}") from None
        self.chat_template = template
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        eos = list(eos_ids)
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            tid = self._tok.token_to_id(self.eos_token)
            if tid not in eos:
                eos.append(tid)
        self.eos_ids = tuple(eos)
        self.bos_id = bos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
