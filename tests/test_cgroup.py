"""The benchmark's memory-cgroup runner (benchmarks/cgroup.py): detection of
v1 and v2 on staged /proc and /sys trees, clean refusals, peak and OOM
parsing, and, where this machine lets us, a real limit that counts page cache."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_cgroup", ROOT / "benchmarks" / "cgroup.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_cgroup"] = mod
    spec.loader.exec_module(mod)
    return mod


cg = _load()

V1_CGROUP = """12:pids:/
4:memory:/jobs/abc
3:cpuset:/
0::/
"""
V1_MOUNTS = (
    "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup "
    "rw,memory\n"
    "31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu\n"
    "32 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V2_CGROUP = "0::/user.slice/bench\n"
V2_MOUNTS = "25 1 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def stage(tmp: Path, cgroup: str, mounts: str) -> Path:
    (tmp / "proc/self").mkdir(parents=True)
    (tmp / "proc/self/cgroup").write_text(cgroup)
    (tmp / "proc/self/mountinfo").write_text(mounts)
    return tmp


def test_detects_v1_memory_hierarchy(tmp_path):
    root = stage(tmp_path, V1_CGROUP, V1_MOUNTS)
    version, parent = cg.find_parent(root)
    assert (version, parent) == (1, root / "sys/fs/cgroup/memory/jobs/abc")


def test_detects_v2_with_memory_controller(tmp_path):
    root = stage(tmp_path, V2_CGROUP, V2_MOUNTS)
    group = root / "sys/fs/cgroup/user.slice/bench"
    group.mkdir(parents=True)
    (group / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert cg.find_parent(root) == (2, group)
    # Without the memory controller there is nothing to limit with.
    (group / "cgroup.controllers").write_text("cpu io pids\n")
    with pytest.raises(cg.CgroupError, match="no memory cgroup"):
        cg.find_parent(root)


def test_v1_limit_peak_and_oom_parsing(tmp_path):
    root = stage(tmp_path, V1_CGROUP, V1_MOUNTS)
    child = root / "sys/fs/cgroup/memory/jobs/abc/run1"
    child.mkdir(parents=True)
    unlimited = str(2**63 - 4096)
    (child / "memory.limit_in_bytes").write_text(unlimited)
    (child / "memory.memsw.limit_in_bytes").write_text(unlimited)
    group = cg.Cgroup.create("run1", 300 << 20, root)
    assert group.version == 1 and group.limit == 300 << 20
    # Swap is no way out: memory+swap gets the same limit.
    assert (child / "memory.memsw.limit_in_bytes").read_text() == str(300 << 20)
    group.set_limit(500 << 20)  # growing: memsw first, then memory
    assert (child / "memory.memsw.limit_in_bytes").read_text() == str(500 << 20)
    (child / "memory.max_usage_in_bytes").write_text("123456789\n")
    (child / "memory.memsw.max_usage_in_bytes").write_text("123460000\n")
    (child / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    )
    assert group.peak() == 123460000
    assert group.oom_kills() == 3


def test_v2_limit_peak_and_oom_parsing(tmp_path):
    root = stage(tmp_path, V2_CGROUP, V2_MOUNTS)
    parent = root / "sys/fs/cgroup/user.slice/bench"
    parent.mkdir(parents=True)
    (parent / "cgroup.controllers").write_text("memory pids\n")
    (parent / "cgroup.subtree_control").write_text("")
    (parent / "run1").mkdir()
    (parent / "run1/memory.swap.max").write_text("max\n")
    group = cg.Cgroup.create("run1", 64 << 20, root)
    assert group.version == 2 and group.limit == 64 << 20
    assert (parent / "cgroup.subtree_control").read_text() == "+memory"
    assert (parent / "run1/memory.swap.max").read_text() == "0"
    (parent / "run1/memory.peak").write_text("99999\n")
    (parent / "run1/memory.events").write_text(
        "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"
    )
    assert group.peak() == 99999 and group.oom_kills() == 1


def test_refuses_cleanly_without_permission(tmp_path, monkeypatch):
    root = stage(tmp_path, V1_CGROUP, V1_MOUNTS)

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(cg.CgroupError) as err:
        cg.Cgroup.create("run1", 1 << 30, root)
    msg = str(err.value)
    assert "Permission denied" in msg and "jobs/abc" in msg and "\n" not in msg


def test_no_cgroup_files_is_one_clear_error(tmp_path):
    with pytest.raises(cg.CgroupError, match="cannot read this process's cgroups"):
        cg.find_parent(tmp_path)


def _real_group(limit: int):
    try:
        return cg.Cgroup.create(f"edgemoe-test-{uuid.uuid4().hex[:8]}", limit)
    except cg.CgroupError as e:
        pytest.skip(f"no writable memory cgroup here: {e}")


def test_real_limit_counts_page_cache_and_kills_over_limit(tmp_path):
    if sys.platform != "linux":
        pytest.skip("Linux cgroups")
    data = tmp_path / "blob"
    data.write_bytes(os.urandom(1 << 20) * 48)  # 48 MiB
    fd = os.open(data, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    group = _real_group(256 << 20)
    try:
        # Reading a file fills the page cache, which the group is charged.
        read = [sys.executable, "-c", f"open({str(data)!r}, 'rb').read(); print('ok')"]
        res = group.run(read, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
        assert res.peak_bytes >= 48 << 20
        assert res.oom_kills == 0
        # Anonymous memory past the limit: the kernel kills the child.
        hog = [sys.executable, "-c", "x = b'1' * (400 << 20)"]
        res = group.run(hog, timeout=60)
        assert res.oom_killed and res.returncode == -9, res
        assert res.peak_bytes <= (256 << 20) + (1 << 20)
    finally:
        group.remove()
    assert not group.path.exists()
