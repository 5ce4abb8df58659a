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

One run per folder: `train` holds `out_dir/train.lock` (pid and host) while it runs, and refuses a
second run on the same folder; a lock left by a dead process on this host is reported and taken over.
Resuming checks what is on disk: a damaged checkpoint is reported and the newest intact one is used;
a checkpoint records its TrainConfig, and resuming with other values of the fields that shape the
trajectory (`TRAJECTORY_FIELDS`) is refused unless `TrainConfig.allow_changed_resume` is set.

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
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from gistlib.config import check_fields

__all__ = [
    "TrainConfig",
    "train",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "check_checkpoint",
    "make_accelerator",
    "RunLockedError",
    "ResumeMismatchError",
    "TRAJECTORY_FIELDS",
]

# fields that shape the trajectory: resuming with other values would make a hybrid run. The others
# (steps, to extend a run; log_every, save_every, eval_every, patience, progress, max_seconds;
# gradient_checkpointing, which recomputes the same activations; out_dir) may change on resume.
TRAJECTORY_FIELDS = (
    "lr",
    "seed",
    "grad_accum",
    "weight_decay",
    "warmup_steps",
    "final_lr_fraction",
    "max_grad_norm",
    "mixed_precision",
)
LOCK_NAME = "train.lock"


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
    # the plateau check: stop at the first evaluation at or after step `plateau_step` if the best score is still
    # below `plateau_score` (the last record then says "plateau": true; the caller may start another try); 0: never
    plateau_step: int = 0
    plateau_score: float = 0.0
    out_dir: str = "runs/hyper"
    progress: bool = True
    max_seconds: float = 0.0  # wall-clock budget: stop (with a checkpoint) once exceeded; 0: none
    allow_changed_resume: bool = False  # resume even if a TRAJECTORY_FIELDS value differs from the checkpoint's

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
            "plateau_step": self.plateau_step >= 0,
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
    """Restore weights, optimizer, scheduler and RNG from `path`; return the trainer state (has `step`).

    A damaged checkpoint raises `ValueError` naming it (see `check_checkpoint`)."""
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    problem = check_checkpoint(path)
    if problem:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")
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


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (header, then exactly the bytes it announces), or None."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path}: truncated ({path.stat().st_size} bytes, no header)"
            n = int.from_bytes(head, "little")
            size = path.stat().st_size
            if n > size - 8:
                return f"{path}: truncated (header announces {n} bytes, the file has {size - 8} after the length)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size != 8 + n + end:
            return f"{path}: truncated or padded ({size} bytes, the header announces {8 + n + end})"
        with safe_open(path, "pt") as st:  # the library's own header checks
            st.keys()
    except Exception as e:  # any failure to read means damaged, reported with the path
        return f"{path}: {type(e).__name__}: {e}"
    return None


def check_checkpoint(path: str | os.PathLike) -> str | None:
    """None if the checkpoint folder `path` is intact, else what is wrong with it (naming the file).

    Intact: `trainer_state.json` parses and has the keys resuming needs, every `.json` file parses,
    every `.safetensors` file holds exactly the bytes its header announces."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    for required in (state_file, path / "optimizer.safetensors", path / "rng.safetensors", path / "model"):
        if not required.exists():
            return f"{required} is missing"
    for file in sorted(path.rglob("*.json")):
        try:
            value = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{file}: not valid JSON ({e})"
        if file == state_file:
            missing = [k for k in ("step", "optimizer", "scheduler", "python_random") if k not in value]
            if missing:
                return f"{file}: missing {missing}"
    for file in sorted(path.rglob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            return problem
    return None


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-<step>` folder with the highest step, if any (`.tmp` folders are ignored)."""
    found = _checkpoints(out_dir)
    return found[0] if found else None


def _checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders, newest first."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def intact_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that `check_checkpoint` finds intact; each damaged newer one is warned about.
    None (with a warning if damaged ones were found) when there is none."""
    damaged = []
    for path in _checkpoints(out_dir):
        problem = check_checkpoint(path)
        if problem is None:
            if damaged:
                warnings.warn(f"resuming from {path}, the newest intact checkpoint in {out_dir}", stacklevel=3)
            return path
        damaged.append(path)
        warnings.warn(f"checkpoint {path} is damaged, not resuming from it: {problem}", stacklevel=3)
    if damaged:
        warnings.warn(f"no intact checkpoint in {out_dir}: starting from step 0", stacklevel=3)
    return None


# --- one run per folder --------------------------------------------------------------------------


class RunLockedError(RuntimeError):
    """Another live training run holds the folder."""


class ResumeMismatchError(ValueError):
    """Resuming with settings that shape the trajectory differently from the checkpoint's."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """`out_dir/train.lock`, a JSON file {pid, host, started}, created atomically (written aside, then
    hard-linked into place, so a reader never sees half a lock). `acquire` raises `RunLockedError` naming
    the folder and the holder; a lock whose pid is dead on this host is reported and taken over."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def _read(self) -> dict | None:
        try:
            value = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        aside = self.dir / f".{LOCK_NAME}.{self.me['pid']}.{time.monotonic_ns()}"
        aside.write_text(json.dumps({**self.me, "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        try:
            for _ in range(3):
                try:
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        raise
                    except OSError:  # a filesystem without hard links: exclusive create instead
                        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                        with os.fdopen(fd, "w") as f:
                            f.write(aside.read_text())
                    self.held = True
                    return
                except FileExistsError:
                    pass
                try:
                    holder = self._read()
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if holder is None:
                    raise RunLockedError(
                        f"{self.dir} has an unreadable lock file {self.path}; if no run uses this folder, delete it"
                    )
                pid, host = holder.get("pid"), holder.get("host")
                if host == self.me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    warnings.warn(
                        f"{self.path}: stale lock of pid {pid} on {host} (no such process), taking it over",
                        stacklevel=3,
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(
                    f"{self.dir} is in use by another training run (pid {pid} on host {host}, since "
                    f"{holder.get('started', '?')}); wait for it, choose another out_dir, or delete {self.path} "
                    "if that run is gone"
                )
            raise RunLockedError(f"{self.dir}: could not take the lock {self.path}")
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock, if it is still ours."""
        if not self.held:
            return
        self.held = False
        try:
            holder = self._read()
        except FileNotFoundError:
            return
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)


# --- resuming with the same settings -------------------------------------------------------------


def _effective_precision(config: TrainConfig) -> str:
    mp = config.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return mp


def _config_record(config: TrainConfig) -> dict:
    return {"train_config": asdict(config), "mixed_precision_effective": _effective_precision(config)}


def check_resume_config(state: dict, config: TrainConfig, path: Path) -> None:
    """Refuse (`ResumeMismatchError`) to resume `path` with other TRAJECTORY_FIELDS values than it
    was trained with, unless `config.allow_changed_resume`; warn for checkpoints that recorded none."""
    old = state.get("train_config")
    if not isinstance(old, dict):
        warnings.warn(
            f"{path} records no TrainConfig (written by older code): cannot check that the settings match",
            stacklevel=3,
        )
        return
    changed = []
    for name in TRAJECTORY_FIELDS:
        if name not in old:
            continue
        before, now = old[name], getattr(config, name)
        if name == "mixed_precision":
            eff_before = state.get("mixed_precision_effective", before)
            eff_now = _effective_precision(config)
            if eff_before != eff_now:
                changed.append(f"mixed_precision: {before!r} ({eff_before}) -> {now!r} ({eff_now})")
        elif before != now:
            changed.append(f"{name}: {before!r} -> {now!r}")
    if not changed:
        return
    message = f"resuming {path} with other settings than it was trained with would make a hybrid run: " + "; ".join(
        changed
    )
    if config.allow_changed_resume:
        warnings.warn(message + " (allowed: allow_changed_resume=True)", stacklevel=3)
        return
    raise ResumeMismatchError(
        message + f". Use the original values, another out_dir than {path.parent}, "
        "or set TrainConfig.allow_changed_resume=True"
    )


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

    The main process holds `out_dir/train.lock` for the whole run (`RunLockedError` if another run
    holds it). Resuming skips damaged checkpoints (with a warning) and refuses other values of
    `TRAJECTORY_FIELDS` than the checkpoint's (`ResumeMismatchError`) unless `config.allow_changed_resume`.
    """
    accelerator = accelerator or make_accelerator(config)
    lock = RunLock(config.out_dir) if accelerator.is_main_process else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as e:
            error = str(e)
    if accelerator.num_processes > 1:  # every rank learns whether the main one got the lock
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        if lock is not None:
            lock.release()
        raise RunLockedError(error)
    try:
        return _train(hyper, batches, config, accelerator, resume, evaluate, stop_after)
    finally:
        if lock is not None:
            lock.release()


def _train(hyper, batches, config: TrainConfig, accelerator: Accelerator, resume, evaluate, stop_after) -> list[dict]:
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
    last = intact_checkpoint(out) if resume else None
    state = None
    if last is not None:
        state = json.loads((last / "trainer_state.json").read_text())
        check_resume_config(state, config, last)
        state = load_checkpoint(last, hyper, optimizer, scheduler)
        start, best, bad_evals = state["step"], state.get("best", -math.inf), state.get("bad_evals", 0)
    metrics_path = out / "metrics.jsonl"
    records = _read_metrics(metrics_path, upto=start) if start else []
    if start and (not records or records[-1]["step"] != start):
        kept = f"up to step {records[-1]['step']}" if records else "none"
        saved = state.get("last_record") if state else None
        warnings.warn(
            f"{metrics_path} lacks the records up to step {start} of {last} (kept: {kept})"
            + ("; the checkpoint's own last record is restored" if saved else ""),
            stacklevel=2,
        )
        if saved and (not records or records[-1]["step"] < saved["step"]):
            records.append(saved)
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
                    extra = {"best": best, **_config_record(config)}
                    save_checkpoint(out / "best", hyper, optimizer, scheduler, done, extra)
            else:
                bad_evals += 1
                stop = config.patience > 0 and bad_evals >= config.patience
            if config.plateau_step and done >= config.plateau_step and best < config.plateau_score:
                record["plateau"] = stop = True
        records.append(record)
        if main:
            _append_metric(metrics_path, record)
        interrupted = stop_after is not None and done >= stop_after
        interrupted = interrupted or bool(config.max_seconds and time.perf_counter() - t_start > config.max_seconds)
        if main and (
            (config.save_every and done % config.save_every == 0) or done == config.steps or interrupted or stop
        ):
            extra = {"best": best, "bad_evals": bad_evals, "last_record": record, **_config_record(config)}
            save_checkpoint(out / f"checkpoint-{done}", hyper, optimizer, scheduler, done, extra)
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
    """Records with step <= `upto`; a line that does not parse (a torn last line after a crash) or has
    no integer step is dropped with a warning naming the file and line."""
    if not path.exists():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            warnings.warn(f"{path}:{lineno}: dropping a damaged metrics line {line[:60]!r}", stacklevel=3)
            continue
        rows.append(row)
    return [r for r in rows if r["step"] <= upto]
