"""Run a benchmark process under a Linux memory cgroup that counts page cache.

A device's memory holds the process's pages *and* the file pages it maps or
reads; a cgroup's memory limit counts both (v2 ``memory.max``; v1
``memory.limit_in_bytes``, with ``memory.memsw.limit_in_bytes`` so that swap
is no way out). ``create`` finds where this process's memory hierarchy lives
(v1 or v2, from /proc/self/cgroup and /proc/self/mountinfo), makes a child
group there and sets its limit; ``run`` starts a command inside it and reports
the group's peak, its OOM kills and the child's page faults and block reads.

Everything reads and writes under ``root`` (default ``/``), so tests run it
on a staged directory tree.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class CgroupError(RuntimeError):
    """No writable memory cgroup, or a cgroup file that cannot be read."""


@dataclass(frozen=True)
class RunResult:
    returncode: int
    """The child's exit status; negative: killed by that signal."""
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int
    """The group's peak usage (anonymous memory + page cache)."""
    oom_kills: int
    major_faults: int
    read_bytes: int
    """Bytes the child read from storage (its rusage block input)."""
    timed_out: bool = False

    @property
    def oom_killed(self) -> bool:
        return self.oom_kills > 0


def _mounts(root: Path) -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) from mountinfo."""
    out = []
    text = (root / "proc/self/mountinfo").read_text()
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 3:
            out.append((fields[4], rest[0], rest[2]))
    return out


def find_parent(root: Path = Path("/")) -> tuple[int, Path]:
    """(version, directory) of this process's memory cgroup."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = _mounts(root)
    except OSError as e:
        raise CgroupError(f"cannot read this process's cgroups: {e}") from None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if "memory" in controllers.split(","):
            v1 = path
        elif hid == "0" and controllers == "":
            v2 = path
    if v1 is not None:
        for point, fstype, opts in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                return 1, root / point.lstrip("/") / v1.lstrip("/")
    if v2 is not None:
        for point, fstype, _ in mounts:
            if fstype == "cgroup2":
                d = root / point.lstrip("/") / v2.lstrip("/")
                ctl = d / "cgroup.controllers"
                if ctl.exists() and "memory" in ctl.read_text().split():
                    return 2, d
    raise CgroupError(
        "no memory cgroup: /proc/self/cgroup names no v1 memory hierarchy and "
        "no cgroup v2 group with the memory controller"
    )


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror or e}") from None
    return 2**63 - 1 if text == "max" else int(text)


def _keyed(path: Path, key: str) -> int:
    """The value of ``key`` in a "key value" file (memory.events, oom_control)."""
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror or e}") from None
    return 0


class Cgroup:
    """A child memory cgroup with a limit; remove it with ``remove``."""

    def __init__(self, version: int, path: Path):
        self.version, self.path = version, path

    @classmethod
    def create(cls, name: str, limit: int, root: Path = Path("/")) -> Cgroup:
        version, parent = find_parent(root)
        path = parent / name
        try:
            if version == 2:
                # Children get the memory controller only if the parent hands
                # it down; a group that has processes itself cannot (EBUSY).
                (parent / "cgroup.subtree_control").write_text("+memory")
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise CgroupError(
                f"cannot create a memory cgroup under {parent}: "
                f"{e.strerror or e} (run as root, or from a delegated cgroup)"
            ) from None
        group = cls(version, path)
        group.set_limit(limit)
        return group

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as e:
            raise CgroupError(
                f"cannot write {value!r} to {self.path / name}: {e.strerror or e}"
            ) from None

    def set_limit(self, limit: int) -> None:
        if self.version == 2:
            self._write("memory.max", str(limit))
            if (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", "0")
            return
        # memsw (memory + swap) may never be below the memory limit: raise it
        # first when growing, lower it last when shrinking.
        memsw = self.path / "memory.memsw.limit_in_bytes"
        grow = memsw.exists() and limit > _read_int(memsw)
        if grow:
            self._write("memory.memsw.limit_in_bytes", str(limit))
        self._write("memory.limit_in_bytes", str(limit))
        if memsw.exists() and not grow:
            self._write("memory.memsw.limit_in_bytes", str(limit))

    @property
    def limit(self) -> int:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return _read_int(self.path / name)

    def usage(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return _read_int(self.path / name)

    def peak(self) -> int:
        if self.version == 2:
            return _read_int(self.path / "memory.peak")
        memsw = self.path / "memory.memsw.max_usage_in_bytes"
        peak = _read_int(self.path / "memory.max_usage_in_bytes")
        return max(peak, _read_int(memsw)) if memsw.exists() else peak

    def oom_kills(self) -> int:
        if self.version == 2:
            return _keyed(self.path / "memory.events", "oom_kill")
        return _keyed(self.path / "memory.oom_control", "oom_kill")

    def remove(self) -> None:
        """Reclaim what the group still charges, then delete it."""
        if self.version == 1 and (self.path / "memory.force_empty").exists():
            try:
                (self.path / "memory.force_empty").write_text("0")
            except OSError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # the last task is still leaving

    def run(
        self, cmd: list[str], timeout: float, env: dict | None = None, cwd=None
    ) -> RunResult:
        """``cmd`` in a fresh process inside this group (it joins before it
        execs, so nothing it maps is charged elsewhere)."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))

        oom_before = self.oom_kills()
        # A program's output need not be UTF-8 (a random-weight model's text).
        tmp = dict(mode="w+", errors="replace")
        with tempfile.TemporaryFile(**tmp) as out, tempfile.TemporaryFile(**tmp) as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=env, cwd=cwd, preexec_fn=join
            )
            status, ru, timed_out = _wait(proc.pid, timeout)
            proc.returncode = status  # reaped here, with its rusage
            seconds = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        return RunResult(
            returncode=status,
            stdout=stdout,
            stderr=stderr,
            seconds=seconds,
            peak_bytes=self.peak(),
            oom_kills=self.oom_kills() - oom_before,
            major_faults=int(ru.ru_majflt),
            read_bytes=int(ru.ru_inblock) * 512,
            timed_out=timed_out,
        )


def _wait(pid: int, timeout: float):
    """(exit code, rusage, timed out) of ``pid``, killed after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        done, status, ru = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), ru, False
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            _, status, ru = os.wait4(pid, 0)
            return os.waitstatus_to_exitcode(status), ru, True
        time.sleep(0.02)
