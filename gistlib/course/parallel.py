"""Training an experiment's models side by side: one process per free core, one torch thread each.

A tiny model's matrix multiplies barely speed up with a second thread, and a thread that waits on a busy core
costs many times its share (`gistlib.threads`). Independent training runs (every seed of Gisting and HyperLlama,
multitask ICL) scale with processes instead. Each job trains into its own folder of `run.cache_dir`, exactly as
the runner would in its own process, and the runner then loads them from there; each process runs one torch
thread, so a run's trained numbers do not depend on how many processes trained them. The prefix-tuning ladder
(one job per start) joins the queue once the HyperLlama it starts from is trained, and its scores come back:

    side = train_side_by_side(exp, workers=2)   # then run_experiment(exp) finds every model cached
    side.prefix_tuning                          # {prefix_tuning_<start>: {budget: scores}}
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from tqdm.auto import tqdm

from .experiment import Experiment

__all__ = ["Job", "SideBySide", "training_jobs", "ladder_jobs", "train_side_by_side"]


class Job(NamedTuple):
    """One job of a worker: train (method hyperllama, gisting, multitask_icl) or tune prefixes (prefix_tuning,
    from `start`, on the HyperLlama of gist count k and seed)."""

    method: str
    k: int
    seed: int
    start: str = ""


@dataclass
class SideBySide:
    """What train_side_by_side did: how many jobs ran (0: none, the runner trains in its own process) and the
    prefix-tuning ladder they tuned ({}: none, the runner tunes it)."""

    jobs: int = 0
    prefix_tuning: dict[str, dict] = field(default_factory=dict)


def training_jobs(exp: Experiment) -> list[Job]:
    """The trained models `exp` scores, longest first: HyperLlama runs, Gisting seeds, multitask ICL."""
    from .runner import hyper_runs

    jobs = [Job("hyperllama", k, seed) for k, seed in hyper_runs(exp)]
    if exp.runs("gisting"):
        jobs += [Job("gisting", exp.hyper.num_gist_tokens, seed) for seed in exp.run.seeds]
    if exp.runs("multitask_icl"):
        jobs.append(Job("multitask_icl", 0, 0))
    return jobs


def ladder_jobs(exp: Experiment) -> list[Job]:
    """One prefix-tuning job per configured start, all from the HyperLlama the runner tunes from (the first run:
    num_gist_tokens, the first seed); none unless prefix_tuning and hyperllama both run."""
    from .runner import hyper_runs, ladder_starts

    if not (exp.runs("prefix_tuning") and hyper_runs(exp)):
        return []
    k, seed = exp.hyper.num_gist_tokens, exp.run.seeds[0]
    return [Job("prefix_tuning", k, seed, s) for s in ladder_starts(exp)]


_LOADED: dict[str, tuple] = {}  # in a worker process: the bundle of the experiment it runs, loaded once


def _bundles(exp: Experiment) -> tuple:
    """(load_bundle(exp), its trainer_bundle), once per worker process: every job of a run shares them, as in
    the runner's own process."""
    from .runner import load_bundle, trainer_bundle

    key = json.dumps(exp.to_dict(), sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()
        b = load_bundle(exp)
        _LOADED[key] = (b, trainer_bundle(b))
    return _LOADED[key]


def _run_job(exp: Experiment, job: Job) -> tuple[Job, dict]:
    """In a worker process, at one torch thread: train (or find cached) one model, {} back; or tune prefixes from
    one start on the cached HyperLlama, {budget: scores} back."""
    import torch

    from .runner import (
        hyper_prefix_method,
        test_episodes,
        train_gisting,
        train_hyper,
        train_multitask_icl,
        tune_from_start,
    )

    torch.set_num_threads(1)
    b, tb = _bundles(exp)
    if job.method == "hyperllama":
        train_hyper(tb, job.k, job.seed)
    elif job.method == "gisting":
        train_gisting(tb, job.k, job.seed)
    elif job.method == "multitask_icl":
        train_multitask_icl(tb)
    else:
        hyper, _ = train_hyper(tb, job.k, job.seed)  # trained already: loaded from the cache
        test = test_episodes(b)
        with torch.no_grad():
            _, prefixes = hyper_prefix_method(hyper, test, b)  # every test episode, as the runner makes them
        return job, tune_from_start(b, hyper, prefixes, test, job.start)
    return job, {}


def train_side_by_side(exp: Experiment, workers: int) -> SideBySide:
    """Train every model of `training_jobs(exp)` on `workers` processes (spawned, one torch thread each) into
    run.cache_dir, then tune the `ladder_jobs(exp)` there as soon as their HyperLlama is trained. Nothing runs
    when workers < 2 or there is at most one training job (the runner then trains in its own process). The
    pocket base must already exist (load_bundle makes it first)."""
    jobs, ladder = training_jobs(exp), ladder_jobs(exp)
    if workers < 2 or len(jobs) < 2:
        return SideBySide()
    quiet = replace(exp, run=replace(exp.run, progress=False))
    workers = min(workers, len(jobs))
    extra = f", then prefix tuning from {len(ladder)} starts" if ladder else ""
    print(f"training {len(jobs)} models on {workers} processes, one torch thread each{extra}", flush=True)
    out = SideBySide(jobs=len(jobs) + len(ladder))
    bar = tqdm(total=out.jobs, desc="side-by-side jobs", disable=not exp.run.progress)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: set[Future] = {pool.submit(_run_job, quiet, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job, scores = future.result()  # a worker's error is raised here, naming nothing lost: caches are atomic
                bar.update()
                bar.set_postfix_str(f"{job.method} {job.start or f'k={job.k} seed={job.seed}'}")
                if job.method == "prefix_tuning":
                    out.prefix_tuning[f"prefix_tuning_{job.start}"] = scores
                elif ladder and (job.method, job.k, job.seed) == ("hyperllama", ladder[0].k, ladder[0].seed):
                    pending |= {pool.submit(_run_job, quiet, lj) for lj in ladder}  # queued after the training
    bar.close()
    out.prefix_tuning = {f"prefix_tuning_{j.start}": out.prefix_tuning[f"prefix_tuning_{j.start}"] for j in ladder}
    return out
