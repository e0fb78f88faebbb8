"""``edgemoe.load`` and ``Model``: weights bound into ggml, logits and generation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.checkpoint import open_checkpoint, tokenizer_for
from edgemoe.checkpoint.base import Weight
from edgemoe.errors import ConfigError, ContextOverflowError
from edgemoe.runtime import token_ids as token_ids_mod
from edgemoe.runtime.device import Device, WeightSet
from edgemoe.runtime.embedding import EmbeddingRows
from edgemoe.runtime.kv import KVCache, Sequence
from edgemoe.runtime.layers import build_layers, to_f32
from edgemoe.runtime.options import LoadOptions
from edgemoe.runtime.step import Step, StepShape
from edgemoe.runtime.step_policy import route_step, use_policy


def load(path: str | Path, **options: Any) -> Model:
    """Load a model for inference.

    Args:
        path: a Hugging Face checkpoint directory or a GGUF file.
        **options: fields of ``LoadOptions`` (``n_ctx``, ``n_threads``,
            ``n_batch``, ``device``).

    Returns:
        A ``Model`` with every weight resident.
    """
    known = {f.name for f in dataclasses.fields(LoadOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown load option(s) {unknown}; known: {sorted(known)}")
    opts = LoadOptions(**options)
    ckpt = open_checkpoint(path, in_memory=True)
    try:
        tokenizer = tokenizer_for(ckpt)
        return Model(ckpt, tokenizer, opts)
    except BaseException:
        ckpt.close()
        raise


class Model:
    """A loaded model: ``logits`` for scoring, ``generate`` for text."""

    def __init__(self, checkpoint, tokenizer, options: LoadOptions):
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        self.options = options
        self.spec = spec = checkpoint.spec
        if options.n_ctx > spec.n_ctx_train * options.n_seq_max:
            # Positions past training are untrained, and the KV cache and RoPE
            # tables are sized by n_ctx: a typo like 10**9 must not allocate.
            per = f" x {options.n_seq_max} sequences" if options.n_seq_max > 1 else ""
            raise ConfigError(
                f"n_ctx {options.n_ctx} is larger than the model's context of "
                f"{spec.n_ctx_train} tokens{per} ({checkpoint.path})"
            )
        self.n_ctx = options.n_ctx or min(spec.n_ctx_train, 4096)
        self.n_pos = min(self.n_ctx, spec.n_ctx_train)
        """Positions one sequence may reach."""
        self.path = checkpoint.path
        manifest = getattr(checkpoint, "manifest", None)
        self.device = Device(options.device, options.n_threads)
        if manifest is not None and not self.device.is_host:
            if options.slot_store == "host":
                raise ConfigError(
                    f"{checkpoint.path}: slot_store 'host' needs the CPU device; "
                    f"{self.device.name} computes from its own memory"
                )
        names = set(checkpoint.names())
        mmap = getattr(checkpoint, "mmap", None)

        def load_weight(name: str) -> Weight | None:
            return checkpoint.load(name) if name in names else None

        def base_of(w: Weight):
            # GGUF tensors are views of one mapped file: bind them through it.
            if mmap is None:
                return None
            start, addr = mmap.ctypes.data, w.data.ctypes.data
            return mmap if start <= addr < start + mmap.nbytes else None

        n_planes = len(manifest.plan.planes) if manifest else 0
        self.memory = None
        if manifest is not None:
            from edgemoe.runtime.offload import memory_plan

            self.memory = memory_plan(
                checkpoint, options.budget, self.n_ctx, options.n_batch,
                options.force_level, quality=options.quality,
                kv_type=options.kv_type,
            )  # fmt: skip
        elif options.force_level is not None or options.budget is not None:
            raise ConfigError(
                f"{checkpoint.path}: force_level and budget apply to converted "
                "models (edgemoe convert); this one stores experts at one precision"
            )
        self.weights = WeightSet(
            self.device,
            # Weights, expert planes (per layer, or shared slots), KV cache.
            capacity=len(names)
            + 8
            + 3 * n_planes * (spec.n_layer + 1)
            + 2 * spec.n_layer,
            # Repacked weights are a copy made at load, one weight at a time
            # (each source released as it is copied).
            repack=options.repack,
        )
        experts, self.routed = None, None
        if manifest is not None:
            from edgemoe.runtime.offload import setup

            experts, self.routed = setup(self, checkpoint, options, self.memory)
        layers = build_layers(spec, load_weight, self.weights, base_of, experts)
        self.embed = checkpoint.load("token_embd.weight")
        self._embedding = EmbeddingRows(self.embed, self.device.g)
        norm = to_f32(checkpoint.load("output_norm.weight"))
        out_norm = self.weights.add(norm, base_of(norm))
        out = self.embed if spec.tie_embeddings else checkpoint.load("output.weight")
        # A tied head's bytes are also the embedding rows read every token.
        out = self.weights.add(out, base_of(out), release=not spec.tie_embeddings)
        # Under a budget the whole cache is committed now: memory use is flat
        # and counted up front, not grown by the context as it fills.
        self.cache = KVCache(
            spec,
            self.n_ctx,
            self.weights,
            commit=options.budget is not None,
            kv_type=options.kv_type,
        )
        self.weights.finalize()
        if self.routed is not None and self.routed.in_memory:
            self.routed.cache.load()
        self._head = (out_norm, out)
        self.step = self._new_step(layers)
        self.seq: Sequence = self.cache.new_sequence()
        """The sequence ``eval``, ``reset`` and ``generate`` work on."""
        self.route_log: list[dict[int, np.ndarray]] | None = None
        """Set to a list to record every step's routing: per MoE layer the
        experts [R, K] (largest weight first) of the rows it computed."""

    # -- tokens ----------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ConfigError(
                f"text to tokenize must be a str, got {type(text).__name__}"
            )
        try:  # lone surrogates: bytes that were not UTF-8 (argv, a file read raw)
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"text is not valid UTF-8 (at character {e.start}): {text[:40]!r}"
            ) from None
        return self.tokenizer.encode(text, add_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _as_ids(self, token_ids) -> np.ndarray:
        return token_ids_mod.as_ids(token_ids, self.spec.n_vocab)

    def _check_tokens(self, ids: np.ndarray, pos: int) -> None:
        s = self.spec
        token_ids_mod.check(ids, pos, s.n_vocab, self.n_pos, s.n_ctx_train)

    # -- forward ---------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self.seq.n_past

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.cache.truncate(self.seq, 0)

    def common_prefix(self, token_ids, seq_id: int | None = None) -> int:
        """How many of ``token_ids``, short of the last (whose logits a caller
        needs), the sequence (the model's own by default) already holds."""
        ids = self._as_ids(token_ids).tolist()  # a ConfigError for bad ids
        n = 0
        for a, b in zip(self._sequence(seq_id).tokens, ids[:-1]):
            if a != b:
                break
            n += 1
        return n

    def reuse_prefix(self, token_ids, seq_id: int | None = None) -> int:
        """Keep the sequence's longest prefix that ``token_ids`` starts with
        (``common_prefix``) and drop the rest. Returns how many are kept."""
        n = self.common_prefix(token_ids, seq_id)
        self.cache.truncate(self._sequence(seq_id), n)
        return n

    def _sequence(self, seq_id: int | None) -> Sequence:
        return self.seq if seq_id is None else self.cache.get(seq_id)

    def eval(self, token_ids, all_logits: bool = False) -> np.ndarray:
        """Append ``token_ids`` to the cached sequence.

        Returns:
            float32 logits ``[T, vocab]`` for every new position if
            ``all_logits``, else ``[vocab]`` for the last one.
        """
        ids = self._as_ids(token_ids)
        self._check_tokens(ids, self.n_past)
        if ids.size == 0:
            raise ConfigError("eval needs at least one token")
        outs = []
        step = self.options.n_batch
        for i in range(0, ids.size, step):
            chunk = ids[i : i + step].tolist()
            logits = self._forward([(self.seq, chunk)], all_logits)
            if all_logits or i + step >= ids.size:
                outs.append(logits)
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    # -- sequences (batched decode) ------------------------------------------------
    def new_sequence(self) -> int:
        """A new, empty sequence sharing the model and its KV cache cells;
        returns its id for ``decode``."""
        return self.cache.new_sequence().id

    def free_sequence(self, seq_id: int) -> None:
        seq = self.cache.get(seq_id)
        if seq is self.seq:
            raise ConfigError("the model's own sequence cannot be freed")
        self.cache.free(seq)

    def decode(self, batch, qualities=None) -> list[np.ndarray]:
        """One graph over several sequences: ``batch`` is [(seq_id, token
        ids), ...] (each sequence at most once); each sequence attends to its
        own cache. Returns each sequence's last-token logits [vocab].
        ``qualities`` (converted models): each sequence's dual routing (a
        preset or "T1,T2"; None: the model's), so requests with different
        needs share one step."""
        items = []
        for seq_id, token_ids in batch:
            seq = self.cache.get(seq_id)
            ids = self._as_ids(token_ids)
            self._check_tokens(ids, seq.n_past)
            if ids.size == 0:
                raise ConfigError(f"sequence {seq_id}: decode needs at least one token")
            items.append((seq, ids.tolist()))
        if len({id(s) for s, _ in items}) != len(items):
            raise ConfigError("decode: a sequence appears twice in one batch")
        if not items:
            raise ConfigError("decode needs at least one sequence")
        if qualities is not None:
            if any(qualities):
                self._routed_for_quality()
            if len(qualities) != len(items):
                raise ConfigError(
                    f"{len(qualities)} qualities for {len(items)} sequences"
                )
        return list(self._forward(items, all_logits=False, qualities=qualities))

    def _forward(
        self, items: list[tuple[Sequence, list[int]]], all_logits: bool, qualities=None
    ):
        """One step over ``items``' new tokens; logits of every new token
        (``all_logits``) or of each sequence's last, [R, vocab]."""
        if self.routed is not None:
            route_step(self, [len(t) for _, t in items], qualities)
        n_new = sum(len(t) for _, t in items)
        if n_new > self.cache.n_free:
            raise ContextOverflowError(
                f"{n_new} new tokens do not fit the {self.cache.n_free} free cells "
                f"of the {self.n_ctx}-token context"
            )
        seq_ids, pos, cells, out = [], [], [], []
        for seq, toks in items:
            p0 = seq.n_past
            cells += self.cache.place(seq, toks)
            pos += range(p0, p0 + len(toks))
            seq_ids += [seq.id] * len(toks)
            out += range(len(pos) - len(toks) if all_logits else len(pos) - 1, len(pos))
        t = len(pos)
        shape = StepShape(t, self.cache.n_kv(), len(out))
        io = self.step.io(shape)
        self._embedding.into(np.array([x for _, ts in items for x in ts]), io.x)
        io.pos[...] = pos
        io.cells[...] = cells
        sids, p64, window = np.array(seq_ids), io.pos.astype(np.int64), None
        if io.mask_swa is not None:  # windowed and full layers: a mask each
            io.mask_swa[...] = self.cache.mask(
                sids, p64, shape.n_kv, self.spec.sliding_window
            )
        else:
            window = self.spec.sliding_window
        io.mask[...] = self.cache.mask(sids, p64, shape.n_kv, window)
        io.out_ids[...] = out
        # Decode steps tune the thread count (runtime/threads.py).
        tuner = self.device.tuner if t <= len(items) else None
        if tuner is not None:
            tuner.begin_step()
        try:
            self.step.run(io)
        except BaseException:
            for seq, toks in items:  # nothing of a failed step stays cached
                self.cache.truncate(seq, seq.n_past - len(toks))
            raise
        finally:
            if self.routed is not None:
                self.routed.row_policies = None
        if tuner is not None:
            tuner.end_step()
        if self.routed is not None and self.routed.resident:
            self.routed.count_resident(io.routes)
        if self.route_log is not None:
            self.route_log.append(self.step.routes(io))
        return io.logits.copy()  # the next step reuses io

    def logits(self, token_ids) -> np.ndarray:
        """Logits ``[T, vocab]`` (float32) for every position of a fresh sequence."""
        self.reset()
        return self.eval(token_ids, all_logits=True)

    def generate(self, prompt, params=None, **kwargs: Any) -> Iterator:
        """Stream a completion; see ``edgemoe.runtime.engine.generate``."""
        from edgemoe.runtime.engine import generate

        return generate(self, prompt, params, **kwargs)

    # -- facts -------------------------------------------------------------------
    @property
    def levels(self) -> tuple[int, ...]:
        """Expert levels (bits) of a converted model; (0,) for plain ones."""
        manifest = getattr(self.checkpoint, "manifest", None)
        return manifest.levels if manifest is not None else (0,)

    def counters(self) -> dict:
        """Cumulative compute/I-O/cache counters (see runtime/metrics.py)."""
        out = {
            "compute_s": self.step.compute_s,
            "io_s": 0.0,
            "stall_s": 0.0,
            "bytes_read": 0,
            "hits": [0] * len(self.levels),
            "misses": [0] * len(self.levels),
            "upgrades": 0,
            "prefetches": 0,
            "evictions": 0,
            "resident": [0] * len(self.levels),
            "expert_bytes": 0,
        }
        if self.routed is not None:
            cache = self.routed.cache
            c = cache.counters
            out.update(
                io_s=cache.io.busy_s,
                stall_s=c.stall_s,
                bytes_read=cache.io.bytes_read,
                hits=list(c.hits),
                misses=list(c.misses),
                upgrades=c.upgrades,
                prefetches=c.prefetches,
                evictions=c.evictions,
                resident=cache.resident_bytes(),
                expert_bytes=self.routed.bytes_computed,
            )
        return out

    def residency(self) -> list[tuple[int, np.ndarray]]:
        """Per MoE layer, the level (bits) each expert is resident at now; 0
        where not even plane 1 is in. Plain models: every expert at level 0."""
        if self.routed is None:
            return []
        cache = self.routed.cache
        levels = np.array((0, *self.levels), dtype=np.int64)
        out = []
        for layer in cache.moe_layers:
            n = [cache.resident_planes(layer, e) for e in range(cache.n_expert)]
            out.append((layer, levels[np.asarray(n, dtype=np.int64)]))  # [E]
        return out

    def _new_step(self, layers) -> Step:
        step = Step(self.spec, self.device, layers, self.cache, self._head)
        if self.routed is not None and not self.routed.resident:
            step.router = self.routed
        return step

    def set_quality(self, quality) -> None:
        """Change dual routing (a preset or (T1, T2)) from the next step on;
        ``--level`` models keep their forced level."""
        policy = self._routed_for_quality().policy_for(quality, self.levels)
        self.options = dataclasses.replace(self.options, quality=quality)
        use_policy(self, policy)

    def _routed_for_quality(self):
        if self.routed is None:
            raise ConfigError(
                f"{self.path}: quality applies to converted models (edgemoe convert)"
            )
        return self.routed

    def _rebuild_step(self) -> None:
        """New step graphs after the routed experts' placement changed
        (in-graph or host-routed, other counts)."""
        layers = self.step.layers
        for il, lw in enumerate(layers):
            if lw.experts is not None:
                lw.experts = self.routed.experts_for(il)
        self.step.free()
        self.step = self._new_step(layers)

    @property
    def weight_bytes(self) -> int:
        return self.weights.nbytes

    def close(self) -> None:
        if self.routed is not None:
            self.routed.cache.io.close()
        self.step.free()
        self.weights.free()
        self.device.close()
        close = getattr(self.tokenizer, "close", None)
        if close:
            close()
        self._embedding.close()
        self.checkpoint.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
