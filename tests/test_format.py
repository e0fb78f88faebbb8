"""The converted-model writer's state machine, calibration statistics and options."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.converters.calibration import ExpertStats
from edgemoe.converters.convert import ConvertOptions, convert
from edgemoe.errors import ConfigError, ModelFileError
from edgemoe.format.writer import ModelWriter, WriterState
from edgemoe.quant.types import NestedQuant


def test_writer_refuses_out_of_order_calls(tmp_path):
    with pytest.raises(ConfigError, match="expected state"):
        with ModelWriter(tmp_path / "m") as w:
            w.begin_experts([0], 2, NestedQuant().planes, {"gate": (256, 256)})
    # The failed run left nothing behind, not even its hidden directory.
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_plane_order_and_shapes(tmp_path):
    plan = NestedQuant((4, 8))
    shapes = {"gate": (256, 256), "up": (256, 256), "down": (256, 256)}
    w = ModelWriter(tmp_path / "m")
    w.write_backbone(lambda p: p.write_bytes(b"GGUF"))
    w.begin_experts([0], 2, plan.planes, shapes)
    assert w.state is WriterState.EXPERTS
    part = np.zeros((256, 144), dtype=np.uint8)
    with pytest.raises(ConfigError, match="expected layer 0 expert 0 plane 0"):
        w.add_plane(0, 1, 0, [part] * 3)
    with pytest.raises(ConfigError, match=r"uint8\[256, 144\]"):
        w.add_plane(0, 0, 0, [part[:10]] * 3)
    w.add_plane(0, 0, 0, [part] * 3)
    with pytest.raises(ConfigError, match="never written"):
        w.finish({})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_super_experts_are_output_outliers():
    e = 8
    stats = ExpertStats(
        count=np.full(e, 10.0),
        weight=np.ones(e),
        in_sq=np.ones((e, 4)),
        peak=np.array([1.0, 1.2, 0.9, 40.0, 1.1, 1.0, 0.8, 1.3]),
        tokens=40,
    )
    assert stats.super_experts(ratio=10.0) == [3]
    stats.peak[3] = 5.0
    assert stats.super_experts(ratio=10.0) == []


def test_imatrix_shrinks_rare_experts_to_the_layer_mean():
    stats = ExpertStats(
        count=np.array([100.0, 0.0]),
        weight=np.ones(2),
        in_sq=np.array([[400.0, 100.0], [0.0, 0.0]]),
        peak=np.ones(2),
        tokens=100,
    )
    busy, unused = stats.imatrix(0), stats.imatrix(1)
    assert np.allclose(unused, [4.0, 1.0])  # no tokens: the layer's own mean
    assert np.allclose(busy, [4.0, 1.0])


def test_calibration_file(fixture_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x * 2\n" * 200)
    out = tmp_path / "m"
    report = convert(
        fixture_dir,
        out,
        ConvertOptions(calib=str(calib), calib_tokens=256, calib_window=128),
    )
    assert report.manifest.calibration["file"] == str(calib)
    assert report.manifest.calibration["tokens"] == 256
    with pytest.raises(ModelFileError, match="calibration file not found"):
        convert(
            fixture_dir, tmp_path / "m2", ConvertOptions(calib=str(tmp_path / "no"))
        )
    short = tmp_path / "short.txt"
    short.write_text("x = 1")
    with pytest.raises(ConfigError, match="fewer than one window"):
        convert(fixture_dir, tmp_path / "m3", ConvertOptions(calib=str(short)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "m", "short.txt"]


def test_plane_crc_is_zlibs_crc32():
    """The fast CRC (ISA-L when installed) gives zlib's values, chained across
    a plane's parts as the reader and the I/O threads chain them."""
    import zlib

    from edgemoe.format.crc import crc32

    rng = np.random.default_rng(0)
    for n in (0, 1, 15, 4096, 100_003, 3 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert crc32(data) == zlib.crc32(data)
        cut = n // 3
        assert crc32(data[cut:], crc32(data[:cut])) == zlib.crc32(data)
