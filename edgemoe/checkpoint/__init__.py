"""Readers for the checkpoints users already have (HF safetensors, GGUF)."""

from __future__ import annotations

from pathlib import Path

from edgemoe.errors import ModelFileError


def open_checkpoint(path: str | Path, in_memory: bool = False):
    """An ``HFCheckpoint`` for a model directory, a ``GGUFCheckpoint`` for a
    GGUF file; a ModelFileError naming the path for anything else.
    ``in_memory``: a converted model reads its backbone instead of mapping it."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "no such file or directory")
    if p.is_dir():
        if (p / "manifest.json").exists():
            from edgemoe.format.reader import EdgeCheckpoint

            return EdgeCheckpoint(p, in_memory=in_memory)
        if (p / "config.json").exists():
            from edgemoe.checkpoint.hf import HFCheckpoint

            return HFCheckpoint(p)
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (did you mean {ggufs[0]}?)" if ggufs else ""
        raise ModelFileError(p, f"not a model directory: no config.json{hint}")
    if p.suffix in (".safetensors", ".json"):
        raise ModelFileError(
            p, f"an HF checkpoint is loaded as a directory: pass {p.parent}"
        )
    from edgemoe.checkpoint.gguf_file import GGUFCheckpoint

    return GGUFCheckpoint(p)


def tokenizer_for(ckpt):
    """The tokenizer a checkpoint carries: ``tokenizer.json`` through the
    tokenizers library, or a GGUF vocabulary through llama.cpp."""
    from edgemoe.checkpoint.tokenizer import HFTokenizer

    spec = ckpt.spec
    root = getattr(ckpt, "root", None)
    manifest = getattr(ckpt, "manifest", None)
    if root is not None and (manifest is None or manifest.tokenizer == "hf"):
        return HFTokenizer(root, spec.eos_token_ids, spec.bos_token_id)
    from edgemoe.checkpoint.llama_vocab import LlamaVocab

    gguf = ckpt.backbone if manifest is not None else ckpt
    template = manifest.chat_template if manifest is not None else None
    return LlamaVocab(
        gguf.path, template, fields=gguf.tokenizer_fields(), n_vocab=spec.n_vocab
    )
