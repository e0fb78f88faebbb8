"""Synthetic MoE checkpoints with RANDOM weights, built offline in seconds.

For demos, tests and benchmarks at realistic shapes; the text they generate is
noise. Every directory and file written here says so in its metadata.
Weights are drawn from a fixed pool of seeded normal values (tiled), so a
multi-GB model is written at disk speed rather than at RNG speed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.arch import family_for_hf
from edgemoe.arch.validate import check_int, check_kind
from edgemoe.checkpoint.base import GGML_F32, Weight, tensor_layout
from edgemoe.converters.synth_presets import PRESETS
from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.format.lock import OutputLock

LABEL = "EdgeMoE synthetic model: RANDOM WEIGHTS, for demos and benchmarks only"

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def preset_config(
    preset: str, layers: int | None = None, routing=None, **overrides: Any
) -> dict:
    """An HF ``config.json`` dict for a preset, optionally with fewer layers
    and a designed routing (``synth_routing.TopicRouting``)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    if layers is not None:
        cfg["num_hidden_layers"] = check_kind("layers", layers, "n_layer")
    cfg.update(overrides)
    if routing is not None:
        cfg["edgemoe_routing"] = routing.to_dict()
    cfg.update(
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        edgemoe_synthetic=LABEL,
    )
    # The same checks as a config.json read from disk, before anything is sized
    # from these numbers (a 10**6-layer tensor table, a 10**9-row pool).
    try:
        family_for_hf(cfg["architectures"][0]).spec_from_hf(cfg)
    except ConfigError as e:
        msg = str(e).removeprefix("config.json: ")
        raise ConfigError(f"synth preset {preset!r}: {msg}") from None
    return cfg


def train_tokenizer(vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on Python's own standard library
    sources, which every Python install has: no download, a second or two."""
    import os

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    size = max(vocab_size, 256 + len(SPECIAL_TOKENS))
    trainer = trainers.BpeTrainer(
        vocab_size=min(size, 8192),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stdlib = Path(os.__file__).parent
    corpus = [
        (stdlib / name).read_text(encoding="utf-8", errors="replace")
        for name in ("os.py", "textwrap.py", "argparse.py", "json/encoder.py")
        if (stdlib / name).exists()
    ] or ["the quick brown fox jumps over the lazy dog " * 100]
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_tokenizer(root: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json (with a chat template) in ``root``."""
    tok = train_tokenizer(vocab_size)
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(f"vocab_size {vocab_size} is below the tokenizer's minimum")
    tok.save(str(root / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


class SyntheticCheckpoint:
    """A Checkpoint whose tensors are drawn on demand (seeded, reproducible).

    ``qtype`` set: matrices come back already in that ggml type (tiled from a
    quantized pool), so a GGUF writer copies them instead of quantizing.
    """

    POOL = 1 << 20

    def __init__(self, config: dict, seed: int = 0, qtype: int | None = None):
        # numpy refuses a negative seed with a bare ValueError.
        check_int("seed", seed, 0, 2**63 - 1, "")
        self.config = config
        self.architecture = config["architectures"][0]
        self.family = family_for_hf(self.architecture)
        self.spec = self.family.spec_from_hf(config)
        self.path = f"synthetic:{self.architecture}"
        self.root = None
        self._layout = tensor_layout(self.spec)
        rng = np.random.default_rng(seed)
        self._pool = (rng.standard_normal(self.POOL) * 0.02).astype(np.float32)
        self._qtype = qtype
        self._qpool: np.ndarray | None = None
        self._design = None
        if "edgemoe_routing" in config:
            from edgemoe.converters.synth_routing import RoutingDesign, TopicRouting

            routing = TopicRouting.from_dict(config["edgemoe_routing"])
            self._design = RoutingDesign(routing, self.spec)
        self._last: Weight | None = None
        """The last tensor loaded: HF writing asks for a stacked expert
        tensor once per expert."""

    def names(self) -> list[str]:
        return [n for n, (_, required) in self._layout.items() if required]

    def _floats(self, name: str, n: int) -> np.ndarray:
        start = hash_name(name) % self.POOL
        return np.resize(np.roll(self._pool, -start), n)

    def load(self, name: str) -> Weight:
        if self._last is None or self._last.name != name:
            self._last = self._load(name)
        return self._last

    def _load(self, name: str) -> Weight:
        shape = self._layout[name][0]
        n = int(np.prod(shape))
        if self._design is not None:
            data = self._design.tensor(
                name, shape, lambda: self._floats(name, n).reshape(shape)
            )
            if data is not None:
                return Weight(name, GGML_F32, shape, data)
        if len(shape) == 1:
            # Norm weights near 1 keep activations in a realistic range.
            data = 1.0 + self._floats(name, n)
            return Weight(name, GGML_F32, shape, data.reshape(shape))
        if self._qtype is not None:
            from edgemoe.converters.llama_gguf import tensor_type

            t = tensor_type(name, shape, self._qtype)
            if t == self._qtype:
                return self._quantized(name, shape)
        return Weight(name, GGML_F32, shape, self._floats(name, n).reshape(shape))

    def _quantized(self, name: str, shape: tuple[int, ...]) -> Weight:
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES

        from edgemoe.converters.llama_gguf import quantize_rows

        qt = GGMLQuantizationType(self._qtype)
        block, size = GGML_QUANT_SIZES[qt]
        if self._qpool is None:
            rows = self._pool.reshape(-1, block)
            self._qpool = quantize_rows(rows, self._qtype).reshape(-1, size)
        n_blocks = int(np.prod(shape)) // block
        start = hash_name(name) % len(self._qpool)
        blocks = np.resize(np.roll(self._qpool, -start, axis=0), (n_blocks, size))
        return Weight(name, int(qt), shape, blocks.reshape(*shape[:-1], -1))

    def close(self) -> None:
        pass


def hash_name(name: str) -> int:
    """A stable (not per-process-salted) hash for tensor seeding."""
    import zlib

    return zlib.crc32(name.encode())


def write_hf(
    config: dict,
    out: str | Path,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """A Hugging Face checkpoint directory (bf16 safetensors) with random
    weights; ``progress(tensor name, i, n)`` before each tensor."""
    out = Path(out)

    def check() -> None:
        if out.exists() and not out.is_dir():
            raise ModelFileError(out, "is a file; an HF checkpoint is a directory")
        if out.exists() and any(out.iterdir()) and not force:
            raise ModelFileError(out, "already exists and is not empty (use --force)")

    check()
    ckpt = SyntheticCheckpoint(config, seed)  # a bad config fails before mkdir
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFileError(out, f"cannot create: {e.strerror or e}") from None
    # Files are written in place, so a second synth of ``out`` must not
    # interleave with this one: one writer per output (edgemoe.format.lock).
    with OutputLock(out):
        check()
        try:
            out.mkdir(exist_ok=True)
        except OSError as e:
            raise ModelFileError(out, f"cannot create: {e.strerror or e}") from None
        return _write_hf(ckpt, config, out, progress)


def _write_hf(ckpt: SyntheticCheckpoint, config: dict, out: Path, progress) -> Path:
    from edgemoe.checkpoint.safetensors import write_safetensors

    tmap = ckpt.family.tensor_map
    entries = []  # (HF name, HF shape, () -> float32 array)
    covered = set()
    for hf_name, cut in _assembled(ckpt, tmap).items():
        covered.update(n for _, n in cut)
        part = type(cut[0][0])
        shapes = [(pt, ckpt._layout[n][0]) for pt, n in cut]
        shape = part.joined_shape(shapes, ckpt.spec)
        entries.append((hf_name, shape, lambda cut=cut: _assemble(ckpt, cut)))
    for name in ckpt.names():
        if name in covered:
            continue
        shape = ckpt._layout[name][0]
        for hf_name, expert in tmap.source_names(name, ckpt.spec.n_expert):
            hf_shape = shape if expert is None else shape[1:]
            if name.endswith("ffn_gate_inp_shexp.weight"):
                hf_shape = (1, shape[0])  # an nn.Linear(hidden, 1) in transformers

            def floats(name=name, expert=expert):
                w = ckpt.load(name).data
                return w if expert is None else w[expert]

            entries.append((hf_name, hf_shape, floats))

    def tensor_bytes(entry) -> bytes:
        bits = np.ascontiguousarray(entry[2](), dtype=np.float32).view(np.uint32)
        # Round to nearest even, then keep the high half: float32 -> bf16.
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()

    def data(i: int, entry) -> bytes:
        if progress is not None:
            progress(entry[0], i, len(entries))
        return tensor_bytes(entry)

    try:
        write_safetensors(
            out / "model.safetensors",
            [
                (e[0], "BF16", e[1], (lambda i=i, e=e: data(i, e)))
                for i, e in enumerate(entries)
            ],
            metadata={"format": "pt", "edgemoe": LABEL},
        )
        (out / "config.json").write_text(json.dumps(config, indent=1))
        write_tokenizer(out, ckpt.spec.n_vocab)
        (out / "README.md").write_text(f"# {LABEL}\n\nWritten by `edgemoe synth`.\n")
    except OSError as e:  # disk full, permissions
        raise ModelFileError(out, f"cannot write: {e.strerror or e}") from None
    return out


def _assembled(ckpt: SyntheticCheckpoint, tmap) -> dict[str, list]:
    """HF tensors made of several internal ones (gpt-oss's gate_up): HF name
    -> [(Part, internal name)], for the float layout (not MXFP4's)."""
    out = {}
    for src, dst in tmap.table.items():
        if isinstance(dst, str) or any(p.mxfp4 for p in dst):
            continue
        for bid in range(ckpt.spec.n_layer):
            cut = [(p, p.name.format(bid=bid)) for p in dst]
            if all(n in ckpt._layout for _, n in cut):
                out[src.format(bid=bid)] = cut
    return out


def _assemble(ckpt: SyntheticCheckpoint, cut: list):
    """The HF tensor the parts of ``cut`` [(Part, internal name)] were cut
    from (the parts' own inverse)."""
    arrays = [(part, ckpt.load(n).data) for part, n in cut]
    return type(cut[0][0]).join(arrays, ckpt.spec)


def write_gguf(
    config: dict,
    out: str | Path,
    qtype: str = "Q8_0",
    seed: int = 0,
    force: bool = False,
    progress=None,
) -> Path:
    """A llama.cpp GGUF with random weights (and a trained byte-level vocab)."""
    import tempfile

    from edgemoe.converters.llama_gguf import (
        EXPORT_TYPES,
        check_output_file,
        hf_vocab_fields,
    )
    from edgemoe.converters.llama_gguf import write_gguf as export

    if qtype not in EXPORT_TYPES:
        raise ConfigError(
            f"GGUF type {qtype!r} not supported; use one of {sorted(EXPORT_TYPES)}"
        )
    check_output_file(Path(out), force)  # before training a tokenizer for nothing
    ckpt = SyntheticCheckpoint(config, seed, qtype=EXPORT_TYPES[qtype])
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), ckpt.spec.n_vocab)
        vocab = hf_vocab_fields(Path(tmp), ckpt.spec.n_vocab)
    return export(
        ckpt, out, qtype, vocab=vocab, name=LABEL, force=force, progress=progress
    )
