"""`python -m gistlib train --config run.json`: one HyperLlama training run (no evaluation), on one process or many.

The same entry point runs on one process or many:

    python -m gistlib train --config run.json                                    # this CPU / one GPU
    accelerate launch --cpu --num_processes 2 -m gistlib train --config run.json  # 2 CPU processes
    accelerate launch --num_processes 4 -m gistlib train --config run.json        # 4 GPUs, same code

Config sections (every field optional; unknown or bad fields are errors naming `section.field`):

    {"model": {"path": null, "quantization": null, ...TinyLlamaConfig fields, "seed": 0},
     "hyper": {...HyperConfig fields},
     "train": {...TrainConfig fields},
     "data":  {"stage": "multitask" | "hyperpretrain", "families": ["classify"], "tasks_per_batch": 32,
               "queries_per_task": 4, "repeat_demo_prob": 0.5, "teacher_queries": 0, "seed": 0}}

With `model.path` unset the base is a tiny Llama built from the TinyLlamaConfig fields (random, or
the pocket base if `path` points at data/pocket_base). Each process writes its final trainable weights
to `out_dir/final-rank<r>.safetensors`, so a multi-process run can be checked for identical ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from safetensors.torch import save_file

from gistlib.config import ConfigError, apply_overrides, build, read_json
from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.models.tiny import TinyLlamaConfig, build_tiny_llama, gist_token_ids
from gistlib.train.loop import TrainConfig, make_accelerator, train

__all__ = ["DataConfig", "ModelConfig", "load_run_config", "run_train_config"]


@dataclass
class DataConfig:
    stage: str = "multitask"  # multitask: pocket training tasks | hyperpretrain: the pocket plain-text corpus
    families: tuple[str, ...] = ("classify",)
    tasks_per_batch: int = 32
    queries_per_task: int = 4
    repeat_demo_prob: float = 0.5
    teacher_queries: int = 0  # queries per task with an in-context teacher row (ICL distillation, gistlib.core.distill)
    seed: int = 0

    def __post_init__(self):
        if self.stage not in ("multitask", "hyperpretrain"):
            raise ValueError(f"data.stage = {self.stage!r}: use 'multitask' or 'hyperpretrain'")
        if self.tasks_per_batch < 1 or self.queries_per_task < 1:
            raise ValueError("data.tasks_per_batch and data.queries_per_task must be >= 1")
        if not 0 <= self.teacher_queries <= self.queries_per_task:
            raise ValueError("data.teacher_queries must be between 0 and data.queries_per_task")


@dataclass
class ModelConfig(TinyLlamaConfig):
    path: str | None = None  # a saved Llama-architecture checkpoint (HF folder or hub id)
    quantization: str | None = None  # nf4 | int8 | None (only with `path`)
    seed: int = 0


SECTIONS = {"model": ModelConfig, "hyper": HyperConfig, "train": TrainConfig, "data": DataConfig}


def load_run_config(path: str | None, overrides: list[str] | None = None) -> dict:
    """Read the JSON config, apply `section.field=value` overrides (all of them, in order), build the typed
    sections with the one parser (`gistlib.config`: errors name `section.field`)."""
    raw = apply_overrides(read_json(path) if path else {}, overrides, SECTIONS)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return {name: build(cls, raw.get(name), name) for name, cls in SECTIONS.items()}


def _base(model_cfg: ModelConfig, tok):
    if model_cfg.path:
        from gistlib.models.loading import load_llama

        return load_llama(model_cfg.path, quantization=model_cfg.quantization, gradient_checkpointing=False)
    sizes = {f.name: getattr(model_cfg, f.name) for f in fields(TinyLlamaConfig)}
    return build_tiny_llama(TinyLlamaConfig(**sizes), seed=model_cfg.seed, tokenizer=tok)


def run_train_config(path: str | None, overrides: list[str] | None = None) -> list[dict]:
    """Build tokenizer, base, HyperLlama and batch stream from the config, then train."""
    from gistlib.data import load_pocket_corpus, load_pocket_suite, pocket_tokenizer
    from gistlib.data.batches import hyper_batches, hyperpretrain_batches, sample_episodes

    cfg = load_run_config(path, overrides)
    h: HyperConfig = cfg["hyper"]
    d: DataConfig = cfg["data"]
    tok = pocket_tokenizer(max(16, h.num_gist_tokens))
    gist = gist_token_ids(tok)[: h.num_gist_tokens]
    hyper = HyperLlama(_base(cfg["model"], tok), gist, h)
    if d.stage == "multitask":
        tasks = [t for t in load_pocket_suite()["train"] if t.family in d.families]
        episodes = sample_episodes(tasks, d.seed, d.queries_per_task, d.repeat_demo_prob)
        batches = hyper_batches(episodes, tok, gist, d.tasks_per_batch, teacher_queries=d.teacher_queries)
    else:
        batches = hyperpretrain_batches(load_pocket_corpus(), tok, gist, d.tasks_per_batch, seed=d.seed)
    tcfg: TrainConfig = cfg["train"]
    accelerator = make_accelerator(tcfg)
    records = train(hyper, batches, tcfg, accelerator=accelerator)
    state = {n: p.detach().cpu().contiguous() for n, p in hyper.trainable_state().items()}
    save_file(state, Path(tcfg.out_dir) / f"final-rank{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        print(
            json.dumps(
                {
                    "final_step": records[-1]["step"],
                    "final_loss": records[-1]["loss"],
                    "processes": accelerator.num_processes,
                }
            )
        )
    return records
