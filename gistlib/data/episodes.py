"""Tasks, examples and episodes, and the seeded sampler that draws episodes from tasks.

    Task     = a name, an optional definition, and examples (input, output, optional answer choices)
    Episode  = one task's demos (read by the hypernetwork) + queries with answers (for the downstream model)

Tasks move to and from HF `datasets` as flat rows (one row per example) and to and from JSONL files
(one line per task), with no hub access.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .files import DataError, LoadReport, handle, read_jsonl, require, require_text

log = logging.getLogger("gistlib.data")


@dataclass
class Example:
    """One input/output pair. `choices`: answer options for rank classification (None = generation).
    `references`: every acceptable output (metrics take the best); None means just `[output]`."""

    input: str
    output: str
    choices: list[str] | None = None
    references: list[str] | None = None

    @property
    def all_references(self) -> list[str]:
        return list(self.references) if self.references else [self.output]


@dataclass
class Task:
    """A task: its examples, an optional definition (instruction), a family, and free metadata
    (`meta`, e.g. the pocket suite's difficulty levels). `fixed_demos`, when set, are the task's
    prescribed demonstrations (SNI positive examples); the sampler then draws only queries."""

    name: str
    examples: list[Example]
    definition: str | None = None
    family: str | None = None
    meta: dict = field(default_factory=dict)
    fixed_demos: list[Example] | None = None


@dataclass
class Episode:
    """A task's demos and its queries; `definition` is copied from the task."""

    task: str
    demos: list[Example]
    queries: list[Example]
    definition: str | None = None


# ----------------------------------------------------------------------------- sampling


def sample_episode(
    task: Task,
    num_demos: int,
    num_queries: int,
    rng: random.Random,
    balanced: bool = False,
    repeat_demo_prob: float = 0.0,
) -> Episode:
    """Draw `num_demos` demos and `num_queries` queries from `task`, disjoint.

    balanced: draw demos round-robin over the distinct outputs (e.g. 2 per category), then shuffle them.
    repeat_demo_prob: each query is, with this probability, a copy of a random demo instead
      (the curriculum of DESIGN 5b: half the time a query repeats a demo word). 0 keeps them disjoint.
    With `task.fixed_demos`, the demos are those (the first `num_demos`) and queries come from examples.
    """
    if task.fixed_demos is not None:
        demos = list(task.fixed_demos[:num_demos])
        pool = list(task.examples)
        if len(pool) < num_queries:
            raise ValueError(f"task {task.name!r} has {len(pool)} examples, needs {num_queries} queries")
        queries = rng.sample(pool, num_queries)
        return Episode(task.name, demos, queries, task.definition)
    need = num_demos + num_queries
    if len(task.examples) < need:
        raise ValueError(f"task {task.name!r} has {len(task.examples)} examples, an episode needs {need}")
    order = list(range(len(task.examples)))
    rng.shuffle(order)
    if balanced:
        by_output: dict[str, list[int]] = {}
        for i in order:  # shuffled, so each group is in random order
            by_output.setdefault(task.examples[i].output, []).append(i)
        groups = list(by_output.values())
        demo_ids = []
        while len(demo_ids) < num_demos:
            for g in groups:
                if g and len(demo_ids) < num_demos:
                    demo_ids.append(g.pop())
        rng.shuffle(demo_ids)
        taken = set(demo_ids)
        rest = [i for i in order if i not in taken]
    else:
        demo_ids, rest = order[:num_demos], order[num_demos:]
    demos = [task.examples[i] for i in demo_ids]
    queries = []
    for i in rest[:num_queries]:
        if repeat_demo_prob > 0 and demos and rng.random() < repeat_demo_prob:
            queries.append(rng.choice(demos))
        else:
            queries.append(task.examples[i])
    return Episode(task.name, demos, queries, task.definition)


class EpisodeSampler:
    """An endless (or `num_episodes`-long), seeded stream of episodes.

    Each episode picks a task with probability proportional to min(len(task.examples), cap), then draws
    disjoint demos and queries from it (`sample_episode`). Iterating twice gives the same episodes.
    `num_demos=None` takes each task's own `meta["num_demos"]` (the pocket suite's level).
    Tasks too small for an episode are left out, counted in `self.report` and logged.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        num_demos: int | None,
        num_queries: int,
        cap: int = 10_000,
        seed: int = 0,
        num_episodes: int | None = None,
        balanced: bool = False,
        repeat_demo_prob: float = 0.0,
    ):
        self.num_demos, self.num_queries, self.cap, self.seed = num_demos, num_queries, cap, seed
        self.num_episodes, self.balanced, self.repeat_demo_prob = num_episodes, balanced, repeat_demo_prob
        self.report = LoadReport()
        self.tasks: list[Task] = []
        for t in tasks:
            demos = 0 if t.fixed_demos is not None else self._demos_for(t)
            if len(t.examples) < demos + num_queries:
                too_small = f"task {t.name!r}: {len(t.examples)} examples < {demos + num_queries}"
                self.report.skip(ValueError(too_small), reason="too_small")
            else:
                self.tasks.append(t)
        self.report.loaded = len(self.tasks)
        if not self.tasks:
            raise ValueError("no task has enough examples for an episode")
        self.weights = [min(len(t.examples), cap) for t in self.tasks]

    def _demos_for(self, task: Task) -> int:
        if self.num_demos is not None:
            return self.num_demos
        if "num_demos" not in task.meta:
            raise ValueError(f"num_demos=None but task {task.name!r} has no meta['num_demos']")
        return int(task.meta["num_demos"])

    def __iter__(self) -> Iterator[Episode]:
        rng = random.Random(self.seed)
        n = 0
        while self.num_episodes is None or n < self.num_episodes:
            task = rng.choices(self.tasks, weights=self.weights)[0]
            yield sample_episode(
                task, self._demos_for(task), self.num_queries, rng, self.balanced, self.repeat_demo_prob
            )
            n += 1

    def take(self, n: int) -> list[Episode]:
        """The first `n` episodes of the stream."""
        it = iter(self)
        return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- JSONL files (one task a line)


def example_to_dict(ex: Example) -> dict:
    d = {"input": ex.input, "output": ex.output}
    if ex.choices is not None:
        d["choices"] = list(ex.choices)
    if ex.references is not None:
        d["references"] = list(ex.references)
    return d


def task_to_dict(task: Task) -> dict:
    """A JSON-ready dict. Answer choices shared by all examples are stored once, at task level."""
    rows = [example_to_dict(e) for e in task.examples]
    shared = None
    if rows and all("choices" in r for r in rows) and all(r["choices"] == rows[0]["choices"] for r in rows):
        shared = rows[0]["choices"]
        for r in rows:
            del r["choices"]
    d: dict = {"name": task.name, "family": task.family, "definition": task.definition, "meta": task.meta}
    if shared is not None:
        d["choices"] = shared
    d["examples"] = rows
    if task.fixed_demos is not None:
        d["fixed_demos"] = [example_to_dict(e) for e in task.fixed_demos]
    return d


def _text_list(value, what: str, **kw) -> list[str] | None:
    """None, or a list of strings (else a `DataError` naming the field)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{what} must be a list of strings", reason="wrong_type", **kw)
    return value


def _example_from_dict(d: dict, shared_choices, *, file=None, line=None, task=None, prefix="") -> Example:
    kw = {"file": file, "line": line, "task": task, "prefix": prefix}
    if not isinstance(d, dict):
        raise DataError(
            "an example must be an object", file=file, line=line, field=prefix, task=task, reason="wrong_type"
        )
    inp = require_text(d, "input", empty="empty_input", **kw)
    out = require_text(d, "output", empty="empty_output", **kw)
    where = {"file": file, "line": line, "task": task}
    choices = _text_list(d.get("choices", shared_choices), "choices", field=prefix + "choices", **where)
    references = _text_list(d.get("references"), "references", field=prefix + "references", **where)
    return Example(inp, out, choices, references)


def _example_list(value, key: str, *, file=None, line=None, task=None) -> list:
    if not isinstance(value, list):
        raise DataError(
            f"must be a list, got {type(value).__name__}",
            file=file,
            line=line,
            field=key,
            task=task,
            reason="wrong_type",
        )
    return value


def task_from_dict(d: dict, file=None, line=None) -> Task:
    """Inverse of `task_to_dict`; a missing field, a field of the wrong type, an empty input or output,
    or a task without examples raises `DataError` naming it."""
    name = require(d, "name", file=file, line=line)
    if not isinstance(name, str) or not name:
        raise DataError("must be a non-empty string", file=file, line=line, field="name", reason="wrong_type")
    rows = _example_list(
        require(d, "examples", file=file, line=line, task=name), "examples", file=file, line=line, task=name
    )
    if not rows:
        raise DataError(
            "the task has no examples", file=file, line=line, field="examples", task=name, reason="no_examples"
        )
    shared = _text_list(d.get("choices"), "choices", file=file, line=line, field="choices", task=name)
    examples = [
        _example_from_dict(e, shared, file=file, line=line, task=name, prefix=f"examples[{i}].")
        for i, e in enumerate(rows)
    ]
    fixed = d.get("fixed_demos")
    if fixed is not None:
        fixed = [
            _example_from_dict(e, None, file=file, line=line, task=name, prefix=f"fixed_demos[{i}].")
            for i, e in enumerate(_example_list(fixed, "fixed_demos", file=file, line=line, task=name))
        ]
    for key, kind in (("definition", str), ("family", str), ("meta", dict)):
        if d.get(key) is not None and not isinstance(d[key], kind):
            raise DataError(
                f"must be {'a string' if kind is str else 'an object'}, got {type(d[key]).__name__}",
                file=file,
                line=line,
                field=key,
                task=name,
                reason="wrong_type",
            )
    return Task(name, examples, d.get("definition"), d.get("family"), d.get("meta") or {}, fixed)


def save_tasks_jsonl(tasks: Sequence[Task], path: str | os.PathLike) -> None:
    """Write one task per line, keys in a fixed order, so equal tasks give equal bytes."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(task_to_dict(t), ensure_ascii=False, separators=(",", ":")) + "\n" for t in tasks)


def load_tasks_jsonl(path: str | os.PathLike, report: LoadReport | None = None) -> list[Task]:
    """Read tasks written by `save_tasks_jsonl`. Bad lines raise, or are skipped into `report`.

    A line is one task, whole or not at all: with `report`, every non-blank line of the file is either
    loaded (counted in `report.loaded`) or skipped (one entry in `report.skipped`, counted by reason)."""
    tasks = []
    for lineno, row in read_jsonl(path, report=report):
        try:
            tasks.append(task_from_dict(row, file=path, line=lineno))
        except DataError as e:
            handle(e, report)
    if report is not None:
        report.loaded += len(tasks)
    return tasks


# ----------------------------------------------------------------------------- HF datasets (flat rows)

FLAT_COLUMNS = ("task", "family", "definition", "input", "output", "choices", "references", "meta")


def tasks_to_rows(tasks: Sequence[Task]) -> list[dict]:
    """One flat dict per example: task, family, definition, input, output, choices, references, meta (JSON text).

    `meta` is JSON text because Arrow needs one schema for every row."""
    return [
        {
            "task": t.name,
            "family": t.family,
            "definition": t.definition,
            "input": e.input,
            "output": e.output,
            "choices": e.choices,
            "references": e.references,
            "meta": json.dumps(t.meta, sort_keys=True),
        }
        for t in tasks
        for e in t.examples
    ]


def tasks_from_rows(rows, report: LoadReport | None = None) -> list[Task]:
    """Group flat rows (dicts, a `datasets.Dataset`, ...) by `task`, in order of first appearance.

    Only `task`, `input` and `output` are required; a row missing one raises (or is skipped into `report`)."""
    tasks: dict[str, Task] = {}
    for i, row in enumerate(rows):
        missing = [k for k in ("task", "input", "output") if row.get(k) is None]
        if missing:
            handle(DataError(f"row {i}: missing field", field=missing[0], task=row.get("task")), report)
            continue
        bad = [k for k in ("task", "input", "output") if not isinstance(row[k], str)]
        if bad:
            kind = type(row[bad[0]]).__name__
            handle(
                DataError(f"row {i}: must be a string, got {kind}", field=bad[0], task=None, reason="wrong_type"),
                report,
            )
            continue
        empty = [k for k in ("input", "output") if not row[k].strip()]
        if empty:
            handle(
                DataError(f"row {i}: is empty", field=empty[0], task=row["task"], reason=f"empty_{empty[0]}"), report
            )
            continue
        name = row["task"]
        if name not in tasks:
            meta = json.loads(row["meta"]) if row.get("meta") else {}
            tasks[name] = Task(name, [], row.get("definition"), row.get("family"), meta)
        tasks[name].examples.append(Example(row["input"], row["output"], row.get("choices"), row.get("references")))
    if report is not None:
        report.loaded += len(tasks)
    return list(tasks.values())


def tasks_to_dataset(tasks: Sequence[Task]):
    """A `datasets.Dataset` of flat rows (see `tasks_to_rows`)."""
    import datasets

    return datasets.Dataset.from_list(tasks_to_rows(tasks))


def tasks_from_dataset(dataset, report: LoadReport | None = None) -> list[Task]:
    """Tasks from a `datasets.Dataset` of flat rows (e.g. `load_dataset("json", data_files=...)["train"]`)."""
    return tasks_from_rows(dataset, report)


def save_rows_jsonl(tasks: Sequence[Task], path: str | os.PathLike) -> None:
    """Write flat rows as JSONL, readable by `datasets.load_dataset("json", data_files=path)`."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in tasks_to_rows(tasks))
