"""Thread choice: free cores from the cores busy now (/proc/stat, else the load average), an explicit count wins,
one line says which and how to change."""

import multiprocessing
import os
import time

import pytest

import gistlib.threads as threads
from gistlib.threads import busy_cores, choose_threads, free_cores


@pytest.fixture(autouse=True)
def _no_omp_num_threads(monkeypatch):
    """The choice is tested from a clean environment, whatever OMP_NUM_THREADS the test run itself has."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(
    "cpus,load,expected", [(2, 0.0, 2), (2, 1.2, 1), (2, 1.6, 1), (2, 5.0, 1), (16, 3.4, 13), (4, 0.4, 4)]
)
def test_free_cores_leaves_busy_cores_alone(cpus, load, expected):
    assert free_cores(cpus, load) == expected


def test_an_explicit_count_wins_and_the_choice_is_announced(capsys, monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: None)  # no /proc/stat: the load average decides
    monkeypatch.setattr("os.getloadavg", lambda: (1.3, 1.0, 1.0))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert choose_threads(3) == 3
    assert choose_threads(None) == 1 and choose_threads(0) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("--set run.threads=N" in line for line in lines)
    assert "torch threads: 1" in lines[1] and "load average 1.3" in lines[1]
    assert choose_threads(None, announce=False) == 1 and capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="run.threads"):
        choose_threads(-1)


def test_omp_num_threads_counts_as_asking_unless_run_threads_says(capsys, monkeypatch):
    """`OMP_NUM_THREADS=1 make main` (a learner's way to ask for one thread) runs at 1 thread on a free 2-core
    machine; run.threads still wins; a value OpenMP would ignore leaves the choice to the free cores."""
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(None) == 1 and "as asked by OMP_NUM_THREADS" in capsys.readouterr().out
    assert choose_threads(2, announce=False) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert choose_threads(None, announce=False) == 3
    for ignored in ("", "0", "-2", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert choose_threads(None, announce=False) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert choose_threads(None, announce=False) == 2


def test_measured_busy_cores_win_over_a_stale_load_average(capsys, monkeypatch):
    """A load average still high from work that has ended (make main's own set-up) must not cost a core."""
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.1)
    monkeypatch.setattr("os.getloadavg", lambda: (1.6, 1.0, 1.0))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert choose_threads(None) == 2
    assert "0.1 busy over 0.5 s" in capsys.readouterr().out


def test_usable_cores_are_the_affinity_set_not_the_host(monkeypatch):
    """In a container (or under taskset) allowed 2 of a host's 64 cores, threads are chosen from those 2."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {4, 5}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    assert threads.usable_cores() == 2
    assert free_cores() == 2 and choose_threads(None, announce=False) == 2
    monkeypatch.delattr("os.sched_getaffinity")  # macOS, Windows: no affinity call, the host's count
    assert threads.usable_cores() == 64


def _stat(cpu_lines: list[str]) -> str:
    return "cpu  1 2 3 4 5 6 7 8 0 0\n" + "".join(f"{line}\n" for line in cpu_lines) + "intr 12345\nctxt 99\n"


def test_busy_cores_reads_the_cores_of_this_process(tmp_path, monkeypatch):
    """Per-core lines of /proc/stat (user nice system idle iowait irq softirq steal guest ...), between two reads
    half-busy on cpu0, idle on cpu1, and cpu2 (fully busy) outside this process's affinity."""
    stat = tmp_path / "stat"
    before = _stat(["cpu0 100 0 0 100 0 0 0 0 50 0", "cpu1 0 0 0 200 0 0 0 0 0 0", "cpu2 0 0 0 0 0 0 0 0 0 0"])
    after = _stat(["cpu0 150 0 0 140 10 0 0 0 90 0", "cpu1 0 0 0 300 0 0 0 0 0 0", "cpu2 100 0 0 0 0 0 0 0 0 0"])
    stat.write_text(before)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr("time.sleep", lambda s: stat.write_text(after))
    # cpu0: 100 jiffies, 50 of them idle or iowait (guest not counted twice); cpu1: 100, all idle -> 2 x 50 / 200
    assert busy_cores(stat_path=str(stat)) == pytest.approx(0.5)
    assert busy_cores(stat_path=str(tmp_path / "missing")) is None


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat (Linux)")
def test_busy_cores_sees_a_spinning_process():
    """Against the real kernel counters: a child spinning on one core shows up as (about) one busy core."""
    child = multiprocessing.get_context("spawn").Process(target=_spin, args=(6.0,))
    child.start()
    try:
        time.sleep(1.5)  # the spawned interpreter starts, then spins
        busy = busy_cores(1.0)
    finally:
        child.join()
    assert busy is not None and busy >= 0.75
