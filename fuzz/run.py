"""Mutation fuzzer for EdgeMoE's readers: long mode.

    python fuzz/run.py --reader gguf --cases 10000 --seed 1 --jobs 2 --out fuzz-out/

Every case must end as ``typed`` (exit 1 with a last stderr line ``error: ...``),
``usage`` (argparse's exit 2) or ``success``; ``traceback``, ``signal``,
``timeout``, ``memory`` and ``other`` are findings. Cases run in batch workers
(fuzz/worker.py) under a memory cap; a finding there is re-run alone in a fresh
``python -m edgemoe`` (same cap and timeout) and reported with that standalone
result, its case directory kept under ``OUT/findings/`` and a reproducer line.
Prints a markdown table per reader, writes ``OUT/results.json``, exits 1 on any
finding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import cases as C  # noqa: E402

CLASSES = (
    "typed",
    "usage",
    "success",
    "traceback",
    "signal",
    "timeout",
    "memory",
    "other",
)
OK = {"typed", "usage", "success"}
MEM_CAP = 2 << 30
TIMEOUT = 20.0
RECYCLE = 150  # worker restarted after this many cases: bounds leaks between cases


def _limits(mem: int):
    def pre() -> None:
        os.setsid()  # its own group, so a timeout kills C threads and children too
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return pre


def _env() -> dict:
    # One compute thread per case: --jobs already fills the cores, and an idle
    # OpenMP pool would spin between cases.
    return dict(
        os.environ,
        OMP_WAIT_POLICY="PASSIVE",
        OMP_NUM_THREADS="1",
        PYTHONFAULTHANDLER="",
    )


def classify(rc: int, stderr: str) -> str:
    """The class of a finished case from its exit status and stderr."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if "MemoryError" in stderr or "std::bad_alloc" in stderr:
        return "memory"
    if rc < 0:
        return "signal"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if rc == 0:
        return "success"
    if rc == 1 and last.startswith("error:"):
        return "typed"
    if rc == 2 and ": error:" in last:
        return "usage"
    return "other"


class Worker:
    """One batch worker process; restarted after a crash, a timeout or RECYCLE cases."""

    def __init__(self, scratch: Path, mem: int, timeout: float):
        self.scratch, self.mem, self.timeout = scratch, mem, timeout
        self.proc: subprocess.Popen | None = None
        self.served = 0

    def _start(self) -> None:
        log = open(self.scratch / f"worker-{threading.get_ident()}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=self.scratch,
            env=_env(),
            preexec_fn=_limits(self.mem),
            text=True,
        )
        log.close()
        self.served = 0
        if self._read(120.0) is None:
            raise RuntimeError(f"fuzz worker did not start; see {log.name}")

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait()
        self.proc.stdout.close()
        self.proc.stdin.close()
        self.proc = None
        return rc

    def run(self, req: dict) -> tuple[str, int, str]:
        if self.proc is None or self.served >= RECYCLE:
            self.stop()
            self._start()
        self.served += 1
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        reply = self._read(self.timeout)
        if reply is not None:
            return classify(reply["rc"], reply["stderr"]), reply["rc"], reply["stderr"]
        alive = self.proc.poll() is None
        rc = self.stop()
        if alive:
            return "timeout", rc, ""
        return ("memory" if rc == -signal.SIGKILL else "signal"), rc, ""


def standalone(
    case_dir: Path, case: C.Case, mem: int, timeout: float
) -> tuple[str, int, str, str]:
    """Re-run one case in a fresh interpreter, the way a user would hit it."""
    if case.call:
        cmd = [sys.executable, str(HERE / "worker.py"), "--one", str(case_dir)]
    else:
        cmd = [sys.executable, "-m", "edgemoe", *case.argv]
    shown = f"cd {shlex.quote(str(case_dir))} && " + shlex.join(
        c.encode("utf-8", "backslashreplace").decode() for c in cmd
    )
    proc = subprocess.Popen(
        [os.fsencode(c) for c in cmd],
        cwd=case_dir,
        env=_env(),
        preexec_fn=_limits(mem),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return "timeout", proc.returncode, clip(err.decode("utf-8", "replace")), shown
    err = clip(err.decode("utf-8", "replace"))
    return classify(proc.returncode, err), proc.returncode, err, shown


def clip(stderr: str) -> str:
    """The last 40 lines, each cut to 500 characters: an error line that
    quotes 100 KB of input must still be seen to start with ``error:``."""
    return "\n".join(ln[:500] for ln in stderr.splitlines()[-40:])


def _tail(stderr: str, n: int = 6) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()][-n:]


def fuzz(
    reader: str,
    n_cases: int,
    seed: int,
    jobs: int,
    out: Path,
    seeds: C.Seeds,
    mem: int = MEM_CAP,
    timeout: float = TIMEOUT,
    start: int = 0,
    log=print,
) -> dict:
    """Run cases ``start .. start+n_cases`` of ``reader``; the result dict holds
    the counts per class and every finding (standalone-confirmed)."""
    scratch = out / "scratch" / reader
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    counts = dict.fromkeys(CLASSES, 0)
    findings: list[dict] = []
    unconfirmed: list[dict] = []
    slowest: list[tuple] = []  # (seconds, index, what): where the time goes
    errors: list[BaseException] = []
    indices = iter(range(start, start + n_cases))
    lock = threading.Lock()
    t0 = time.time()

    def one(worker: Worker, i: int) -> None:
        case = C.make_case(seeds, reader, seed, i)
        where = scratch / f"case-{i}"
        case.materialize(where)
        req = {"dir": str(where), "argv": case.argv, "call": case.call}
        t = time.time()
        cls, rc, err = worker.run(req)
        secs = time.time() - t
        record = None
        if cls not in OK:
            batch = cls
            cls, rc, err, shown = standalone(where, case, mem, timeout)
            keep = out / "findings" / f"{reader}-{i}"
            record = {
                "reader": reader,
                "index": i,
                "what": case.what,
                "batch": batch,
                "class": cls,
                "rc": rc,
                "stderr_tail": _tail(err),
                "dir": str(keep),
                "command": shown.replace(str(where), str(keep)),
            }
            shutil.rmtree(keep, ignore_errors=True)
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(where), keep)
        else:
            shutil.rmtree(where, ignore_errors=True)
        with lock:
            counts[cls] += 1
            slowest.append((round(secs, 2), i, case.what[:100]))
            slowest.sort(reverse=True)
            del slowest[5:]
            if record is not None:
                (findings if cls not in OK else unconfirmed).append(record)
                log(
                    f"  [{reader} #{i}] batch={record['batch']} standalone={cls}: "
                    + case.what[:100]
                )
                if cls not in OK:
                    log(
                        f"    {record['command']}\n    "
                        + "\n    ".join(record["stderr_tail"][-3:])
                    )

    def loop() -> None:
        worker = Worker(scratch, mem, timeout)
        try:
            while True:
                with lock:
                    i = next(indices, None)
                if i is None or errors:
                    return
                one(worker, i)
        except BaseException as e:  # a harness bug: stop everything, raise below
            errors.append(e)
            raise
        finally:
            worker.stop()

    threads = [threading.Thread(target=loop) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"fuzz harness failed on {reader}") from errors[0]
    return {
        "reader": reader,
        "cases": n_cases,
        "seed": seed,
        "start": start,
        "seconds": round(time.time() - t0, 1),
        "counts": counts,
        "slowest": slowest,
        "findings": sorted(findings, key=lambda f: f["index"]),
        "unconfirmed": sorted(unconfirmed, key=lambda f: f["index"]),
    }


def dedup(findings: list[dict]) -> dict[str, list[dict]]:
    """Findings grouped by class and stderr's last line (or the signal)."""
    groups: dict[str, list[dict]] = {}
    for f in findings:
        last = f["stderr_tail"][-1] if f["stderr_tail"] else f"rc={f['rc']}"
        groups.setdefault(f"{f['class']}: {last[:200]}", []).append(f)
    return groups


def table(results: list[dict]) -> str:
    head = "| reader | cases | " + " | ".join(CLASSES) + " | seconds |"
    rows = [head, "|" + "---|" * (len(CLASSES) + 3)]
    for r in results:
        cells = [str(r["counts"][c]) for c in CLASSES]
        rows.append(
            f"| {r['reader']} | {r['cases']} | "
            + " | ".join(cells)
            + f" | {r['seconds']} |"
        )
    return "\n".join(rows)


def check_baseline(seeds: C.Seeds, out: Path) -> None:
    """The unmutated seeds must run: a broken seed would make every case 'typed'."""
    for case in C.baseline_cases(seeds):
        where = out / "scratch" / f"baseline-{case.reader}"
        shutil.rmtree(where, ignore_errors=True)
        case.materialize(where)
        cls, rc, err, shown = standalone(where, case, MEM_CAP, 120)
        if cls != "success":
            raise SystemExit(
                f"seed baseline for {case.reader} failed ({cls}):\n"
                f"{shown}\n{err[-2000:]}"
            )
        shutil.rmtree(where)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--reader", action="append", choices=C.READERS + ("all",), default=None
    )
    p.add_argument("--cases", type=int, default=1000, help="cases per reader")
    p.add_argument("--start", type=int, default=0, help="first case index")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("fuzz-out"))
    p.add_argument(
        "--seeds", type=Path, default=None, help="seed cache (default OUT/seeds)"
    )
    p.add_argument("--timeout", type=float, default=TIMEOUT)
    p.add_argument("--mem", type=int, default=MEM_CAP, help="RLIMIT_AS per case, bytes")
    args = p.parse_args(argv)
    readers = (
        list(C.READERS) if not args.reader or "all" in args.reader else args.reader
    )
    out = args.out.resolve()
    seeds = C.build_seeds((args.seeds or out / "seeds").resolve())
    check_baseline(seeds, out)
    results = []
    for reader in readers:
        print(
            f"## {reader}: {args.cases} cases from #{args.start}, seed {args.seed}",
            flush=True,
        )
        results.append(
            fuzz(
                reader,
                args.cases,
                args.seed,
                args.jobs,
                out,
                seeds,
                args.mem,
                args.timeout,
                args.start,
                log=lambda s: print(s, flush=True),
            )
        )
    findings = [f for r in results for f in r["findings"]]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + table(results) + "\n")
    for key, group in dedup(findings).items():
        print(
            f"- {key}  ({len(group)} cases)\n"
            f"    e.g. {group[0]['what'][:120]}\n    {group[0]['command']}"
        )
    unconfirmed = [f for r in results for f in r["unconfirmed"]]
    if unconfirmed:
        print(
            f"\n{len(unconfirmed)} batch-only findings did not reproduce "
            "standalone (see results.json)"
        )
    print(f"\nresults: {out / 'results.json'}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
