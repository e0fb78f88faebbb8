"""A converted model's directory is input: what its manifest names must stay
inside it, and no file of it may block, exhaust or crash the reader."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from expect import assert_cli_error

import edgemoe
from edgemoe.errors import ModelFileError


@pytest.fixture
def model(converted_fixture, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(converted_fixture, dst)
    return dst


def edit_manifest(model, change) -> None:
    path = model / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../model/experts-00001.gguf", "a/b", "..", "", 7, None]
)
def test_manifest_file_names_are_plain(model, cli, name):
    def change(d):
        d["shards"][0]["file"] = name

    edit_manifest(model, change)
    for cmd in (("inspect", model, "--verify"), ("run", model, "-p", "x", "-n", "1")):
        line = assert_cli_error(cli(*cmd), "plain file name")
        assert "passwd" not in line or name == "/etc/passwd"
    with pytest.raises(ModelFileError, match="plain file name"):
        edgemoe.load(model)


def test_backbone_must_be_the_backbone(model, cli):
    shard = json.loads((model / "manifest.json").read_text())["shards"][0]["file"]

    def change(d):
        d["backbone"]["file"] = shard

    edit_manifest(model, change)
    assert_cli_error(cli("inspect", model), "backbone must be")


def test_symlink_out_of_the_directory_is_refused(model, tmp_path, cli):
    shard = json.loads((model / "manifest.json").read_text())["shards"][0]["file"]
    outside = tmp_path / "elsewhere.gguf"
    shutil.move(model / shard, outside)  # same bytes: only the place differs
    os.symlink(outside, model / shard)
    assert_cli_error(cli("inspect", model, "--verify"), "symlink out of the model")
    assert_cli_error(cli("run", model, "-p", "x", "-n", "1"), "symlink out")


def test_symlink_inside_the_directory_is_fine(model, cli):
    shard = json.loads((model / "manifest.json").read_text())["shards"][0]["file"]
    os.rename(model / shard, model / "real.gguf")
    os.symlink("real.gguf", model / shard)
    proc = cli("inspect", model, "--verify")
    assert proc.returncode == 0, proc.stderr


def test_manifest_fifo_does_not_hang(model, cli):
    (model / "manifest.json").unlink()
    os.mkfifo(model / "manifest.json")
    assert_cli_error(cli("inspect", model, timeout=30), "not a regular file")


def test_shard_that_is_a_directory(model, cli):
    shard = json.loads((model / "manifest.json").read_text())["shards"][0]["file"]
    (model / shard).unlink()
    (model / shard).mkdir()
    assert_cli_error(cli("inspect", model), "not a regular file")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ('{"format": "edgemoe", "version": NaN}', "NaN"),
        ('{"format": "edgemoe", "version": Infinity}', "Infinity"),
        ('{"version": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"a": ' * 70 + "1" + "}" * 70, "deeper than 64"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
    # Short ids: pytest puts the test id in PYTEST_CURRENT_TEST, and a 200 KB
    # environment string makes every subprocess the test starts fail with E2BIG.
    ids=["deep-array", "nan", "infinity", "huge-int", "deep-object", "not-utf8"],
)
def test_hostile_manifest_json(model, cli, text, needle):
    path = model / "manifest.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    assert_cli_error(cli("inspect", model, timeout=60), needle)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("bytes", -1, "bytes must be an integer"),
        ("bytes", 1.5, "bytes must be an integer"),
        ("bytes", True, "bytes must be an integer"),
        ("bytes", [1], "bytes must be an integer"),
        ("sha256", "x" * 64, "64 hex digits"),
        ("sha256", None, "64 hex digits"),
    ],
)
def test_file_ref_fields(model, cli, key, value, needle):
    def change(d):
        d["shards"][0][key] = value

    edit_manifest(model, change)
    assert_cli_error(cli("inspect", model), needle)


def test_tokenizer_fifo_does_not_hang(model, cli):
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    assert_cli_error(cli("run", model, "-p", "x", "-n", "1", timeout=60), "regular")


@pytest.mark.parametrize(
    "template, needle",
    [([1, 2], "chat_template: a list"), ({"a": 1}, "must be a string, not dict")],
)
def test_tokenizer_config_template_types(model, cli, template, needle):
    path = model / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg))
    assert_cli_error(cli("run", model, "-p", "x", "-n", "1"), needle)
