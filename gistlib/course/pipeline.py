"""The pocket course end to end: base, HyperLlama, Gisting, evaluation, prefix-tuning ladder, compression.

    1. base        a tiny Llama trained from scratch on training tasks with demos in context (ICL)
    2. hyperllama  hyperpretraining on the plain-text corpus, then multi-task training over the frozen base,
                   early-stopped on validation tasks; once per seed (and per k in the gist sweep)
    3. gisting     the base fine-tuned whole under the gist mask (Mu et al.), early-stopped alike
    4. evaluate    zero_shot, icl, gisting, hyperllama on the same held-out test episodes, per level too
    5. ladder      prefix tuning per test episode from random / vocab / hyperllama starts, 0..200 steps
    6. compression demo tokens per gist token; KV bytes of a prefix vs the demos' KV

Every trained model is cached under `cache_dir` (a second run reuses it; an interrupted one resumes).
Results land in `out_dir`: summary.json, results.md and PNG plots (`gistlib.course.report`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gistlib.config import check_fields
from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.core.lm import LMTrainee
from gistlib.data import COMPACT, EpisodeSampler, Task, load_pocket_corpus, load_pocket_suite, pocket_tokenizer
from gistlib.data.batches import gisting_batches, hyper_batches, hyperpretrain_batches, icl_batches
from gistlib.data.render import render_hyper_input
from gistlib.models.tiny import build_tiny_llama, gist_token_ids
from gistlib.train.evaluate import (
    NORMALISATION,
    evaluate,
    gist_prefixes,
    hyper_prefixes,
    icl,
    with_prefixes,
    zero_shot,
)
from gistlib.train.loop import TrainConfig, train
from gistlib.train.prefix_tuning import random_prefix, tune_prefixes, vocab_prefix

__all__ = [
    "PocketConfig",
    "TIERS",
    "tier_config",
    "run_pocket",
    "load_base",
    "check_cache_base",
    "train_base",
    "train_hyper",
    "train_gisting",
    "prefix_ladder",
    "select",
    "fixed_episodes",
]

FMT = COMPACT
from gistlib.data.files import REPO_ROOT as ROOT  # noqa: E402


@dataclass
class PocketConfig:
    """Sizes and budgets of the pocket course. `TIERS['smoke']` shrinks everything for CI."""

    tier: str = "pocket"
    out_dir: str = "results/pocket"
    cache_dir: str = "runs/pocket"
    families: tuple[str, ...] = ("classify",)  # task families trained and evaluated
    levels: tuple[str, ...] = ()  # task levels kept (e.g. ("C4",)); empty: all levels of those families
    # the base is pretrained in two stages: in-context learning starts on the easiest level (stage 1), then
    # spreads to harder ones (stage 2); from scratch on C4 it stayed on the "any symbol in context" plateau
    base_warmup_levels: tuple[str, ...] = ("C2",)  # stage 1 levels
    base_warmup_steps: int = 1500  # stage 1 steps (0: no stage 1)
    base_levels: tuple[str, ...] = ("C2", "C4")  # stage 2 levels; empty: `levels`
    base_init: str = ""  # a base checkpoint folder to start stage 2 from instead of stage 1
    # the base: a tiny Llama, pretrained here (or shipped in data/pocket_base, rebuilt by `gistlib course`)
    base_dir: str = str(ROOT / "data" / "pocket_base")
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    mlp: int = 512
    base_steps: int = 2000  # stage 2 steps (or `base_max_minutes`, whichever ends first)
    base_lr: float = 3e-3
    base_batch: int = 128
    repeat_demo_prob: float = 0.5  # curriculum: a training query repeats a demo word (never at evaluation)
    balanced_demos: bool = True  # demos drawn round-robin over the outputs (2 per category), also at evaluation
    base_final_lr: float = 1.0  # the base's lr decays linearly to this fraction of base_lr (1.0: flat)
    base_label_demos: bool = True  # loss on every demo's output too (dense ICL supervision)
    base_copy_demos: float = 0.0  # chance an episode's demos are half of them, each twice (exact repeats)
    base_max_minutes: float = 55.0  # wall-clock budget of stage 2 (0: none); the best checkpoint is kept
    base_eval_every: int = 500
    # HyperLlama
    num_gist_tokens: int = 8
    gist_sweep: tuple[int, ...] = ()  # extra k values (seed 0) for the compression trade-off
    seeds: tuple[int, ...] = (0, 1, 2)
    lora_rank: int = 8
    lora_alpha: int = 16
    hyperpretrain_steps: int = 200
    hyper_steps: int = 1500
    hyper_lr: float = 2e-3
    tasks_per_batch: int = 32
    queries_per_task: int = 4
    distill_weight: float = (
        3.0  # ICL distillation (gistlib.core.distill; not in the paper): 0 trains on the LM loss alone
    )
    teacher_queries: int = 1  # queries per task that get an in-context teacher row
    # Gisting
    gisting_steps: int = 600
    gisting_lr: float = 1e-3
    gisting_batch: int = 64
    # early stopping on validation tasks (never on test)
    eval_every: int = 250
    patience: int = 0  # 0: never stop early, only keep the best weights (training plateaus, then jumps)
    val_episodes: int = 96
    # evaluation
    test_episodes: int = 300
    queries_per_episode: int = 4
    prefix_episodes: int = 120
    prefix_budgets: tuple[int, ...] = (0, 10, 25, 50, 100, 200)
    prefix_lr: float = 1e-2
    threads: int = 0  # torch threads (0: leave as is)
    progress: bool = True

    def __post_init__(self):
        for f in fields(self):
            if f.type.startswith("tuple"):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        checks = {
            "tier": self.tier in TIER_NAMES,
            "seeds": len(self.seeds) >= 1,
            "num_gist_tokens": 1 <= self.num_gist_tokens <= 16,
            "gist_sweep": all(1 <= k <= 16 for k in self.gist_sweep),
            "families": set(self.families) <= {"classify", "transform", "arith"} and len(self.families) > 0,
            "prefix_budgets": len(self.prefix_budgets) > 0 and min(self.prefix_budgets) >= 0,
            "distill_weight": self.distill_weight >= 0,
            "teacher_queries": 0 <= self.teacher_queries <= self.queries_per_task,
        }
        check_fields(self, checks)

    @property
    def gist_counts(self) -> tuple[int, ...]:
        return tuple(sorted({self.num_gist_tokens, *self.gist_sweep}))


TIER_NAMES = ("smoke", "pocket")
TIERS: dict[str, dict] = {
    "pocket": {},
    "smoke": dict(
        tier="smoke",
        out_dir="results/smoke",
        cache_dir="runs/smoke",
        base_dir="",
        hidden=32,
        layers=2,
        heads=2,
        kv_heads=1,
        mlp=64,
        base_steps=6,
        base_warmup_steps=2,
        base_eval_every=2,
        base_max_minutes=0.0,
        base_batch=16,
        gisting_batch=16,
        num_gist_tokens=2,
        gist_sweep=(1,),
        seeds=(0, 1),
        hyperpretrain_steps=2,
        hyper_steps=4,
        tasks_per_batch=4,
        queries_per_task=2,
        gisting_steps=4,
        eval_every=2,
        patience=0,
        val_episodes=8,
        test_episodes=12,
        prefix_episodes=6,
        prefix_budgets=(0, 2, 4),
    ),
}


def tier_config(tier: str = "pocket", **overrides) -> PocketConfig:
    """The config of a tier with field overrides (unknown names are an error naming them)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}: choose one of {list(TIERS)}")
    known = {f.name for f in fields(PocketConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown PocketConfig field(s) {sorted(unknown)}")
    return PocketConfig(**{**TIERS[tier], **overrides})


# --- data ---------------------------------------------------------------------------------------


def select(tasks: list[Task], cfg: PocketConfig) -> list[Task]:
    """The tasks of the configured families (and levels, if any are named)."""
    return [t for t in tasks if t.family in cfg.families and (not cfg.levels or t.meta.get("level") in cfg.levels)]


def fixed_episodes(tasks: list[Task], n: int, queries: int, seed: int, balanced: bool = True):
    """A fixed, seeded list of episodes (each task's own number of demos; no query repeats a demo)."""
    sampler = EpisodeSampler(tasks, num_demos=None, num_queries=queries, seed=seed, num_episodes=n, balanced=balanced)
    return sampler.take(n)


# --- the base -----------------------------------------------------------------------------------


def _new_base(cfg: PocketConfig, tok):
    return build_tiny_llama(
        tokenizer=tok,
        hidden_size=cfg.hidden,
        num_layers=cfg.layers,
        num_heads=cfg.heads,
        num_kv_heads=cfg.kv_heads,
        intermediate_size=cfg.mlp,
        max_position_embeddings=512,
    )


def _icl_score(model, episodes, tok) -> float:
    model.eval()
    return evaluate(icl(model, tok, FMT), episodes, tok, FMT).accuracy


def _pretrain(model, cfg: PocketConfig, suite, tok, levels: tuple[str, ...], steps: int, minutes: float, run_dir: Path):
    """One pretraining stage of the base on `levels`; loads its best-on-validation weights into `model`."""
    val = fixed_episodes(select(suite["validation"], cfg), cfg.val_episodes, 2, seed=1)
    tcfg = TrainConfig(
        steps=steps,
        lr=cfg.base_lr,
        warmup_steps=min(100, steps // 10),
        final_lr_fraction=cfg.base_final_lr,
        eval_every=cfg.base_eval_every,
        patience=cfg.patience,
        out_dir=str(run_dir),
        progress=cfg.progress,
        log_every=50,
        save_every=cfg.base_eval_every,
        max_seconds=60 * minutes,
    )
    trainee = LMTrainee(model)
    batches = icl_batches(
        select(suite["train"], replace(cfg, levels=levels)),
        tok,
        cfg.base_batch,
        repeat_demo_prob=cfg.repeat_demo_prob,
        balanced=cfg.balanced_demos,
        label_demos=cfg.base_label_demos,
        copy_demos_prob=cfg.base_copy_demos,
    )
    records = train(trainee, batches, tcfg, evaluate=lambda m, step: _icl_score(m.model, val, tok))
    _load_best(trainee, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # optimizer states etc.: not needed once trained
    return records


def train_base(cfg: PocketConfig, suite, tok, out_dir: Path):
    """Pretrain the base as an in-context learner, in two stages: `base_warmup_steps` on the easiest levels (where
    in-context learning starts), then the rest on `base_levels`; each stage keeps its best validation weights.
    With `base_init`, stage 1 is replaced by that checkpoint. The log of both stages goes to train_log.json."""
    records: list[dict] = []
    if cfg.base_init:
        model = _fresh_base(Path(cfg.base_init)).train()
    else:
        model = _new_base(cfg, tok)
        if cfg.base_warmup_steps:
            stage1 = _pretrain(
                model, cfg, suite, tok, cfg.base_warmup_levels, cfg.base_warmup_steps, 0.0, out_dir / "stage1"
            )
            records += [{**r, "stage": 1} for r in stage1]
    stage2 = _pretrain(
        model, cfg, suite, tok, cfg.base_levels or cfg.levels, cfg.base_steps, cfg.base_max_minutes, out_dir / "run"
    )
    records += [{**r, "stage": 2} for r in stage2]
    model.save_pretrained(out_dir)
    _write_json(out_dir / "train_log.json", records)
    return model.eval()


def load_base(cfg: PocketConfig, suite, tok):
    """The shipped/cached base if there is one, else train it (and cache it). Checks that the models cached in
    `cache_dir` were trained over this base (`check_cache_base`)."""
    cached = Path(cfg.cache_dir) / "base"
    candidates = ([Path(cfg.base_dir)] if cfg.base_dir else []) + [cached]
    d = next((c for c in candidates if (c / "model.safetensors").exists()), None)
    model = _fresh_base(d) if d else train_base(cfg, suite, tok, cached)
    d = d or cached
    check_cache_base(Path(cfg.cache_dir), d)
    return model, d


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
            f" != {now!r}): delete {cache_dir} (or choose another cache_dir) to retrain them over this base"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(now)


# --- HyperLlama and Gisting -----------------------------------------------------------------------


def _fresh_base(base_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base_dir, local_files_only=True).float().eval()


HYPER_SETTINGS = (
    "families", "levels", "lora_rank", "lora_alpha", "hyperpretrain_steps", "hyper_steps", "hyper_lr",
    "tasks_per_batch", "queries_per_task", "distill_weight", "teacher_queries", "repeat_demo_prob",
    "balanced_demos", "eval_every", "val_episodes",
)  # fmt: skip


def check_run_settings(run: Path, cfg: PocketConfig, names: tuple[str, ...]) -> None:
    """Record the settings a cached run was trained with (run/settings.json); refuse a run trained otherwise."""
    now = {n: list(v) if isinstance(v := getattr(cfg, n), tuple) else v for n in names}
    path = run / "settings.json"
    if not path.exists() and (run / "final").exists():
        raise RuntimeError(f"{run} was trained before its settings were recorded: delete {run} to retrain it")
    before = json.loads(path.read_text()) if path.exists() else now
    changed = sorted(n for n in names if before.get(n) != now[n])
    if changed:
        diff = ", ".join(f"{n}: {before.get(n)!r} -> {now[n]!r}" for n in changed)
        raise RuntimeError(
            f"{run} was trained with other settings ({diff}): delete {run} to retrain it, or set another cache_dir"
        )
    run.mkdir(parents=True, exist_ok=True)
    _write_json(path, now)


def train_hyper(cfg: PocketConfig, suite, tok, base_dir: Path, k: int, seed: int) -> tuple[HyperLlama, list]:
    """Hyperpretrain, then multi-task train one HyperLlama (cached in cache_dir/hyper-k{k}-s{seed})."""
    gist = gist_token_ids(tok)[:k]
    run = Path(cfg.cache_dir) / f"hyper-k{k}-s{seed}"
    check_run_settings(run, cfg, HYPER_SETTINGS)
    hcfg = HyperConfig(
        num_gist_tokens=k, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, distill_weight=cfg.distill_weight, seed=seed
    )
    hyper = HyperLlama(_fresh_base(base_dir), gist, hcfg)
    if (run / "final" / "hyper_config.json").exists():
        hyper.load_trainable(run / "final")
        return hyper, _read_log(run / "multitask" / "metrics.jsonl")
    train_tasks = select(suite["train"], cfg)
    if cfg.hyperpretrain_steps:
        corpus = load_pocket_corpus()  # runs of training-task examples (all families)
        ctx = 24 if cfg.tier == "smoke" else 48
        pre = TrainConfig(
            steps=cfg.hyperpretrain_steps,
            lr=cfg.hyper_lr,
            warmup_steps=min(20, cfg.hyperpretrain_steps),
            out_dir=str(run / "hyperpretrain"),
            progress=cfg.progress,
            seed=seed,
            log_every=25,
        )
        train(hyper, hyperpretrain_batches(corpus, tok, gist, cfg.tasks_per_batch, ctx, 16, seed=seed), pre)
    val = fixed_episodes(select(suite["validation"], cfg), cfg.val_episodes, 2, seed=1)

    def val_score(h, step):
        h.eval()
        with torch.no_grad():
            prefixes = hyper_prefixes(h, val, tok, FMT)
            with h.downstream_mode():
                return evaluate(with_prefixes("hyperllama", h.base, prefixes, tok, FMT), val, tok, FMT).accuracy

    main = _stage_config(cfg, cfg.hyper_steps, cfg.hyper_lr, run / "multitask", seed, warmup_cap=100)
    records = train(
        hyper,
        hyper_batches(
            train_tasks,
            tok,
            gist,
            cfg.tasks_per_batch,
            cfg.queries_per_task,
            seed=seed,
            repeat_demo_prob=cfg.repeat_demo_prob,
            balanced=cfg.balanced_demos,
            teacher_queries=cfg.teacher_queries if cfg.distill_weight > 0 else 0,
        ),
        main,
        evaluate=val_score,
    )
    _keep_best(hyper, run / "multitask", run / "final")
    return hyper.eval(), records


def train_gisting(cfg: PocketConfig, suite, tok, base_dir: Path, k: int):
    """The base fine-tuned under the gist mask (Gisting); cached in cache_dir/gisting-k{k}."""
    gist = gist_token_ids(tok)[:k]
    run = Path(cfg.cache_dir) / f"gisting-k{k}"
    model = _fresh_base(base_dir)
    trainee = LMTrainee(model, mask="gist", gist_token_ids=gist)
    if (run / "final" / "model.safetensors").exists():
        trainee.load_trainable(run / "final")
        return model.eval(), _read_log(run / "run" / "metrics.jsonl")
    val = fixed_episodes(select(suite["validation"], cfg), cfg.val_episodes, 2, seed=1)

    def val_score(t, step):
        t.eval()
        prefixes = gist_prefixes(t.model, val, tok, gist, FMT)
        return evaluate(with_prefixes("gisting", t.model, prefixes, tok, FMT, bos=False), val, tok, FMT).accuracy

    tcfg = _stage_config(cfg, cfg.gisting_steps, cfg.gisting_lr, run / "run", seed=0, warmup_cap=50)
    records = train(
        trainee,
        gisting_batches(
            select(suite["train"], cfg),
            tok,
            gist,
            cfg.gisting_batch,
            repeat_demo_prob=cfg.repeat_demo_prob,
            balanced=cfg.balanced_demos,
        ),
        tcfg,
        evaluate=val_score,
    )
    _keep_best(trainee, run / "run", run / "final")
    return model.eval(), records


def _stage_config(cfg: PocketConfig, steps: int, lr: float, out_dir: Path, seed: int, warmup_cap: int) -> TrainConfig:
    """A HyperLlama or Gisting stage: warmup (10%, at most `warmup_cap` steps), decay to 0.1 lr, validation every
    `eval_every` steps keeping the best weights."""
    return TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=min(warmup_cap, steps // 10),
        final_lr_fraction=0.1,
        eval_every=cfg.eval_every,
        patience=cfg.patience,
        out_dir=str(out_dir),
        progress=cfg.progress,
        seed=seed,
        log_every=25,
    )


def _load_best(trainee, run_dir: Path) -> None:
    """Load the best-on-validation weights of a finished run, if it evaluated (else keep the last ones)."""
    best = run_dir / "best" / "model"
    if best.exists():
        trainee.load_trainable(best)


def _keep_best(trainee, run_dir: Path, final_dir: Path) -> None:
    """`_load_best`, then save the weights to `final_dir`."""
    _load_best(trainee, run_dir)
    trainee.save_pretrained(final_dir)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=0))


def _read_log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# --- evaluation ---------------------------------------------------------------------------------


def _levels(episodes, tasks_by_name) -> list[str]:
    return [str(tasks_by_name[ep.task].meta.get("level", "?")) for ep in episodes]


def _by_level(result, levels: list[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for v, lvl in zip(result.per_episode, levels):
        out.setdefault(lvl, []).append(v)
    return {lvl: sum(v) / len(v) for lvl, v in sorted(out.items())}


def compression(cfg: PocketConfig, base, episodes, tok, k: int) -> dict:
    """Demo tokens per gist token and prefix KV bytes vs the demos' KV bytes (float32)."""
    gist = gist_token_ids(tok)[:k]
    demo_tokens = [len(render_hyper_input(ep, tok, gist, FMT)) - k for ep in episodes]
    mean_demo = sum(demo_tokens) / len(demo_tokens)
    c = base.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    return {
        "k": k,
        "mean_demo_tokens": mean_demo,
        "demo_tokens_per_gist_token": mean_demo / k,
        "prefix_kv_bytes": per_token * k,
        "demo_kv_bytes": per_token * mean_demo,
        "kv_ratio": k / mean_demo,
    }


def run_pocket(cfg: PocketConfig) -> dict:
    """Run the whole pocket course; returns the summary (also written to out_dir/summary.json)."""
    from gistlib.course.report import write_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = load_pocket_suite()
    tok = pocket_tokenizer(16)
    timings: dict[str, float] = {}

    def lap(name):
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)

    base, base_dir = load_base(cfg, suite, tok)
    lap("base")
    test_tasks = select(suite["test"], cfg)
    by_name = {t.name: t for t in test_tasks}
    test = fixed_episodes(test_tasks, cfg.test_episodes, cfg.queries_per_episode, seed=12345)
    levels = _levels(test, by_name)
    results: dict[str, dict] = {}

    def record(key, res):
        results[key] = {**res.as_dict(), "by_level": _by_level(res, levels)}

    record("zero_shot", evaluate(zero_shot(base, tok, FMT), test, tok, FMT))
    record("icl", evaluate(icl(base, tok, FMT), test, tok, FMT))
    lap("baselines")

    k0 = cfg.num_gist_tokens
    gist_model, gist_log = train_gisting(cfg, suite, tok, base_dir, k0)
    record(
        "gisting",
        evaluate(
            with_prefixes(
                "gisting",
                gist_model,
                gist_prefixes(gist_model, test, tok, gist_token_ids(tok)[:k0], FMT),
                tok,
                FMT,
                bos=False,
            ),
            test,
            tok,
            FMT,
        ),
    )
    lap("gisting")

    per_seed, logs, sweep = {}, {"gisting": gist_log}, {}
    main_hyper = None
    runs = [(k0, s) for s in cfg.seeds] + [(k, cfg.seeds[0]) for k in cfg.gist_counts if k != k0]
    for k, seed in tqdm(runs, desc="hyperllama runs", disable=not cfg.progress):
        hyper, log = train_hyper(cfg, suite, tok, base_dir, k, seed)
        with torch.no_grad():
            prefixes = hyper_prefixes(hyper, test, tok, FMT)
            with hyper.downstream_mode():
                res = evaluate(with_prefixes("hyperllama", hyper.base, prefixes, tok, FMT), test, tok, FMT)
        entry = {**res.as_dict(), "by_level": _by_level(res, levels)}
        if k == k0:
            per_seed[str(seed)] = entry
            logs[f"hyperllama_seed{seed}"] = log
            if main_hyper is None:
                main_hyper, main_prefixes = hyper, prefixes
        sweep.setdefault(str(k), entry)  # for k0: the first seed
    accs = [v["accuracy"] for v in per_seed.values()]
    results["hyperllama"] = {
        **per_seed[str(cfg.seeds[0])],
        "per_seed": per_seed,
        "mean_over_seeds": sum(accs) / len(accs),
    }
    lap("hyperllama")

    ladder = prefix_ladder(cfg, main_hyper, main_prefixes, test, tok)
    lap("prefix_ladder")

    summary = {
        "tier": cfg.tier,
        "config": asdict(cfg),
        "normalisation": NORMALISATION,
        "methods": results,
        "prefix_tuning": ladder,
        "gist_sweep": sweep,
        "compression": [compression(cfg, base, test, tok, k) for k in cfg.gist_counts],
        "timings_s": timings,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "logs": logs,
    }
    write_report(summary, out)
    return summary


def word_ids_of(tok) -> list[int]:
    """The ids of the tokenizer's ordinary tokens, in id order (`get_vocab()`'s order changes from run to run)."""
    return sorted(i for i in tok.get_vocab().values() if i not in tok.all_special_ids)


def prefix_ladder(cfg: PocketConfig, hyper: HyperLlama, hyper_pref, test, tok) -> dict:
    """Prefix tuning from three starts on the first `prefix_episodes` test episodes; accuracy per budget."""
    episodes = test[: cfg.prefix_episodes]
    start_hyper = hyper_pref.rows(list(range(len(episodes))))
    word_ids = word_ids_of(tok)
    starts = {
        "prefix_tuning_random": random_prefix(start_hyper, len(episodes), seed=0),
        "prefix_tuning_vocab": None,
        "prefix_tuning_hyperllama": start_hyper,
    }
    out: dict[str, dict] = {}
    with hyper.downstream_mode():
        model = hyper.base
        starts["prefix_tuning_vocab"] = vocab_prefix(
            model, word_ids, len(episodes), hyper.config.num_gist_tokens, seed=0
        )
        for name, init in tqdm(starts.items(), desc="prefix tuning", disable=not cfg.progress):
            per_budget = {}

            def on_budget(steps, prefix, name=name, per_budget=per_budget):
                res = evaluate(with_prefixes(name, model, prefix, tok, FMT), episodes, tok, FMT)
                per_budget[str(steps)] = res.as_dict()

            tune_prefixes(model, init, episodes, tok, FMT, cfg.prefix_budgets, cfg.prefix_lr, on_budget)
            out[name] = per_budget
    return out
