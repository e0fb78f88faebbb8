"""llama.cpp itself, through llama-cpp-python's low-level API: the independent
reference for tests and the baseline for benchmarks.

Extra buffer types (AMX / repacked weights) are off by default: with this
llama.cpp, MoE GGUFs crash in ``ggml_backend_amx_mul_mat`` on AMX CPUs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.env import prepare_environment
from edgemoe.errors import ConfigError, ModelFileError


@dataclass(frozen=True)
class LlamaTimings:
    prompt_tokens: int
    prompt_s: float
    generation_tokens: int
    generation_s: float


class LlamaCpp:
    """A GGUF loaded in llama.cpp with one context."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 512,
        n_threads: int = 1,
        n_batch: int = 512,
        extra_bufts: bool = False,
        f32_cache: bool = False,
        n_seq_max: int = 1,
    ):
        prepare_environment()
        import llama_cpp as L

        from edgemoe.checkpoint.llama_vocab import quiet_llama

        self.L = L
        quiet_llama(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts
        from edgemoe.checkpoint.gguf_header import check_header

        check_header(path)  # llama.cpp trusts the header's counts
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise ModelFileError(path, "llama.cpp could not load this GGUF")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.n_seq_max = n_seq_max
        if f32_cache:
            # Exact comparisons: f16 caches round K/V, and flash attention with
            # them; the float path keeps llama.cpp's attention in float32.
            cp.type_k = cp.type_v = 0
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise ModelFileError(path, "llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_ctx = n_ctx
        self.n_past = 0

    def reset(self) -> None:
        mem = self.L.llama_get_memory(self.ctx)
        self.L.llama_memory_clear(mem, True)
        self.n_past = 0

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Append tokens; logits [vocab] of the last one (a copy)."""
        if self.n_past + len(tokens) > self.n_ctx:
            raise ConfigError(
                f"{self.n_past + len(tokens)} tokens exceed n_ctx {self.n_ctx}"
            )
        arr = (self.L.llama_token * len(tokens))(*tokens)
        rc = self.L.llama_decode(self.ctx, self.L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise ConfigError(f"llama_decode failed with {rc}")
        self.n_past += len(tokens)
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def decode_batch(self, items: list[tuple[int, int, list[int]]]) -> list[np.ndarray]:
        """One ``llama_decode`` over several sequences: ``items`` is [(seq id
        < n_seq_max, its first position, tokens), ...]; each sequence's
        last-token logits [vocab] (copies)."""
        L = self.L
        n = sum(len(toks) for _, _, toks in items)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            i, last = 0, []
            for seq, p0, toks in items:
                for j, tok in enumerate(toks):
                    batch.token[i], batch.pos[i] = tok, p0 + j
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                    batch.logits[i] = j == len(toks) - 1
                    i += 1
                last.append(i - 1)
            batch.n_tokens = n
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise ConfigError(f"llama_decode failed with {rc}")
            return [
                np.ctypeslib.as_array(
                    L.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,)
                ).copy()
                for k in last
            ]
        finally:
            L.llama_batch_free(batch)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], LlamaTimings]:
        """``n`` greedy tokens after ``prompt``, with prefill/decode timings."""
        self.reset()
        t0 = time.perf_counter()
        logits = self.eval(prompt)
        t1 = time.perf_counter()
        out = []
        for i in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if i + 1 < n:
                logits = self.eval([tok])
        t2 = time.perf_counter()
        return out, LlamaTimings(len(prompt), t1 - t0, max(n - 1, 0), t2 - t1)

    def close(self) -> None:
        if self.ctx:
            self.L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
