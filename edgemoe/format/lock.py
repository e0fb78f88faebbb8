"""One writer per output path, and no leftovers from a killed one.

Every command that writes a model output (``convert``, ``export-gguf``,
``synth``) holds ``OutputLock(OUT)`` from its first check of OUT to its last
rename: an ``flock`` on ``.{name}.lock`` in OUT's folder. A second writer of
the same OUT fails at once, ``--force`` or not, instead of racing the first
for the final rename. The kernel drops an flock when its process dies, so a
SIGKILLed writer never blocks a later one; and as no live writer can be
working while the lock is held, the holder removes what dead ones left
(``remove_stale``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

from edgemoe.errors import ModelFileError

try:
    import fcntl
except ImportError:  # not POSIX: no locking, as before
    fcntl = None  # type: ignore[assignment]

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


class OutputLock:
    """Exclusive lock on ``out`` for this process; ``held`` is False only where
    the filesystem has no flock (then writers run unlocked, as before)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None
        self.held = False
        self._acquire()

    def _acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            try:
                fd = os.open(
                    self.path,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                )
            except OSError as e:
                raise ModelFileError(
                    self.path,
                    f"cannot create the output's lock file: {e.strerror or e}",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in _BUSY:
                    pid = _read_pid(fd)
                    os.close(fd)
                    who = f"another process (pid {pid})" if pid else "another process"
                    raise ModelFileError(
                        self.out, f"{who} is writing it; wait for it to finish"
                    ) from None
                # ENOLCK, EOPNOTSUPP: some network and FUSE mounts.
                os.close(fd)
                return
            # A holder unlinks the file before it lets go (``release``): if
            # the name no longer leads to the inode we locked, that lock
            # guards nothing: retry with the file now under the name.
            try:
                named = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                named = None
            mine = os.fstat(fd)
            if named is None or (named.st_dev, named.st_ino) != (
                mine.st_dev,
                mine.st_ino,
            ):
                os.close(fd)
                continue
            try:  # only for the message a second writer prints
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass
            self.fd, self.held = fd, True
            return

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order: see ``_acquire``)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd, self.held = None, False

    def remove_stale(self) -> list[Path]:
        """Remove what killed writers of ``out`` left: ``.{name}.partial`` and
        ``.{name}.partial-{pid}`` in its folder, ours included (we hold the
        lock, so no live writer owns one). Symlinks are unlinked, never
        followed. Without a real lock, only partials of dead pids go."""
        pattern = re.compile(re.escape(f".{self.out.name}.partial") + r"(-(\d+))?")
        removed = []
        try:
            names = os.listdir(self.out.parent)
        except OSError:
            return removed
        for name in names:
            m = pattern.fullmatch(name)
            if m is None:
                continue
            if not self.held and not (m[2] and not pid_alive(int(m[2]))):
                continue
            path = self.out.parent / name
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    shutil.rmtree(path)  # does not follow links inside
                else:
                    os.unlink(path)
            except OSError:
                continue  # a later run retries; nothing depends on it being gone
            removed.append(path)
        return removed

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
