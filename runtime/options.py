"""``LoadOptions``: every knob of ``edgemoe.load``, typed and checked once."""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.errors import ConfigError

IO_KINDS = ("auto", "pread", "direct")
"""How expert planes are read (``LoadOptions.io``; runtime/io_queue.py)."""


def io_kind_error(kind: object) -> str:
    *first, last = (repr(k) for k in IO_KINDS)
    return f"io backend must be {', '.join(first)} or {last}, got {kind!r}"


MAX_THREADS = 512


@dataclass(frozen=True)
class LoadOptions:
    n_ctx: int = 0
    """KV cache cells, in tokens; 0 means min(training context, 4096)."""
    n_seq_max: int = 1
    """Sequences that may share those cells (llama.cpp's n_seq_max; the
    server's slots): ``n_ctx`` may reach this many training contexts, while
    each sequence's positions stay within one."""
    n_threads: int | None = None
    """Compute threads; None tunes them while running, from the physical core
    count down to 1 (runtime/threads.py)."""
    n_batch: int = 256
    """Prompt tokens per prefill step (bounds prefill scratch memory)."""
    kv_type: str = "f32"
    """KV cache precision: "f32" (exact against float32 references) or
    "f16" (llama.cpp's default: half the cache's memory and of the bytes
    attention reads; logits move by a few hundredths)."""
    device: str = "cpu"
    """ggml device: "cpu", "gpu" (untested) or "auto"."""
    budget: int | str | None = None
    """Converted models: memory for backbone, KV cache, scratch and expert
    slots ("3GiB" or bytes); None keeps every expert plane resident."""
    force_level: int | None = None
    """Converted models: run every expert at this level (protected experts at
    the top one); None lets dual routing choose per token."""
    quality: str | tuple[float, float] = "balanced"
    """Dual routing: max, high, balanced, fast, min, or thresholds (T1, T2)."""
    prefetch: bool = True
    """Under a budget: load the next layer's predicted experts ahead."""
    io: str = "auto"
    """Expert reads: "pread" (buffered, pages dropped after), "direct"
    (O_DIRECT) or "auto": direct where the model's file system takes it
    (1.14x and 1.26x pread's decode at 50% and 30% limits, README)."""
    io_threads: int = 2
    verify: bool = True
    """Check each expert plane's CRC-32 the first time it is read."""
    slot_store: str = "auto"
    """Converted models' expert slots: "host" (slabs the I/O threads fill in
    place, zero-copy on the CPU), "device" (tensors in the backend's own
    buffer, written with ggml_backend_tensor_set: a GPU's memory), or "auto"
    (host on the CPU, device elsewhere)."""
    repack: bool = True
    """CPU: copy matmul weights into ggml's CPU_REPACK layout where this CPU
    has interleaved kernels for their type (llama.cpp's default); the copy
    replaces the mapped or read bytes in memory, one weight at a time. Never
    for streamed slots: laying out each read costs an I/O thread CPU time,
    which in an experiment cost more decode speed than the layout gave
    (README, "How it computes")."""
    eviction: str = "score"
    """Expert slot eviction: "score" (recency, use, hotness, layer distance)
    or "lru" (a baseline)."""
    throttle: tuple[float, float] | None = None
    """Emulated storage (bytes/s, latency s): expert reads finish no sooner
    than that device would serve them (``--emulate``)."""

    def __post_init__(self) -> None:
        names = (
            "n_ctx",
            "n_seq_max",
            "n_threads",
            "n_batch",
            "force_level",
            "io_threads",
        )
        for name in names:
            v = getattr(self, name)
            # bool is an int subclass; neither it nor "16" is a count.
            if not (v is None and name in ("n_threads", "force_level")) and (
                not isinstance(v, int) or isinstance(v, bool)
            ):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
        if self.slot_store not in ("auto", "host", "device"):
            raise ConfigError(
                "slot_store must be 'auto', 'host' or 'device', "
                f"got {self.slot_store!r}"
            )
        if self.kv_type not in ("f16", "f32"):
            raise ConfigError(f"kv_type must be 'f16' or 'f32', got {self.kv_type!r}")
        if self.eviction not in ("score", "lru"):
            raise ConfigError(
                f"eviction must be 'score' or 'lru', got {self.eviction!r}"
            )
        if self.io not in IO_KINDS:
            raise ConfigError(io_kind_error(self.io))
        if self.device not in ("cpu", "gpu", "auto"):
            raise ConfigError(
                f"device must be 'cpu', 'gpu' or 'auto', got {self.device!r}"
            )
        if self.throttle is not None:
            try:
                rate, latency = (float(x) for x in self.throttle)
            except (TypeError, ValueError):
                rate = latency = -1.0
            if not (rate > 0 and latency >= 0):
                raise ConfigError(
                    f"throttle must be (bytes/s > 0, latency s >= 0), "
                    f"got {self.throttle!r}"
                )
        if self.n_ctx < 0:
            raise ConfigError(f"n_ctx must be >= 0, got {self.n_ctx}")
        if not 1 <= self.n_seq_max <= 256:
            raise ConfigError(f"n_seq_max must be in 1..256, got {self.n_seq_max}")
        if self.n_batch < 1:
            raise ConfigError(f"n_batch must be >= 1, got {self.n_batch}")
        if self.n_threads is not None and not 1 <= self.n_threads <= MAX_THREADS:
            # libgomp exits the process from C when it cannot start them all.
            raise ConfigError(
                f"n_threads must be in 1..{MAX_THREADS}, got {self.n_threads}"
            )
