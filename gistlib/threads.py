"""How many torch threads to use: the cores that are free now, unless the user says.

On a small machine shared with other work, OpenMP threads that land on a busy core spin and wait: on 2 cores
beside one busy process, torch's default of 2 threads ran a training step 7x slower than 1 thread
(`benchmarks/threads.py` measures it). So a run takes the cores nobody else is using, measured over half a second
from /proc/stat (Linux; elsewhere the one-minute load average, which also counts work that just ended, such as
`make main`'s own set-up), and says so in one line with the way to change it:

    torch.set_num_threads(choose_threads(exp.run.threads))   # 0 / None: choose; N > 0: exactly N

`OMP_NUM_THREADS=N` in the environment counts as asking for N when run.threads does not say.
"""

from __future__ import annotations

import os
import time

__all__ = ["usable_cores", "busy_cores", "free_cores", "omp_threads", "choose_threads"]


def usable_cores() -> int:
    """Cores this process may run on: its affinity set (a container's cpuset, `taskset`), else `os.cpu_count()`."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _cpu_times(stat_path: str, cpus: set[int] | None) -> tuple[float, float]:
    """(total, idle) jiffies summed over the `cpuN` lines of /proc/stat for N in `cpus` (None: every one);
    idle counts iowait too, total leaves out guest time (already inside user)."""
    total = idle = 0.0
    with open(stat_path) as f:
        for line in f:
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue
            if cpus is not None and int(name[3:]) not in cpus:
                continue
            values = [float(v) for v in fields[:8]]
            total += sum(values)
            idle += values[3] + (values[4] if len(values) > 4 else 0.0)
    return total, idle


def busy_cores(seconds: float = 0.5, stat_path: str = "/proc/stat") -> float | None:
    """How many of this process's cores other work kept busy over the next `seconds` (this process sleeps
    meanwhile), from /proc/stat; None where there is no /proc/stat (macOS, Windows) or nothing was counted."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        total0, idle0 = _cpu_times(stat_path, cpus)
        time.sleep(seconds)
        total1, idle1 = _cpu_times(stat_path, cpus)
    except (OSError, ValueError):
        return None
    counted = len(cpus) if cpus else usable_cores()
    if total1 <= total0:
        return None
    return counted * (1.0 - (idle1 - idle0) / (total1 - total0))


def _load_now() -> tuple[float, str]:
    """(busy cores, how they were measured): /proc/stat over half a second, else the one-minute load average."""
    busy = busy_cores()
    if busy is not None:
        return busy, f"{busy:.1f} busy over 0.5 s"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return load, f"load average {load:.1f}"


def free_cores(cpu_count: int | None = None, load: float | None = None) -> int:
    """Cores not busy with other processes: `cpu_count - round(load)`, at least 1 and at most `cpu_count`.

    Defaults: `usable_cores()` and the busy cores measured now (`busy_cores`, else the load average).
    """
    cpus = cpu_count or usable_cores()
    if load is None:
        load = _load_now()[0]
    return max(1, min(cpus, cpus - round(load)))


def omp_threads() -> int | None:
    """The thread count `OMP_NUM_THREADS` asks for (its first entry, as in "4,2"); None when it is unset, empty, not
    a number or not positive (OpenMP ignores it then too)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def choose_threads(requested: int | None = None, announce: bool = True) -> int:
    """The torch thread count to use: `requested` if it is a positive number, else `OMP_NUM_THREADS` where it is
    set (`omp_threads`), else `free_cores()`.

    With `announce`, prints one line saying which count it uses, why, and how to change it
    (`--set run.threads=N`). Returns the count; the caller passes it to `torch.set_num_threads`.
    """
    if requested is not None and requested < 0:
        raise ValueError(f"run.threads must be >= 0 (0: choose from the free cores), got {requested}")
    cpus = usable_cores()
    if requested:
        chosen, why = requested, "as asked by run.threads"
    elif omp_threads() is not None:
        chosen, why = omp_threads(), "as asked by OMP_NUM_THREADS"
    else:
        load, how = _load_now()
        chosen, why = free_cores(cpus, load), f"the free cores of {cpus} ({how})"
    if announce:
        print(f"torch threads: {chosen}, {why}; change with --set run.threads=N", flush=True)
    return chosen
