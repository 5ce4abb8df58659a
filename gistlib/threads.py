"""How many torch threads to use: the cores that are free now, unless the user says.

On a small machine shared with other work, OpenMP threads that land on a busy core spin and wait: on 2 cores
beside one busy process, torch's default of 2 threads ran a training step 7x slower than 1 thread
(`benchmarks/threads.py` measures it). So a run takes the cores nobody else is using, judged from the
one-minute load average, and says so in one line with the way to change it:

    torch.set_num_threads(choose_threads(exp.run.threads))   # 0 / None: choose; N > 0: exactly N
"""

from __future__ import annotations

import os

__all__ = ["free_cores", "choose_threads"]


def free_cores(cpu_count: int | None = None, load: float | None = None) -> int:
    """Cores not busy with other processes: `cpu_count - round(load)`, at least 1 and at most `cpu_count`.

    Defaults: `os.cpu_count()` and the one-minute `os.getloadavg()` (no load average, e.g. Windows: all cores).
    """
    cpus = cpu_count or os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpus, cpus - round(load)))


def choose_threads(requested: int | None = None, announce: bool = True) -> int:
    """The torch thread count to use: `requested` if it is a positive number, else `free_cores()`.

    With `announce`, prints one line saying which count it uses, why, and how to change it
    (`--set run.threads=N`). Returns the count; the caller passes it to `torch.set_num_threads`.
    """
    if requested is not None and requested < 0:
        raise ValueError(f"run.threads must be >= 0 (0: choose from the free cores), got {requested}")
    cpus = os.cpu_count() or 1
    if requested:
        chosen, why = requested, "as asked by run.threads"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        chosen, why = free_cores(cpus, load), f"the free cores of {cpus} (load average {load:.1f})"
    if announce:
        print(f"torch threads: {chosen}, {why}; change with --set run.threads=N", flush=True)
    return chosen
