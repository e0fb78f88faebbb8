"""Expert fits in worker processes, one per core.

Fitting an expert's planes is numpy and ggml work on arrays of a few MiB. In
threads of one process two fits ran about 1.6x one, not 2x: numpy calls that
allocate their result cost several times more while another thread runs
them. So each core gets a process. Workers are fresh interpreters (``python
-m edgemoe.converters.fit_workers``), not forks or multiprocessing's spawn:
nothing of the caller's ``__main__`` runs again, and no lock one of its
threads held is inherited. A worker opens the checkpoint itself and reads
the experts it is asked for (a job is a few KiB, a result one expert's
planes); where a checkpoint stacks its experts in one tensor (gpt-oss) the
caller sends the floats instead, so no worker holds a whole stack.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future

from edgemoe.errors import EdgeMoEError

_LEN = struct.Struct("<Q")


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)))
    stream.write(data)
    stream.flush()


def _recv(stream):
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class FitPool:
    """``submit(job)`` -> a Future of ``fit_expert(job)``'s planes, computed
    in one of ``workers`` processes; ``close()`` ends them (always call it)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._jobs: queue.Queue = queue.Queue()
        self._procs = []
        self._threads = []
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        for i in range(workers):
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgemoe.converters.fit_workers"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                start_new_session=True,  # Ctrl+C reaches the caller, which ends us
            )
            t = threading.Thread(
                target=self._serve, args=(proc,), name=f"edgemoe-fit-{i}", daemon=True
            )
            t.start()
            self._procs.append(proc)
            self._threads.append(t)

    def submit(self, job) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, job))
        return fut

    def _serve(self, proc) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fut, job = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                _send(proc.stdin, job)
                status, value = _recv(proc.stdout)
            except (OSError, EOFError):
                fut.set_exception(
                    EdgeMoEError(
                        f"a fitting process ended unexpectedly (exit code "
                        f"{proc.poll()})"
                    )
                )
                continue
            if status == "ok":
                fut.set_result(value)
            else:
                fut.set_exception(EdgeMoEError(value))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        for proc in self._procs:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()

    def __enter__(self) -> FitPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    """A worker: jobs in on stdin, ("ok", planes) or ("error", message) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to stderr, not into the results
    inp = sys.stdin.buffer
    from edgemoe.converters.expert_layer import fit_expert

    checkpoints: dict = {}
    while True:
        try:
            job = _recv(inp)
        except EOFError:
            return
        try:
            _send(out, ("ok", fit_expert(job, checkpoints)))
        except EdgeMoEError as e:
            _send(out, ("error", str(e)))
        except Exception as e:  # noqa: BLE001 - reported, the caller fails cleanly
            _send(out, ("error", f"fitting expert {job.expert} failed: {e!r}"))


if __name__ == "__main__":
    main()
