"""Real-data recipes: train HyperLlama on P3, Super-NaturalInstructions or Symbol Tuning, then evaluate.

A *recipe* is one dataclass (`Recipe`) that says everything a run needs:

    which tasks train          P3 datasets x promptsource templates | SNI train tasks | classification sets
    which tasks evaluate       P3 held-out (rank classification)    | SNI test (ROUGE-L) | held-out sets (symbols)
    the model                  a Llama-architecture checkpoint (name or folder), quantisation
    the hypernetwork           `HyperConfig`: gist tokens, LoRA rank/alpha, prefix head
    lengths and episodes       hypernetwork / downstream token budgets, demos, tasks and queries per batch
    optimisation               `TrainConfig` (steps, lr, ...; gistlib/train.py)

Three built-in recipes (`RECIPES`, also written out as `configs/<name>.json`) are sized for Llama-2-7B
in 4-bit on one 16-24 GB GPU (the planner setting: batch 4, hypernetwork 1024 tokens, downstream 384):

    p3      train: the SuperGLUE part of the T0++ mixture that `gistlib.data.p3` reads (BoolQ, MultiRC),
                   all original-task templates; plus any tasks in `train_task_files` (gistlib JSONL)
            eval:  T0's held-out datasets CB, RTE, COPA, WiC, WSC, ANLI r1/r2; accuracy by rank
                   classification per template, median over templates per dataset (as T0 reports)
    sni     train: the official 756 train tasks (those with a file under `<root>/sni/tasks`)
            eval:  the official 119 test tasks; definition + 2 positive examples -> prefix; greedy answer,
                   ROUGE-L and exact match (best over references), first 100 instances (Tk-Instruct)
    symbol  train: SST-2 and TREC with labels remapped to arbitrary symbols each episode
            eval:  whole held-out datasets (CB, RTE), k = 4 exemplars per class, rank classification

Data come from `data_root` (default `gistlib.data.shared_data_dir()`: `$GISTLIB_DATA` or
`../shared/data`) in the upstream formats; a user with the full datasets points `GISTLIB_DATA`
(or `data_root`) at them. Examples longer than the token budgets are dropped (counted in the
results), since a query or first demo that does not fit cannot be rendered.

    python -m gistlib recipe p3 --set train.steps=2000 --out results/p3     # the real thing (GPU)
    python -m gistlib recipe sni --tiny                                      # tiny 4-bit model, CPU, minutes

`run_recipe` returns (and writes to `<out>/results.json`) training records and evaluation metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from gistlib.config import check_fields
from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.data import (
    VERBOSE,
    Episode,
    EpisodeSampler,
    LoadReport,
    Task,
    collate,
    exact_match,
    load_tasks_jsonl,
    rouge_l,
    shared_data_dir,
)
from gistlib.data.batches import hyper_batches, hyper_episode_batches
from gistlib.data.p3 import build_p3_task, load_templates, read_raw_rows
from gistlib.data.render import (
    answer_ids,
    definition_ids,
    demo_ids,
    query_ids,
    render_downstream_prompt,
    render_hyper_input,
)
from gistlib.data.sni import load_sni_split, load_sni_task, sni_dir, sni_episode
from gistlib.data.symbol import read_nli_jsonl, read_sst2, read_trec, symbol_episodes
from gistlib.train.loop import TrainConfig, train

__all__ = [
    "Recipe",
    "RECIPES",
    "get_recipe",
    "load_recipe",
    "tiny_recipe",
    "build_tiny_checkpoint",
    "load_recipe_tasks",
    "build_hyper",
    "run_recipe",
    "main_recipe",
]

log = logging.getLogger("gistlib.course.recipes")

T0_HELD_OUT = (
    "super_glue/cb",
    "super_glue/rte",
    "super_glue/copa",
    "super_glue/wic",
    "super_glue/wsc.fixed",
    "anli:r1",
    "anli:r2",
)


def _train(**kw) -> TrainConfig:
    """Optimisation for the llama2 tier (our choice, QLoRA-like: lr 1e-4, effective batch 16 tasks)."""
    base = dict(
        steps=5000,
        lr=1e-4,
        warmup_steps=100,
        grad_accum=4,
        gradient_checkpointing=True,
        log_every=20,
        save_every=500,
        out_dir="runs/recipe",
    )
    return TrainConfig(**{**base, **kw})


@dataclass
class Recipe:
    """Everything one real-data run needs. Defaults: Llama-2-7B, 4-bit, the planner's setting."""

    name: str = "p3"
    kind: str = "p3"  # p3 | sni | symbol: which loaders, episodes and metric
    # --- model
    model: str = "meta-llama/Llama-2-7b-hf"  # HF name or local folder (Llama architecture, with tokenizer)
    quantization: str | None = "nf4"  # nf4 | int8 | None (see gistlib.models.loading)
    gradient_checkpointing: bool = True
    # --- data
    data_root: str | None = None  # None: gistlib.data.shared_data_dir()
    # p3: "dataset[:split]" (split default val; anli: r1 | r2); sni: task names, or "split:train" / "split:test";
    # symbol: sst2 | trec | cb | rte
    train_tasks: tuple[str, ...] = ("super_glue/boolq", "super_glue/multirc")
    eval_tasks: tuple[str, ...] = T0_HELD_OUT
    train_task_files: tuple[str, ...] = ()  # extra training tasks in gistlib JSONL (`save_tasks_jsonl`)
    max_rows: int | None = None  # per dataset (P3 raw rows, classification examples) / SNI instances (None: 100)
    max_templates: int | None = None  # P3: original-task templates per dataset (None: all)
    max_eval_tasks: int | None = None  # evaluate on the first n tasks (None: all)
    # --- episodes and lengths
    num_demos: int = 16  # p3: demos drawn (the budget keeps those that fit); sni: positive examples (2);
    #                      symbol: exemplars per class (k)
    tasks_per_batch: int = 4  # hypernetwork rows per micro-batch
    queries_per_task: int = 1  # downstream rows per task row (downstream batch = tasks x queries)
    max_hyper_tokens: int = 1024  # hypernetwork input incl. BOS, definition and gist tokens
    max_tokens: int = 384  # downstream input incl. BOS, query, answer and EOS
    # --- evaluation
    eval_episodes: int = 4  # p3/symbol: episodes (demo sets) per evaluation task
    eval_queries: int = 32  # queries per episode (p3/symbol); instances per task (sni, Tk-Instruct: 100)
    eval_batch_size: int = 8  # downstream rows per scoring / generation call
    max_new_tokens: int = 128  # sni: greedy decoding length (Tk-Instruct)
    seed: int = 0
    hyper: HyperConfig = field(default_factory=HyperConfig)
    train: TrainConfig = field(default_factory=_train)

    def __post_init__(self):
        if isinstance(self.hyper, dict):
            self.hyper = HyperConfig(**self.hyper)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        for name in ("train_tasks", "eval_tasks", "train_task_files"):
            setattr(self, name, tuple(getattr(self, name)))
        checks = {
            "kind": self.kind in ("p3", "sni", "symbol"),
            "train_tasks": bool(self.train_tasks or self.train_task_files),
            "num_demos": self.num_demos >= 1,
            "tasks_per_batch": self.tasks_per_batch >= 1,
            "queries_per_task": self.queries_per_task >= 1,
            "max_hyper_tokens": self.max_hyper_tokens > self.hyper.num_gist_tokens + 1,
            "max_tokens": self.max_tokens >= 4,
            "eval_episodes": self.eval_episodes >= 1,
            "eval_queries": self.eval_queries >= 1,
            "eval_batch_size": self.eval_batch_size >= 1,
        }
        check_fields(self, checks)

    @property
    def root(self) -> Path:
        return Path(self.data_root) if self.data_root else shared_data_dir()

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("train_tasks", "eval_tasks", "train_task_files"):
            d[name] = list(d[name])
        d["hyper"]["target_modules"] = list(d["hyper"]["target_modules"])
        return d

    @classmethod
    def from_dict(cls, values: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown Recipe field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


RECIPES: dict[str, Recipe] = {
    "p3": Recipe(name="p3", kind="p3", train=_train(out_dir="runs/p3")),
    "sni": Recipe(
        name="sni",
        kind="sni",
        train_tasks=("split:train",),
        eval_tasks=("split:test",),
        num_demos=2,
        eval_queries=100,
        train=_train(out_dir="runs/sni"),
    ),
    "symbol": Recipe(
        name="symbol",
        kind="symbol",
        train_tasks=("sst2", "trec"),
        eval_tasks=("cb", "rte"),
        num_demos=4,
        train=_train(out_dir="runs/symbol"),
    ),
}


def get_recipe(name: str) -> Recipe:
    """A fresh copy of a built-in recipe."""
    if name not in RECIPES:
        raise ValueError(f"no recipe {name!r}; built-in: {', '.join(RECIPES)} (or pass a JSON file)")
    return Recipe.from_dict(RECIPES[name].to_dict())


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A built-in recipe by name, or a recipe JSON file (e.g. `configs/p3.json`)."""
    if str(name_or_path) in RECIPES:
        return get_recipe(str(name_or_path))
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: neither a built-in recipe ({', '.join(RECIPES)}) nor a file")
    return Recipe.from_dict(json.loads(path.read_text()))


def set_field(recipe: Recipe, assignment: str) -> Recipe:
    """Apply one `key=value` (dotted for nested: `train.steps=100`; value parsed as JSON, else text)."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    d = recipe.to_dict()
    *parents, last = key.split(".")
    target = d
    for p in parents:
        if p not in target or not isinstance(target[p], dict):
            raise ValueError(f"--set {key}: {p!r} is not a nested config of Recipe")
        target = target[p]
    if last not in target:
        raise ValueError(f"--set {key}: no field {last!r}; known: {sorted(target)}")
    target[last] = value
    if key == "train.steps" and isinstance(value, int) and d["train"]["warmup_steps"] > value >= 1:
        log.warning(
            "train.steps=%d < warmup_steps=%d: warmup shortened to %d", value, d["train"]["warmup_steps"], value // 10
        )
        d["train"]["warmup_steps"] = value // 10
    return Recipe.from_dict(d)


def tiny_recipe(recipe: Recipe, model: str, out_dir: str) -> Recipe:
    """The same recipe shrunk for a tiny model on a CPU: a few steps and examples, short budgets, k = 4.

    SNI has only test tasks locally (../shared/data), so the tiny SNI run trains on one test task and
    evaluates on the other: a smoke test of the pipeline, not a result."""
    kw: dict = dict(
        model=model,
        max_rows=24,
        max_templates=1,
        max_eval_tasks=None,
        tasks_per_batch=2,
        queries_per_task=2,
        eval_tasks=recipe.eval_tasks[:2],
        max_hyper_tokens=384,
        max_tokens=192,
        eval_episodes=1,
        eval_queries=4,
        eval_batch_size=8,
        max_new_tokens=8,
        num_demos=min(recipe.num_demos, 4 if recipe.kind == "p3" else recipe.num_demos),
        hyper=replace(recipe.hyper, num_gist_tokens=4),
        train=replace(
            recipe.train,
            steps=2,
            warmup_steps=1,
            grad_accum=1,
            lr=1e-3,
            log_every=1,
            save_every=0,
            out_dir=out_dir,
            progress=False,
        ),
    )
    if recipe.kind == "sni":
        kw.update(train_tasks=("task648_answer_generation",), eval_tasks=("task1393_superglue_copa_text_completion",))
    if recipe.kind == "symbol":
        kw.update(num_demos=1)  # one exemplar per class: TREC has 6
    return replace(recipe, **kw)


# ----------------------------------------------------------------------------- tasks


def _p3_tasks(spec: str, recipe: Recipe, report: LoadReport) -> list[Task]:
    dataset, _, split = spec.partition(":")
    split = split or "val"
    root = recipe.root
    templates = [
        t
        for t in load_templates("anli" if dataset == "anli" else dataset, root / "promptsource" / "templates")
        if t.original_task
    ]
    templates = templates[: recipe.max_templates] if recipe.max_templates else templates
    rows = read_raw_rows(dataset, split, root)
    if recipe.max_rows:
        rows = random.Random(recipe.seed).sample(rows, min(recipe.max_rows, len(rows)))
    tasks = [build_p3_task(dataset, t, rows, recipe.seed, report) for t in templates]
    if dataset == "anli":  # two rounds are two datasets
        for t in tasks:
            t.name = t.name.replace("anli__", f"anli_{split}__")
    return tasks


def _sni_tasks(spec: str, recipe: Recipe, report: LoadReport, split: str) -> list[Task]:
    names = load_sni_split(spec.split(":", 1)[1], recipe.root / "sni") if spec.startswith("split:") else [spec]
    folder = sni_dir(recipe.root / "sni") / "tasks"
    present = [n for n in names if (folder / f"{n}.json").exists()]
    if len(present) < len(names):
        log.warning("SNI: %d of %d tasks have no file under %s", len(names) - len(present), len(names), folder)
        report.skip(ValueError(f"SNI {spec}: {len(names) - len(present)} task files missing under {folder}"))
    cap = recipe.max_rows or 100
    return [load_sni_task(folder / f"{n}.json", cap, None if split == "eval" else recipe.seed, report) for n in present]


def _classification_task(spec: str, recipe: Recipe, report: LoadReport) -> Task:
    base = recipe.root / "classification"
    readers = {
        "sst2": lambda: read_sst2("train", base, report),
        "trec": lambda: read_trec("train", base, report),
        "cb": lambda: read_nli_jsonl(base / "cb" / "train.jsonl", "cb", report),
        "rte": lambda: read_nli_jsonl(base / "rte" / "train.jsonl", "rte", report),
    }
    if spec not in readers:
        raise ValueError(f"symbol recipe: unknown dataset {spec!r}; known: {', '.join(readers)}")
    task = readers[spec]()
    if recipe.max_rows:  # keep every class: sample per label
        rng = random.Random(recipe.seed)
        by_label: dict[str, list] = {}
        for ex in task.examples:
            by_label.setdefault(ex.output, []).append(ex)
        per = max(1, recipe.max_rows // len(by_label))
        task.examples = [
            ex for lab in sorted(by_label) for ex in rng.sample(by_label[lab], min(per, len(by_label[lab])))
        ]
    return task


def load_recipe_tasks(recipe: Recipe, which: str, report: LoadReport | None = None) -> list[Task]:
    """The recipe's training (`which='train'`) or evaluation (`'eval'`) tasks, before length filtering.

    Missing files raise FileNotFoundError naming the folder and the recipe's data_root."""
    report = report if report is not None else LoadReport()
    specs = recipe.train_tasks if which == "train" else recipe.eval_tasks
    try:
        tasks: list[Task] = []
        for spec in specs:
            if recipe.kind == "p3":
                tasks += _p3_tasks(spec, recipe, report)
            elif recipe.kind == "sni":
                tasks += _sni_tasks(spec, recipe, report, which)
            else:
                tasks.append(_classification_task(spec, recipe, report))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"recipe {recipe.name!r}: {e}. Data are read from {recipe.root} "
            f"(set GISTLIB_DATA or Recipe.data_root to the datasets' folder)"
        ) from e
    if which == "train":
        for path in recipe.train_task_files:
            tasks += load_tasks_jsonl(path, report)
    elif recipe.max_eval_tasks:
        tasks = tasks[: recipe.max_eval_tasks]
    if not tasks:
        raise ValueError(f"recipe {recipe.name!r}: no {which} tasks found under {recipe.root} for {specs}")
    return tasks


def fit_to_budget(tasks: Sequence[Task], tokenizer, recipe: Recipe, report: LoadReport | None = None) -> list[Task]:
    """Drop examples that cannot be rendered within the budgets: a query (+ its longest answer choice)
    over `max_tokens`, or a demo that alone overflows the hypernetwork input. Tasks left with no
    example, or whose fixed demos (SNI) do not fit, are dropped. Counts go to `report`."""
    k = recipe.hyper.num_gist_tokens
    kept_tasks = []
    for t in tasks:
        head = 1 + len(definition_ids(t.definition, tokenizer, VERBOSE)) + k
        if t.fixed_demos and head + len(demo_ids(t.fixed_demos[0], tokenizer, VERBOSE)) > recipe.max_hyper_tokens:
            if report is not None:
                report.skip(ValueError(f"task {t.name!r}: definition + first positive example exceed max_hyper_tokens"))
            continue
        keep = []
        for ex in t.examples:
            answers = [ex.output, *(ex.choices or [])]
            need = (
                1
                + len(query_ids(ex, tokenizer, VERBOSE))
                + max(len(answer_ids(a, tokenizer, VERBOSE)) for a in answers)
            )
            demo_ok = (
                t.fixed_demos is not None or head + len(demo_ids(ex, tokenizer, VERBOSE)) <= recipe.max_hyper_tokens
            )
            if need <= recipe.max_tokens and demo_ok:
                keep.append(ex)
        if report is not None and len(keep) < len(t.examples):
            report.skip(
                ValueError(
                    f"task {t.name!r}: {len(t.examples) - len(keep)} of {len(t.examples)} "
                    f"examples exceed the token budgets"
                )
            )
        if keep:
            kept_tasks.append(replace(t, examples=keep, meta={**t.meta, "num_demos": recipe.num_demos}))
    return kept_tasks


# ----------------------------------------------------------------------------- model


def build_hyper(recipe: Recipe, device_map=None):
    """(hyper, tokenizer, gist_ids): the recipe's checkpoint via `load_llama`, gist tokens added to the
    tokenizer (HyperLlama keeps their embeddings in its own table: no vocabulary resize)."""
    from transformers import AutoTokenizer

    from gistlib.models.loading import load_llama
    from gistlib.models.tiny import add_gist_tokens

    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    gist_ids = add_gist_tokens(tokenizer, recipe.hyper.num_gist_tokens)[: recipe.hyper.num_gist_tokens]
    base = load_llama(
        recipe.model,
        quantization=recipe.quantization,
        gradient_checkpointing=recipe.gradient_checkpointing,
        device_map=device_map,
    )
    return HyperLlama(base, gist_ids, recipe.hyper), tokenizer, gist_ids


def build_tiny_checkpoint(
    texts: Iterable[str],
    path: str | os.PathLike,
    num_gist_tokens: int = 4,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random tiny Llama and a byte-level BPE tokenizer trained on `texts`, saved to `path`
    (loadable with `load_llama(path, quantization="nf4")`). Hidden and MLP sizes are multiples of 64,
    the 4-bit block size."""
    from gistlib.models.tiny import build_tiny_llama, build_tokenizer

    tokenizer = build_tokenizer(texts, num_gist_tokens, kind="bpe", vocab_size=vocab_size)
    model = build_tiny_llama(
        tokenizer=tokenizer,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        seed=seed,
    )
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def task_texts(tasks: Iterable[Task]) -> Iterator[str]:
    """Every text of some tasks (definitions, inputs, outputs, choices, demos): a tokenizer corpus."""
    for t in tasks:
        if t.definition:
            yield t.definition
        for ex in [*t.examples, *(t.fixed_demos or [])]:
            yield ex.input
            yield ex.output
            yield from ex.choices or []
    yield "\nInput:\n \nOutput:\n Definition:\n 0 1 2 3 4 5 6 7 8 9 abcdefghijklmnopqrstuvwxyz"


# ----------------------------------------------------------------------------- batches


def episode_batches(episodes: Iterator[Episode], tokenizer, gist_ids: list[int], recipe: Recipe) -> Iterator[dict]:
    """`hyper_batches`' layout from any episode stream (symbol tuning draws its own episodes)."""
    return hyper_episode_batches(
        episodes, tokenizer, gist_ids, recipe.tasks_per_batch, VERBOSE, recipe.max_hyper_tokens, recipe.max_tokens
    )


def training_batches(recipe: Recipe, tasks: Sequence[Task], tokenizer, gist_ids: list[int]) -> Iterator[dict]:
    """The recipe's endless training stream (tasks already fitted to the budgets)."""
    if recipe.kind == "symbol":
        eps = symbol_episodes(tasks, recipe.num_demos, recipe.queries_per_task, seed=recipe.seed)
        return episode_batches(iter(eps), tokenizer, gist_ids, recipe)
    return hyper_batches(
        tasks,
        tokenizer,
        gist_ids,
        recipe.tasks_per_batch,
        recipe.queries_per_task,
        seed=recipe.seed,
        fmt=VERBOSE,
        max_hyper_tokens=recipe.max_hyper_tokens,
        max_tokens=recipe.max_tokens,
    )


# ----------------------------------------------------------------------------- evaluation


def _device(hyper: HyperLlama) -> torch.device:
    return hyper.gist_embeddings.device


@torch.no_grad()
def _prefix(hyper: HyperLlama, episode: Episode, tokenizer, gist_ids, recipe: Recipe):
    h = collate(
        [render_hyper_input(episode, tokenizer, gist_ids, VERBOSE, recipe.max_hyper_tokens)],
        tokenizer.pad_token_id,
        padding_side="left",
    )
    dev = _device(hyper)
    return hyper.make_prefix(h["input_ids"].to(dev), h["attention_mask"].to(dev))


@torch.no_grad()
def rank_classify(hyper: HyperLlama, episode: Episode, tokenizer, gist_ids, recipe: Recipe) -> list[bool]:
    """For each query of `episode`: is the choice with the highest log-likelihood (sum over its tokens
    and EOS) after the episode's prefix the right one?"""
    prefix = _prefix(hyper, episode, tokenizer, gist_ids, recipe)
    rows, owner = [], []
    for qi, q in enumerate(episode.queries):
        prompt = render_downstream_prompt(q, tokenizer, VERBOSE, recipe.max_tokens, episode.task)
        for c in q.choices:
            ans = answer_ids(c, tokenizer, VERBOSE)
            rows.append((prompt + ans, [-100] * len(prompt) + ans))
            owner.append(qi)
    scores = []
    dev = _device(hyper)
    for s in range(0, len(rows), recipe.eval_batch_size):
        b = collate(rows[s : s + recipe.eval_batch_size], tokenizer.pad_token_id)
        n = b["input_ids"].shape[0]
        logp, _ = hyper.score(
            prefix.rows([0] * n), b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)
        )
        scores += logp.float().cpu().tolist()
    correct, start = [], 0
    for q in episode.queries:
        sc = scores[start : start + len(q.choices)]
        start += len(q.choices)
        correct.append(q.choices[max(range(len(sc)), key=sc.__getitem__)] == q.output)
    return correct


@torch.no_grad()
def generate_answers(hyper: HyperLlama, episode: Episode, tokenizer, gist_ids, recipe: Recipe) -> list[str]:
    """Greedy answers of the downstream model to every query of `episode`, after the episode's prefix."""
    prefix = _prefix(hyper, episode, tokenizer, gist_ids, recipe)
    dev = _device(hyper)
    out = []
    for s in range(0, len(episode.queries), recipe.eval_batch_size):
        qs = episode.queries[s : s + recipe.eval_batch_size]
        b = collate(
            [render_downstream_prompt(q, tokenizer, VERBOSE, recipe.max_tokens, episode.task) for q in qs],
            tokenizer.pad_token_id,
        )
        new = hyper.generate(
            prefix.rows([0] * len(qs)),
            b["input_ids"].to(dev),
            b["attention_mask"].to(dev),
            recipe.max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        out += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
    return out


def _summary(per_task: dict[str, float], group) -> dict:
    groups: dict[str, list[float]] = {}
    for name, v in per_task.items():
        groups.setdefault(group(name), []).append(v)
    return {
        "per_task": per_task,
        "per_dataset_median": {g: statistics.median(v) for g, v in groups.items()},
        "mean": statistics.fmean(per_task.values()) if per_task else math.nan,
    }


def evaluate_recipe(recipe: Recipe, hyper: HyperLlama, tasks: Sequence[Task], tokenizer, gist_ids) -> dict:
    """The recipe's metric on its evaluation tasks (already fitted to the budgets)."""
    hyper.eval()
    if recipe.kind == "sni":
        per_task, per_task_em = {}, {}
        for t in tasks:
            queries = t.examples[: recipe.eval_queries]
            preds = generate_answers(hyper, sni_episode(t, queries, recipe.num_demos), tokenizer, gist_ids, recipe)
            per_task[t.name] = 100 * statistics.fmean(rouge_l(p, q.all_references) for p, q in zip(preds, queries))
            per_task_em[t.name] = 100 * statistics.fmean(
                exact_match(p, q.all_references) for p, q in zip(preds, queries)
            )
        return {
            "metric": "rougeL",
            **_summary(per_task, lambda n: n),
            "exact_match": _summary(per_task_em, lambda n: n)["mean"],
            "examples": {t.name: preds[:3] for t in tasks[-1:]},
        }
    per_task = {}
    for i, t in enumerate(tasks):
        if recipe.kind == "symbol":
            eps = symbol_episodes(
                [t],
                recipe.num_demos,
                recipe.eval_queries,
                seed=recipe.seed + 1000 + i,
                num_episodes=recipe.eval_episodes,
            )
        else:
            num_queries = min(recipe.eval_queries, len(t.examples) - recipe.num_demos)
            if num_queries < 1:
                log.warning(
                    "task %r: %d examples, too few for %d demos + 1 query: not evaluated",
                    t.name,
                    len(t.examples),
                    recipe.num_demos,
                )
                continue
            eps = EpisodeSampler(
                [t], recipe.num_demos, num_queries, seed=recipe.seed + 1000 + i, num_episodes=recipe.eval_episodes
            )
        flags = [c for ep in eps for c in rank_classify(hyper, ep, tokenizer, gist_ids, recipe)]
        per_task[t.name] = 100 * statistics.fmean(flags)
    return {"metric": "accuracy", **_summary(per_task, lambda n: n.split("__")[0])}


# ----------------------------------------------------------------------------- the run


def _base_snapshot(hyper: HyperLlama) -> dict[str, torch.Tensor]:
    """Copies of every frozen tensor of the base (quantised weights, their states, embeddings, norms)."""
    out = {n: p.detach().cpu().clone() for n, p in hyper.base.named_parameters() if "lora_" not in n}
    out.update({f"buffer.{n}": b.detach().cpu().clone() for n, b in hyper.base.named_buffers()})
    return out


def run_recipe(
    recipe: Recipe, out_dir: str | os.PathLike | None = None, check_frozen: bool = False, resume: bool = True
) -> dict:
    """Load data and model, train, evaluate; write `<out>/results.json` and return the same dict.

    out_dir: defaults to `recipe.train.out_dir`. check_frozen: compare every base tensor before and
    after training (copies the base to host memory: fine for tiny models, costly for 7B).
    """
    out = Path(out_dir or recipe.train.out_dir)
    recipe = replace(recipe, train=replace(recipe.train, out_dir=str(out)))
    report = LoadReport()
    hyper, tokenizer, gist_ids = build_hyper(recipe)
    train_tasks = fit_to_budget(load_recipe_tasks(recipe, "train", report), tokenizer, recipe, report)
    eval_tasks = fit_to_budget(load_recipe_tasks(recipe, "eval", report), tokenizer, recipe, report)
    if not train_tasks:
        raise ValueError(
            f"recipe {recipe.name!r}: no training example fits max_tokens={recipe.max_tokens} "
            f"and max_hyper_tokens={recipe.max_hyper_tokens}"
        )
    before = _base_snapshot(hyper) if check_frozen else None
    records = train(hyper, training_batches(recipe, train_tasks, tokenizer, gist_ids), recipe.train, resume=resume)
    frozen = None
    if before is not None:
        after = _base_snapshot(hyper)
        frozen = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    metrics = evaluate_recipe(recipe, hyper, eval_tasks, tokenizer, gist_ids)
    result = {
        "recipe": recipe.to_dict(),
        "train_tasks": len(train_tasks), "train_examples": sum(len(t.examples) for t in train_tasks),
        "eval_tasks": len(eval_tasks), "skipped": report.num_skipped,
        "final_loss": records[-1]["loss"] if records else None,
        "train": records, "eval": metrics, "base_frozen": frozen,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def format_result(result: dict) -> str:
    ev = result["eval"]
    lines = [
        f"recipe {result['recipe']['name']}: {result['train_tasks']} train tasks "
        f"({result['train_examples']} examples), {result['eval_tasks']} eval tasks, "
        f"{len(result['train'])} steps, final loss {result['final_loss']:.3f}"
    ]
    lines += [f"  {ev['metric']} {name}: {v:.1f}" for name, v in ev["per_dataset_median"].items()]
    lines.append(
        f"  {ev['metric']} mean over tasks: {ev['mean']:.1f}"
        + (f"   exact match {ev['exact_match']:.1f}" if "exact_match" in ev else "")
    )
    if result["base_frozen"] is not None:
        lines.append(f"  base frozen: {result['base_frozen']}")
    return "\n".join(lines)


def main_recipe(argv: Sequence[str] | None = None) -> int:
    """`python -m gistlib recipe <name | file.json> [--set key=value ...] [--out DIR] [--tiny] [--dump]`.

    Only `--tiny` forces the hub offline; a real checkpoint may come from the hub (gated: log in first).
    """
    parser = argparse.ArgumentParser(prog="gistlib recipe", description="train and evaluate HyperLlama on real data")
    parser.add_argument("recipe", help=f"built-in ({', '.join(RECIPES)}) or a recipe JSON file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set train.steps=100 --set model=/path/to/llama",
    )
    parser.add_argument("--out", default=None, help="output folder (default: the recipe's train.out_dir)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="build a tiny random 4-bit Llama + BPE tokenizer on the data and run a few steps (CPU)",
    )
    parser.add_argument("--dump", action="store_true", help="print the recipe as JSON and exit")
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    recipe = load_recipe(args.recipe)
    for a in args.set:
        recipe = set_field(recipe, a)
    if args.dump:
        print(json.dumps(recipe.to_dict(), indent=1))
        return 0
    out = Path(args.out or recipe.train.out_dir)
    if args.tiny:
        recipe = tiny_recipe(recipe, str(out / "tiny_model"), str(out))
        tasks = load_recipe_tasks(recipe, "train") + load_recipe_tasks(recipe, "eval")
        build_tiny_checkpoint(task_texts(tasks), out / "tiny_model", recipe.hyper.num_gist_tokens)
    print(format_result(run_recipe(recipe, out, check_frozen=args.tiny)))
    return 0
