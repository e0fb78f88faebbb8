"""Tokenizers: the common interface and the HF ``tokenizer.json`` implementation.

GGUF vocabularies are tokenized by llama.cpp itself (runtime/llama_vocab.py), so
text is split exactly as llama.cpp splits it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from edgemoe.checkpoint.chat_template import render_chat
from edgemoe.checkpoint.files import MAX_JSON_BYTES, parse_json, read_json, read_regular
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


# Pipeline parts of a tokenizer.json, and the keys under which a Sequence of
# them lists its members.
_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
_MEMBERS = ("normalizers", "pretokenizers", "processors", "decoders")


def _check_structure(data: Any, path: Path) -> None:
    """Each pipeline part is null or an object naming its ``type``, as the
    tokenizers library writes them. Its deserializer also takes other shapes
    (a normalizer given as ``[""]``) that then panic in Rust mid-encode, with
    a backtrace on stderr that no handler can hold back."""

    def part(value: Any, where: str) -> None:
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise ModelFileError(
                path, f'{where} must be an object with a "type", got {value!r:.60}'
            )
        for key in _MEMBERS:
            members = value.get(key)
            if members is not None:
                if not isinstance(members, list):
                    raise ModelFileError(path, f"{where}.{key} must be a list")
                for i, m in enumerate(members):
                    part(m, f"{where}.{key}[{i}]")

    def no_nul(value: Any, where: str) -> None:
        # A NUL in the BPE model's continuing_subword_prefix aborted the
        # process in tokenizers' Python binding (a panic at the FFI boundary).
        if isinstance(value, str) and "\0" in value:
            raise ModelFileError(path, f"{where} contains a NUL character")
        if isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                no_nul(v, f"{where}.{k}")

    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    model = data.get("model")
    if not isinstance(model, dict):  # old files leave out its type
        raise ModelFileError(path, "model must be an object")
    for key, value in model.items():
        if key not in ("vocab", "merges"):  # tokens may be any string
            no_nul(value, f"model.{key}")
    for key in _PARTS:
        if data.get(key) is not None:
            part(data[key], key)
            no_nul(data[key], key)


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
        _check_structure(parse_json(raw, path), path)
        self.path = path
        self._tok = self._guard(
            "cannot load tokenizer", lambda: _Tok.from_str(raw.decode("utf-8"))
        )
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

    def _guard(self, what: str, fn, *args, **kwargs):
        """``fn(*args)``; a failure inside tokenizers is a fault of this file.
        A Rust panic there (a normalizer that replaces "" indexes past a
        string) arrives as pyo3's PanicException, a BaseException."""
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001
            raise ModelFileError(self.path, f"{what}: {e}") from None

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        enc = self._guard(
            "tokenizer failed to encode", self._tok.encode, text,
            add_special_tokens=add_special,
        )  # fmt: skip
        return enc.ids

    def decode(self, ids: list[int]) -> str:
        return self._guard(
            "tokenizer failed to decode", self._tok.decode, list(ids),
            skip_special_tokens=True,
        )  # fmt: skip
