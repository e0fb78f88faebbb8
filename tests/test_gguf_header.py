"""GGUF headers with counts their file cannot hold are refused by a walk
that allocates nothing (gguf-py's reader spent 0.6-1.3 GB on some first)."""

from __future__ import annotations

import struct

import pytest

from edgemoe.checkpoint.gguf_header import check_header
from edgemoe.errors import ModelFileError


def s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def header(n_tensors=1, n_kv=None, kvs=None, tensors=None, version=3) -> bytes:
    kvs = (
        kvs
        if kvs is not None
        else [s("general.architecture") + struct.pack("<I", 8) + s("llama")]
    )
    tensors = tensors if tensors is not None else [
        s("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 64, 16)
        + struct.pack("<IQ", 0, 0)
    ]  # fmt: skip
    n_kv = len(kvs) if n_kv is None else n_kv
    body = b"".join(kvs) + b"".join(tensors)
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body + bytes(64)


def array(etype: int, count: int, payload: bytes = b"") -> bytes:
    return s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, etype, count) + payload


def test_a_sound_header_passes(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(header())
    check_header(path)


@pytest.mark.parametrize(
    "blob, needle",
    [
        (header(n_tensors=4_194_304), "4194304 tensor infos"),
        (header(n_kv=1 << 40), "metadata entries"),
        (header(kvs=[array(8, 1_000_000)]), "1000000 strings"),
        (header(kvs=[array(8, 1 << 30)]), "at most"),
        (header(kvs=[array(6, 10**9)]), "elements"),
        (header(kvs=[array(9, 2)]), "array of arrays"),
        (header(kvs=[s("k") + struct.pack("<I", 77)]), "unknown value type 77"),
        (header(kvs=[s("k") + struct.pack("<IQ", 8, 1 << 50)]), "needs byte"),
        (header(version=1), "version 1"),
        (
            header(
                tensors=[s("t") + struct.pack("<I", 5) + struct.pack("<5Q", *[2] * 5)]
            ),
            "5 dimensions",
        ),
        (
            header(tensors=[s("t") + struct.pack("<I", 2) + struct.pack("<QQ", 0, 4)]),
            "dimension 0 is 0",
        ),
        (b"GGUX" + bytes(40), "no GGUF magic"),
        (b"GGUF" + bytes(4), "needs byte 24"),
    ],
)
def test_inflated_or_malformed_headers_are_refused(tmp_path, blob, needle):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(
        ModelFileError, match="corrupt GGUF header|truncated: the header"
    ) as err:
        check_header(path)
    assert needle in str(err.value)


def test_cli_refuses_an_inflated_tensor_count(tmp_path, cli):
    """The real reader path: one error line, quickly, not a gigabyte."""
    path = tmp_path / "inflated.gguf"
    path.write_bytes(header(n_tensors=4_194_304))
    proc = cli("inspect", path, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensor infos" in lines[0], proc.stderr


def test_cli_refuses_a_fifo_where_a_gguf_belongs(tmp_path, cli):
    import os

    path = tmp_path / "model.gguf"
    os.mkfifo(path)
    proc = cli("inspect", path, timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr


def test_tensor_ranges_of_a_header_larger_than_the_first_read(tmp_path):
    """The walk reads a growing prefix: a 3 MiB vocabulary (more than the
    first 1 MiB read) still yields every tensor's place, as gguf-py finds it."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    path = tmp_path / "big.gguf"
    w = GGUFWriter(path, "llama")
    w.add_array(
        "tokenizer.ggml.tokens", [f"token-{i:07d}-" + "x" * 20 for i in range(100_000)]
    )
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(10, dtype=np.float32))
    w.add_tensor("b", np.ones((3, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert path.stat().st_size > 3 << 20
    found = check_header(path).tensors
    want = {
        t.name: (int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(path).tensors
    }
    assert found == want and want["b"] == (want["b"][0], 3 * 64 * 2)
