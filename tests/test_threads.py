"""The compute-thread tuner (runtime/threads.py) on simulated machines: it
settles on the faster count, follows a change of load, and its probes cost
a bounded share of the time; and a real model runs with it."""

from __future__ import annotations

import pytest

from edgemoe.runtime.threads import ThreadTuner, _free_cores

QUIET = {2: 1.0, 1: 1.7}  # ms per graph: two threads help
BUSY = {2: 120.0, 1: 1.8}  # another process holds a core: barriers stall


def drive(tuner, states, machine: dict, steps: int) -> float:
    """Run ``steps`` decode steps of every graph on ``machine``; total time."""
    total = 0.0
    for _ in range(steps):
        tuner.begin_step()
        for s, scale in states:
            t = machine[tuner.threads] * scale * 1e-3
            tuner.record(s, t)
            total += t
        tuner.end_step()
    return total


def graphs(tuner, n=12):
    # Graphs of different sizes, as a decode step has.
    return [(tuner.new_state(), 1.0 + 0.5 * i) for i in range(n)]


def best_time(machine, states, calls):
    return min(machine.values()) * sum(s for _, s in states) * 1e-3 * calls


@pytest.mark.parametrize("machine", [QUIET, BUSY], ids=["quiet", "busy"])
@pytest.mark.parametrize("start", [2, 1], ids=["start-2", "start-1"])
def test_settles_on_the_faster_count_within_15_percent(machine, start):
    tuner = ThreadTuner(2, fixed=False, start=start)
    states = graphs(tuner)
    drive(tuner, states, machine, 200)  # a short warm-up run
    steady = drive(tuner, states, machine, 2000)
    assert steady <= 1.15 * best_time(machine, states, 2000)
    assert tuner.best == min(machine, key=machine.get)
    # Probing never costs more than its budget (plus one probe's worth).
    assert tuner.probe_s <= tuner.PROBE_SHARE * tuner.compute_s + 0.15


def test_follows_the_load_when_it_changes():
    tuner = ThreadTuner(2, fixed=False, start=2)
    states = graphs(tuner)
    drive(tuner, states, QUIET, 500)
    assert tuner.best == 2
    drive(tuner, states, BUSY, 50)  # a CPU-bound process starts
    assert tuner.best == 1
    busy = drive(tuner, states, BUSY, 2000)
    assert busy <= 1.15 * best_time(BUSY, states, 2000)
    drive(tuner, states, QUIET, 3000)  # it stops again
    assert tuner.best == 2
    quiet = drive(tuner, states, QUIET, 1000)
    assert quiet <= 1.15 * best_time(QUIET, states, 1000)


def test_fixed_thread_count_is_never_changed():
    tuner = ThreadTuner(2, fixed=True)
    s = tuner.new_state()
    for _ in range(100):
        tuner.begin_step()
        assert tuner.threads == 2
        tuner.record(s, 1.0)
        tuner.end_step()
    assert tuner.summary() == {2: 1.0}


def test_more_cores_try_halvings():
    tuner = ThreadTuner(8, fixed=False, start=8)
    assert tuner.choices == [8, 4, 2, 1]
    # Four threads fastest (say, four performance cores of eight).
    machine = {8: 3.0, 4: 1.0, 2: 1.6, 1: 3.0}
    states = graphs(tuner, 4)
    drive(tuner, states, machine, 3000)
    assert tuner.best == 4


def test_free_cores_from_the_running_count(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    path, tasks = tmp_path / "loadavg", tmp_path / "task"
    for tid, state in ((100, "R"), (101, "S"), (102, "R")):
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (py thr) {state} 1 2 3\n")
    path.write_text("0.5 0.4 0.3 2/80 4321\n")  # our two running threads
    assert _free_cores(2, path, tasks) == 2
    path.write_text("1.9 1.4 0.8 3/80 4321\n")  # and one other task
    assert _free_cores(2, path, tasks) == 1
    path.write_text("9.0 9.0 9.0 12/80 4321\n")
    assert _free_cores(2, path, tasks) == 1
    assert _free_cores(2, tmp_path / "missing", tasks) == 2


def test_a_model_runs_and_reports_its_thread_use(converted_fixture):
    import edgemoe

    with edgemoe.load(converted_fixture) as m:
        m.eval([1, 2, 3])
        for t in range(40):
            m.eval([4 + t % 5])
        use = m.device.tuner.summary()
    assert use and abs(sum(use.values()) - 1.0) < 1e-9
    assert set(use) <= {1, 2, m.device.n_threads}
