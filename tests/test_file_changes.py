"""A model's files changed while it runs: the backbone is read, not mapped (a
mapped file that shrinks is a SIGBUS inside ggml), so truncating it or an
expert shard is a typed error at the next read from it, never a crash."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgemoe
from edgemoe.checkpoint.gguf_file import GGUFCheckpoint

# Generates 60 tokens, truncating FILE (if any) to 0 bytes after the 10th, and
# prints the token ids, or the typed error's class and message.
SCRIPT = textwrap.dedent(
    """
    import os, sys
    import edgemoe
    from edgemoe.errors import EdgeMoEError
    path, budget, victim = sys.argv[1], sys.argv[2], sys.argv[3]
    ids = []
    try:
        with edgemoe.load(path, n_ctx=256, n_threads=1, budget=budget or None) as m:
            for i, ev in enumerate(m.generate("def", max_tokens=60, ignore_eos=True,
                                              seed=1, temperature=0)):
                ids.append(ev.token)
                if i == 10 and victim:
                    os.truncate(os.path.join(path, victim), 0)
    except EdgeMoEError as e:
        print("typed", type(e).__name__, e)
        sys.exit(3)
    print(ids)
    """
)


def run(model, victim: str = "", budget: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), budget, victim],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def model(converted_fixture, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(converted_fixture, dst)
    return dst


def test_truncating_the_backbone_mid_run_is_a_typed_error(model):
    """Everything but the embedding table was read at load; the next token's
    embedding row is read from the file, and finds it short."""
    proc = run(model, victim="backbone.gguf")
    assert proc.returncode != -signal.SIGBUS, "the backbone is mapped"
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert (model / "backbone.gguf").stat().st_size == 0  # it really was cut
    assert proc.stdout.startswith("typed ModelFileError"), proc.stdout
    assert "backbone.gguf: truncated: 'token_embd.weight' needs bytes" in proc.stdout


def test_truncating_a_shard_mid_run_is_a_typed_error(model):
    from test_budget_floor import reported_minimum

    shard = json.loads((model / "manifest.json").read_text())["shards"][0]["file"]
    budget = str(reported_minimum(model, n_ctx=256, n_threads=1))
    proc = run(model, victim=shard, budget=budget)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("typed ModelFileError"), proc.stdout
    assert shard in proc.stdout and "truncated" in proc.stdout


def test_embedding_rows_are_read_from_the_file(converted_fixture):
    """The running model's embedding table is not in memory: its rows come
    from the file, and equal the mapped table's rows."""
    path = converted_fixture / "backbone.gguf"
    mapped = GGUFCheckpoint(path, backbone_only=True)
    read = GGUFCheckpoint(path, backbone_only=True, in_memory=True)
    try:
        full, lazy = mapped.load("token_embd.weight"), read.load("token_embd.weight")
        assert lazy.data.nbytes == 0 and lazy.nbytes == full.nbytes
        ids = np.array([0, 5, 5, full.shape[0] - 1, 17])
        np.testing.assert_array_equal(lazy.rows(ids), full.rows(ids))
        np.testing.assert_array_equal(lazy.to_float32(), full.to_float32())
        # Everything else is a copy, not a view of a mapping.
        assert not isinstance(read.reader.data, np.memmap)
        w = read.load("output_norm.weight")
        np.testing.assert_array_equal(w.data, mapped.load("output_norm.weight").data)
    finally:
        mapped.close()
        read.close()


def test_embedding_rows_through_one_open_file(converted_fixture, tmp_path):
    """A running model reads embedding rows through one fd it holds
    (FileRows): the same rows as the mapped table, for every batch shape
    in turn; a file replaced at its path keeps being read as opened; a
    truncated one is a typed error naming it; a closed reader refuses."""
    import os

    from edgemoe.checkpoint.base import FileRows
    from edgemoe.errors import ModelFileError

    path = tmp_path / "backbone.gguf"
    shutil.copy(converted_fixture / "backbone.gguf", path)
    mapped = GGUFCheckpoint(converted_fixture / "backbone.gguf", backbone_only=True)
    read = GGUFCheckpoint(path, backbone_only=True, in_memory=True)
    rows = FileRows(read.load("token_embd.weight"))
    try:
        full = mapped.load("token_embd.weight")
        for ids in ([3], [0, 5, 5, full.shape[0] - 1], [7], list(range(40))):
            ids = np.array(ids)
            np.testing.assert_array_equal(rows.raw_rows(ids), full.raw_rows(ids))
        # Replaced: a new file at the path; the reader keeps the one it opened.
        os.replace(path, tmp_path / "old.gguf")
        path.write_bytes(b"GGUF")
        np.testing.assert_array_equal(
            rows.raw_rows(np.array([9])), full.raw_rows(np.array([9]))
        )
        # Truncated under it: the row past the end is a typed error.
        os.truncate(tmp_path / "old.gguf", rows.w.offset + rows.row)
        with pytest.raises(ModelFileError, match="truncated"):
            rows.raw_rows(np.array([1]))
        rows.close()
        with pytest.raises(ValueError, match="after close"):
            rows.raw_rows(np.array([0]))
    finally:
        rows.close()
        mapped.close()
        read.close()


def test_a_model_runs_with_its_embedding_read_per_row(converted_fixture):
    with edgemoe.load(converted_fixture, n_ctx=128) as m:
        assert m.embed.data.nbytes == 0
        assert len(list(m.generate("def", max_tokens=3, ignore_eos=True))) == 3
