"""One training loop, on accelerate: a CPU here, one GPU, or several with the same code.

It trains any *trainee*: an `nn.Module` with `loss_and_backward(**batch, loss_scale=...)`,
`save_pretrained(path)` and `load_trainable(path)`. Two exist: `HyperLlama` (the hypernetwork) and
`gistlib.core.lm.LMTrainee` (a whole causal LM under a causal or gist mask: the pocket base, Gisting).

    for each step:   for each of `grad_accum` micro-batches:  loss_and_backward(batch, 1/grad_accum)
                     all-reduce gradients across processes (mean)     # identical on every rank
                     clip, AdamW step, warmup + linear decay
                     log {step, loss, lr, tokens_per_s} to metrics.jsonl; checkpoint every `save_every`

Batches are dicts of tensors that the trainee's `loss_and_backward` takes (for HyperLlama:
`hyper_input_ids`, `hyper_attention_mask`, `input_ids`, `attention_mask`, `labels`, optional
`task_index`) from any iterable, so every stage (hyperpretraining, multi-task) plugs in.
With several processes, process r takes batches r, r + P, r + 2P, ...

Checkpoints are folders `checkpoint-<step>/` written to a temporary name and renamed when complete:
the trainable weights (LoRA in PEFT's format, gist table, prefix head), optimizer state
(safetensors), scheduler, RNG state and step (JSON + safetensors). Nothing is unpickled. Resuming
replays the batch stream, skipping what was consumed, and reproduces the uninterrupted losses exactly.

Why not DDP: the two-phase backward of `HyperLlama.loss_and_backward` and the adapters that get no
gradient (last layer q/o/MLP) fight DDP's reducer; an explicit all-reduce of the few trainable
tensors is simpler and just as correct.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from gistlib.config import check_fields

__all__ = ["TrainConfig", "train", "latest_checkpoint", "save_checkpoint", "load_checkpoint", "make_accelerator"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Every field is checked in `__post_init__` (errors name the field)."""

    steps: int = 200  # optimizer steps
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    warmup_steps: int = 20  # linear warmup, then linear decay to `final_lr_fraction * lr`
    final_lr_fraction: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "auto"  # auto: bf16 where the device has it, else fp32 | no | bf16
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: never; else call `evaluate(hyper, step)` and keep the best weights
    patience: int = 0  # early stopping after this many evaluations without improvement (0: never stop)
    out_dir: str = "runs/hyper"
    progress: bool = True
    max_seconds: float = 0.0  # wall-clock budget: stop (with a checkpoint) once exceeded; 0: none

    def __post_init__(self):
        checks = {
            "steps": self.steps >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": 0 <= self.warmup_steps <= self.steps,
            "final_lr_fraction": 0 <= self.final_lr_fraction <= 1,
            "grad_accum": self.grad_accum >= 1,
            "max_grad_norm": self.max_grad_norm >= 0,
            "mixed_precision": self.mixed_precision in ("auto", "no", "bf16"),
            "log_every": self.log_every >= 1,
            "save_every": self.save_every >= 0,
            "eval_every": self.eval_every >= 0,
            "patience": self.patience >= 0,
        }
        check_fields(self, checks)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then linear decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    done = (step - config.warmup_steps) / span
    return 1.0 - (1.0 - config.final_lr_fraction) * min(1.0, done)


def make_accelerator(config: TrainConfig, cpu: bool | None = None) -> Accelerator:
    """An Accelerator with bf16 where the device supports it (mixed_precision='auto')."""
    from accelerate.state import AcceleratorState

    mp = config.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mp:
        # accelerate keeps one state per process: a notebook that switches precision needs a fresh one
        AcceleratorState._reset_state(True)
    return Accelerator(mixed_precision=mp, cpu=bool(cpu) if cpu is not None else not torch.cuda.is_available())


# --- checkpoints --------------------------------------------------------------------------------


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors + JSON-able param groups (no pickle)."""
    state = optimizer.state_dict()
    tensors = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: str | os.PathLike, hyper: nn.Module, optimizer, scheduler, step: int, extra: dict | None = None
) -> Path:
    """Write `path` atomically: into `path.tmp`, then rename. Returns the final path."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hyper.save_pretrained(tmp / "model")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / "rng.safetensors")
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": sched,
        "python_random": random.getstate(),
        **(extra or {}),
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: str | os.PathLike, hyper: nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; return the trainer state (has `step`)."""
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    hyper.load_trainable(path / "model")
    state = json.loads((path / "trainer_state.json").read_text())
    _restore_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    py = state["python_random"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-<step>` folder with the highest step, if any (`.tmp` folders are ignored)."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


# --- the loop ------------------------------------------------------------------------------------


def _shard(batches: Iterable[dict], rank: int, world: int, skip: int) -> Iterator[dict]:
    """This process's batches, after skipping the first `skip` global batches."""
    stream = islice(iter(batches), skip, None)
    return (b for i, b in enumerate(stream) if i % world == rank)


def _all_reduce_grads(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="mean")


def _tokens(batch: dict) -> int:
    """Real tokens in a batch: every `*attention_mask` counted."""
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


def train(
    hyper: nn.Module,
    batches: Iterable[dict],
    config: TrainConfig,
    accelerator: Accelerator | None = None,
    resume: bool = True,
    evaluate: Callable[[nn.Module, int], float] | None = None,
    stop_after: int | None = None,
) -> list[dict]:
    """Train the trainee `hyper` for `config.steps` optimizer steps; return the metric records (also in metrics.jsonl).

    resume: continue from the latest checkpoint in `config.out_dir` if there is one.
    evaluate: called every `eval_every` steps, returns a score (higher is better); the best weights
    are saved to `out_dir/best` and early stopping uses `patience`.
    stop_after: stop (with a checkpoint) after this many steps, as an interruption would (for tests).
    """
    accelerator = accelerator or make_accelerator(config)
    out = Path(config.out_dir)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    params = [p for p in hyper.parameters() if p.requires_grad]
    if params[0].device != accelerator.device:  # a 4-bit base is placed when loaded, never moved
        hyper.to(accelerator.device)
    if config.gradient_checkpointing:
        hyper.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))

    start, best, bad_evals = 0, -math.inf, 0
    last = latest_checkpoint(out) if resume else None
    if last is not None:
        state = load_checkpoint(last, hyper, optimizer, scheduler)
        start, best, bad_evals = state["step"], state.get("best", -math.inf), state.get("bad_evals", 0)
    metrics_path = out / "metrics.jsonl"
    records = _read_metrics(metrics_path, upto=start) if start else []
    if main:
        _write_metrics(metrics_path, records)

    stream = _shard(
        batches,
        accelerator.process_index,
        accelerator.num_processes,
        skip=start * config.grad_accum * accelerator.num_processes,
    )
    hyper.train()
    bar = tqdm(total=config.steps, initial=start, disable=not (main and config.progress), desc="train")
    t_last, tokens = time.perf_counter(), 0
    t_start = t_last
    step = start
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            batch = next(stream, None)
            if batch is None:
                raise ValueError(
                    f"the batch stream ended at step {step}: give at least steps x grad_accum x processes = "
                    f"{config.steps * config.grad_accum * accelerator.num_processes} batches"
                )
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss = hyper.loss_and_backward(**batch, loss_scale=1.0 / config.grad_accum)
            loss_sum += loss.item() / config.grad_accum
            tokens += _tokens(batch)
        _all_reduce_grads(params, accelerator)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        loss_mean = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean").item()
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_mean:.3f}")
        record = {"step": done, "loss": loss_mean, "lr": lr}
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            record["tokens_per_s"] = tokens * accelerator.num_processes / max(now - t_last, 1e-9)
            t_last, tokens = now, 0
        stop = False
        if evaluate is not None and config.eval_every and done % config.eval_every == 0:
            score = float(evaluate(hyper, done))
            hyper.train()
            record["eval"] = score
            if score > best:
                best, bad_evals = score, 0
                if main:
                    save_checkpoint(out / "best", hyper, optimizer, scheduler, done, {"best": best})
            else:
                bad_evals += 1
                stop = config.patience > 0 and bad_evals >= config.patience
        records.append(record)
        if main:
            _append_metric(metrics_path, record)
        interrupted = stop_after is not None and done >= stop_after
        interrupted = interrupted or bool(config.max_seconds and time.perf_counter() - t_start > config.max_seconds)
        if main and (
            (config.save_every and done % config.save_every == 0) or done == config.steps or interrupted or stop
        ):
            save_checkpoint(
                out / f"checkpoint-{done}", hyper, optimizer, scheduler, done, {"best": best, "bad_evals": bad_evals}
            )
        accelerator.wait_for_everyone()
        if interrupted or stop:
            break
    bar.close()
    return records


def _append_metric(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _write_metrics(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]
