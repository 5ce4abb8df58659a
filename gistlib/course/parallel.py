"""Training an experiment's models side by side: one process per free core, one torch thread each.

A tiny model's matrix multiplies barely speed up with a second thread, and a thread that waits on a busy core
costs many times its share (`gistlib.threads`). Independent training runs (every seed of Gisting and HyperLlama,
multitask ICL) scale with processes instead. Each job trains into its own folder of `run.cache_dir`, exactly as
the runner would in its own process, and the runner then loads them from there; each process runs one torch
thread, so a run's trained numbers do not depend on how many processes trained them:

    train_side_by_side(exp, workers=2)   # then run_experiment(exp) finds every model cached
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace

from tqdm.auto import tqdm

from .experiment import Experiment

__all__ = ["training_jobs", "train_side_by_side"]

Job = tuple[str, int, int]  # (method, k, seed)


def training_jobs(exp: Experiment) -> list[Job]:
    """The trained models `exp` scores, longest first: HyperLlama runs, Gisting seeds, multitask ICL."""
    from .runner import hyper_runs

    jobs: list[Job] = [("hyperllama", k, seed) for k, seed in hyper_runs(exp)]
    if exp.runs("gisting"):
        jobs += [("gisting", exp.hyper.num_gist_tokens, seed) for seed in exp.run.seeds]
    if exp.runs("multitask_icl"):
        jobs.append(("multitask_icl", 0, 0))
    return jobs


def _train_job(exp: Experiment, job: Job) -> Job:
    """In a worker process: train (or find cached) one model at one torch thread."""
    import torch

    from .runner import load_bundle, train_gisting, train_hyper, train_multitask_icl, trainer_bundle

    torch.set_num_threads(1)
    tb = trainer_bundle(load_bundle(exp))
    method, k, seed = job
    if method == "hyperllama":
        train_hyper(tb, k, seed)
    elif method == "gisting":
        train_gisting(tb, k, seed)
    else:
        train_multitask_icl(tb)
    return job


def train_side_by_side(exp: Experiment, workers: int) -> int:
    """Train every model of `training_jobs(exp)` on `workers` processes (spawned, one torch thread each) into
    run.cache_dir; returns how many jobs ran (0 when workers < 2 or there is at most one job: the runner then
    trains in its own process). The pocket base must already exist (load_bundle makes it first)."""
    jobs = training_jobs(exp)
    if workers < 2 or len(jobs) < 2:
        return 0
    quiet = replace(exp, run=replace(exp.run, progress=False))
    workers = min(workers, len(jobs))
    print(f"training {len(jobs)} models on {workers} processes, one torch thread each", flush=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_job, quiet, job): job for job in jobs}
        bar = tqdm(as_completed(futures), total=len(jobs), desc="trained models", disable=not exp.run.progress)
        for done in bar:
            method, k, seed = done.result()  # a worker's error is raised here, naming nothing lost: caches are atomic
            bar.set_postfix_str(f"{method} k={k} seed={seed}")
    return len(jobs)
