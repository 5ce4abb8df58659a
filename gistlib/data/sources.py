"""Every data family behind one small interface: a `Source` of training, validation and test data.

    family          training tasks                          test episodes                      metric
    pocket          the synthetic suite's train split       fixed episodes of its test split   accuracy (rank class.)
    p3              P3 datasets x promptsource templates    T0 held-out datasets, per template accuracy (rank class.)
    sni             Super-NaturalInstructions train tasks   test tasks: definition + 2 demos   ROUGE-L, exact match
    symbol          classification sets, labels -> symbols  held-out sets, k exemplars/class   accuracy (rank class.)
    classification  classification sets, real label words  held-out sets                      accuracy (rank class.)

(rank class.: rank classification; ROUGE-L and exact match of greedy answers.)

`load_tasks(data)` reads a family's tasks from its upstream files; `Source` adds what every method
needs once a tokenizer exists: tasks fitted to the token budgets, seeded episode streams for training,
fixed validation episodes (from the validation split where the family has one, else from training
tasks: a held-in check, never test data) and fixed test episodes. Anything dropped is counted in
`Source.report`.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .csvfile import read_ag_news, read_csv_classification
from .episodes import Episode, EpisodeSampler, Task, load_tasks_jsonl
from .files import LoadReport, shared_data_dir
from .p3 import build_p3_task, default_split, load_templates, read_raw_rows
from .pocket import load_pocket_corpus, load_pocket_suite
from .render import COMPACT, VERBOSE, RenderFormat, answer_ids, definition_ids, demo_ids, query_ids
from .sni import load_sni_split, load_sni_task, sni_dir, sni_episode
from .symbol import read_cr, read_dbpedia, read_nli_jsonl, read_sst2, read_subj, read_trec, symbol_episodes

__all__ = ["Source", "load_tasks", "make_source", "task_texts", "fit_to_budget", "render_format"]

log = logging.getLogger("gistlib.data.sources")

FORMATS = {"compact": COMPACT, "verbose": VERBOSE}


def render_format(data) -> RenderFormat:
    """The layout of `data.format`, ended by `data.answer_end` (eos: the tokenizer's EOS; newline: "\\n")."""
    fmt = FORMATS[data.format]
    return replace(fmt, answer_end="\n") if getattr(data, "answer_end", "eos") == "newline" else fmt


def _root(data) -> Path:
    return Path(data.root) if data.root else shared_data_dir()


# ----------------------------------------------------------------------------- reading tasks


def _p3_tasks(spec: str, data, report: LoadReport) -> list[Task]:
    """`dataset[:split]`: a SuperGLUE task, `anli:r1`/`anli:r2`, or a P3 training dataset (`p3.P3_TRAINING`, e.g.
    `dream`, `cos_e/v1.11`, `rotten_tomatoes:train`); the split defaults to `p3.default_split(dataset)`."""
    dataset, _, split = spec.partition(":")
    split = split or default_split(dataset)
    root = _root(data)
    templates = [
        t
        for t in load_templates("anli" if dataset == "anli" else dataset, root / "promptsource" / "templates")
        if t.original_task
    ]
    templates = templates[: data.max_templates] if data.max_templates else templates
    rows = read_raw_rows(dataset, split, root, report)
    if data.max_rows:
        rows = random.Random(data.seed).sample(rows, min(data.max_rows, len(rows)))
    tasks = [build_p3_task(dataset, t, rows, data.seed, report) for t in templates]
    if dataset == "anli":  # two rounds are two datasets
        for t in tasks:
            t.name = t.name.replace("anli__", f"anli_{split}__")
    return tasks


def _sni_tasks(spec: str, data, report: LoadReport, which: str) -> list[Task]:
    names = load_sni_split(spec.split(":", 1)[1], _root(data) / "sni") if spec.startswith("split:") else [spec]
    folder = sni_dir(_root(data) / "sni") / "tasks"
    present = [n for n in names if (folder / f"{n}.json").exists()]
    if len(present) < len(names):
        log.warning("SNI: %d of %d tasks have no file under %s", len(names) - len(present), len(names), folder)
        report.skip(ValueError(f"SNI {spec}: {len(names) - len(present)} task files missing under {folder}"))
    cap = data.max_rows or 100
    seed = None if which == "eval" else data.seed
    return [load_sni_task(folder / f"{n}.json", cap, seed, report) for n in present]


def _classification_task(spec: str, data, report: LoadReport) -> Task:
    """A classification set by name (sst2, trec, cb, rte, ag_news under root/classification), or any CSV in the
    AG News layout as `csv:PATH` (label index column, text columns, `classes.txt` beside it)."""
    base = _root(data) / "classification"
    if spec.startswith("csv:"):
        path = Path(spec[4:])
        task = read_csv_classification(
            path, path.parent / "classes.txt", f"{path.parent.name}_{path.stem}", report=report
        )
        return _sample_per_label(task, data)
    readers: dict[str, Callable[[], Task]] = {
        "sst2": lambda: read_sst2("train", base, report),
        "trec": lambda: read_trec("train", base, report),
        "cb": lambda: read_nli_jsonl(base / "cb" / "train.jsonl", "cb", report),
        "rte": lambda: read_nli_jsonl(base / "rte" / "train.jsonl", "rte", report),
        "ag_news": lambda: read_ag_news("train", base, report),
        "cr": lambda: read_cr(base, report),  # CR, SUBJ: test splits (the only ones on disk)
        "subj": lambda: read_subj(base, report),
        "dbpedia": lambda: read_dbpedia(base, report),  # a 256-row sample, 14 classes
    }
    if spec not in readers:
        raise ValueError(f"data.family={data.family!r}: unknown dataset {spec!r}; known: {', '.join(readers)}")
    return _sample_per_label(readers[spec](), data)


def _sample_per_label(task: Task, data) -> Task:
    """At most `data.max_rows` examples, the same number per label (every class kept)."""
    if data.max_rows:
        rng = random.Random(data.seed)
        by_label: dict[str, list] = {}
        for ex in task.examples:
            by_label.setdefault(ex.output, []).append(ex)
        per = max(1, data.max_rows // len(by_label))
        task.examples = [
            ex for lab in sorted(by_label) for ex in rng.sample(by_label[lab], min(per, len(by_label[lab])))
        ]
    return task


def _pocket_tasks(data, which: str) -> list[Task]:
    suite = load_pocket_suite()
    split = {"train": "train", "validation": "validation", "eval": "test"}[which]
    families = data.eval_tasks if which == "eval" and data.eval_tasks else data.train_tasks
    return [t for t in suite[split] if t.family in families and (not data.levels or t.meta.get("level") in data.levels)]


def load_tasks(data, which: str, report: LoadReport | None = None) -> list[Task]:
    """The tasks of `data` (a DataConfig) for `which` = "train" | "validation" | "eval", before length fitting.

    Only the pocket suite has a validation split ([] elsewhere). Missing files raise FileNotFoundError
    naming the folder and how to point at the data."""
    report = report if report is not None else LoadReport()
    if data.family == "pocket":
        return _pocket_tasks(data, which)
    if which == "validation":
        return []
    specs = data.train_tasks if which == "train" else data.eval_tasks
    try:
        tasks: list[Task] = []
        for spec in specs:
            if data.family == "p3":
                tasks += _p3_tasks(spec, data, report)
            elif data.family == "sni":
                tasks += _sni_tasks(spec, data, report, which)
            else:
                tasks.append(_classification_task(spec, data, report))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"data.family={data.family!r}: {e}. Data are read from {_root(data)} "
            f"(set GISTLIB_DATA or data.root to the datasets' folder)"
        ) from e
    if which == "train":
        for path in data.train_task_files:
            tasks += load_tasks_jsonl(path, report)
    elif data.max_eval_tasks:
        tasks = tasks[: data.max_eval_tasks]
    if not tasks:
        raise ValueError(f"data.family={data.family!r}: no {which} tasks found under {_root(data)} for {specs}")
    return tasks


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


def fit_to_budget(
    tasks: Sequence[Task],
    tokenizer,
    fmt: RenderFormat,
    max_hyper_tokens: int,
    max_tokens: int,
    num_gist_tokens: int,
    num_demos: int,
    report: LoadReport | None = None,
) -> list[Task]:
    """Drop examples that cannot be rendered within the budgets: a query (+ its longest answer choice)
    over `max_tokens`, or a demo that alone overflows the hypernetwork input. Tasks left with no
    example, or whose fixed demos (SNI) do not fit, are dropped. Counts go to `report`."""
    kept_tasks = []
    for t in tasks:
        head = 1 + len(definition_ids(t.definition, tokenizer, fmt)) + num_gist_tokens
        if t.fixed_demos and head + len(demo_ids(t.fixed_demos[0], tokenizer, fmt)) > max_hyper_tokens:
            if report is not None:
                report.skip(ValueError(f"task {t.name!r}: definition + first positive example exceed max_hyper_tokens"))
            continue
        keep = []
        for ex in t.examples:
            answers = [ex.output, *(ex.choices or [])]
            need = 1 + len(query_ids(ex, tokenizer, fmt)) + max(len(answer_ids(a, tokenizer, fmt)) for a in answers)
            demo_ok = t.fixed_demos is not None or head + len(demo_ids(ex, tokenizer, fmt)) <= max_hyper_tokens
            if need <= max_tokens and demo_ok:
                keep.append(ex)
        if report is not None and len(keep) < len(t.examples):
            report.skip(
                ValueError(f"task {t.name!r}: {len(t.examples) - len(keep)} of {len(t.examples)} exceed the budgets")
            )
        if keep:
            kept_tasks.append(
                replace(t, examples=keep, meta={**t.meta, "num_demos": num_demos or t.meta.get("num_demos")})
            )
        elif report is not None:
            report.skip(ValueError(f"task {t.name!r}: no example fits the token budgets: task dropped"))
    return kept_tasks


@dataclass
class Source:
    """A data family's tasks, fitted to a tokenizer's budgets, and the episodes every method reads.

    data: the DataConfig; train / validation / test: fitted tasks (validation [] where the family has no split).
    """

    data: object
    train: list[Task]
    validation: list[Task]
    test: list[Task]
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def fmt(self) -> RenderFormat:
        return render_format(self.data)

    @property
    def num_demos(self) -> int | None:
        """Demos per episode (None: each task's own `meta["num_demos"]`)."""
        return self.data.num_demos or None

    def episodes(self, tasks: Sequence[Task], seed: int, num_queries: int, repeat_demo_prob: float = 0.0):
        """An endless, seeded training episode stream over `tasks` (symbol tuning: a fresh label map each time)."""
        if self.data.family == "symbol":
            return symbol_episodes(tasks, self.data.num_demos or 4, num_queries, seed=seed)
        sampler = EpisodeSampler(
            tasks,
            num_demos=self.num_demos,
            num_queries=num_queries,
            seed=seed,
            repeat_demo_prob=repeat_demo_prob,
            balanced=self.data.balanced_demos,
        )
        return iter(sampler)

    def training_episodes(
        self, seed: int, num_queries: int, first_levels: Sequence[str] = (), first_episodes: int = 0
    ) -> Iterator[Episode]:
        """The stream every trained method reads (with the curriculum's repeated demo words): the first
        `first_episodes` episodes from the training tasks of the pocket levels `first_levels` only, then all."""
        stream = self.episodes(self.train, seed, num_queries, self.data.repeat_demo_prob)
        if not (first_levels and first_episodes):
            return stream
        easy = [t for t in self.train if t.meta.get("level") in first_levels]
        if not easy:
            have = sorted({str(t.meta.get("level")) for t in self.train})
            raise ValueError(
                f"train.curriculum_levels={list(first_levels)}: no training task has these levels (they have {have}); "
                "use the pocket levels or set train.curriculum_steps=0"
            )
        head = self.episodes(easy, seed, num_queries, self.data.repeat_demo_prob)
        return itertools.chain(itertools.islice(head, first_episodes), stream)

    def validation_episodes(self, n: int) -> list[Episode]:
        """Fixed validation episodes (2 queries each): the validation split, else held-in training tasks."""
        tasks = self.validation or self.train
        if self.data.family == "symbol":
            return list(symbol_episodes(tasks, self.data.num_demos or 4, 2, seed=1, num_episodes=n))
        return EpisodeSampler(tasks, self.num_demos, 2, seed=1, num_episodes=n, balanced=self.data.balanced_demos).take(
            n
        )

    def test_episodes(self, episodes: int, queries: int, seed: int) -> list[Episode]:
        """The fixed test episodes every method is scored on.

        pocket: `episodes` episodes over the test tasks; sni: one episode per task (definition + the first
        `num_demos` positive examples, the first `queries` instances); others: `episodes` per task."""
        fam = self.data.family
        if fam == "pocket":
            return EpisodeSampler(
                self.test, None, queries, seed=seed, num_episodes=episodes, balanced=self.data.balanced_demos
            ).take(episodes)
        if fam == "sni":
            return [sni_episode(t, t.examples[:queries], self.data.num_demos or 2) for t in self.test]
        out: list[Episode] = []
        for i, t in enumerate(self.test):
            if fam == "symbol":
                out += symbol_episodes([t], self.data.num_demos or 4, queries, seed=seed + i, num_episodes=episodes)
                continue
            n = min(queries, len(t.examples) - (self.data.num_demos or 0))
            if n < 1:
                self.report.skip(ValueError(f"task {t.name!r}: too few examples for demos + 1 query: not evaluated"))
                continue
            out += EpisodeSampler([t], self.num_demos, n, seed=seed + i, num_episodes=episodes).take(episodes)
        return out

    def group(self, episode: Episode) -> str:
        """What results are broken down by: the pocket level, the P3 dataset, else the task."""
        if self.data.family == "pocket":
            task = next((t for t in self.test if t.name == episode.task), None)
            return str(task.meta.get("level", "?")) if task else "?"
        return episode.task.split("__")[0]

    def corpus(self) -> list[str]:
        """Plain text for hyperpretraining: the pocket corpus, else the training tasks' texts."""
        if self.data.family == "pocket":
            return load_pocket_corpus()
        return [" ".join(task_texts([t])) for t in self.train]


def _hold_out(train: list[Task], validation: list[Task], n: int, seed: int) -> tuple[list[Task], list[Task]]:
    """Move `n` training tasks (a seeded choice) to validation, where the family has no validation split:
    early stopping then reads tasks the model never trained on, and never the test tasks."""
    if not n or validation:
        return train, validation
    if n >= len(train):
        raise ValueError(f"data.validation_tasks={n} would leave no training task (there are {len(train)})")
    held = set(random.Random(seed).sample(range(len(train)), n))
    return [t for i, t in enumerate(train) if i not in held], [t for i, t in enumerate(train) if i in held]


def make_source(data, tokenizer, num_gist_tokens: int, tasks: dict[str, list[Task]] | None = None) -> Source:
    """Load (or take `tasks`) and fit a family's train / validation / eval tasks to `tokenizer`'s budgets."""
    report = LoadReport()
    tasks = tasks or {w: load_tasks(data, w, report) for w in ("train", "validation", "eval")}
    fmt = render_format(data)

    def fit(ts):
        if data.family == "pocket":  # generated to fit
            return list(ts)
        return fit_to_budget(
            ts, tokenizer, fmt, data.max_hyper_tokens, data.max_tokens, num_gist_tokens, data.num_demos, report
        )

    train, validation = fit(tasks["train"]), fit(tasks["validation"])
    train, validation = _hold_out(train, validation, getattr(data, "validation_tasks", 0), data.seed)
    source = Source(data, train, validation, fit(tasks["eval"]), report)
    if not source.train:
        raise ValueError(
            f"data.family={data.family!r}: no training example fits data.max_tokens={data.max_tokens} "
            f"and data.max_hyper_tokens={data.max_hyper_tokens}"
        )
    return source
