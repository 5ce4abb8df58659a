"""Super-NaturalInstructions (Wang et al. 2022) in the Tk-Instruct protocol.

Files (allenai/natural-instructions layout):
    splits/default/{train,test}_tasks.txt   one task name per line
    tasks/<name>.json                       Definition (list of str, or str in older files),
                                            Positive Examples [{input, output, explanation}],
                                            Instances [{id, input, output: [references...]}]

A task becomes a `Task` whose definition is the first Definition string, whose `fixed_demos` are the
positive examples (Tk-Instruct shows 2) and whose examples are the instances, capped: the first 100 of
a test task, at most 100 (after a seeded shuffle) of a train task. Every reference is kept for metrics.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

from .episodes import Episode, Example, Task
from .files import DataError, LoadReport, handle, require, shared_data_dir

MAX_INSTANCES = 100
NUM_POSITIVE_EXAMPLES = 2


def sni_dir(root: str | os.PathLike | None = None) -> Path:
    """`<shared data>/sni`, or `root` if given."""
    return Path(root) if root is not None else shared_data_dir() / "sni"


def load_sni_split(split: str, root: str | os.PathLike | None = None) -> list[str]:
    """Task names of the official split ('train' or 'test'), in file order."""
    path = sni_dir(root) / "splits" / "default" / f"{split}_tasks.txt"
    if not path.exists():
        raise FileNotFoundError(f"no SNI split file {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _definition_text(definition, path, task) -> str:
    if isinstance(definition, list):
        if not definition or not isinstance(definition[0], str):
            raise DataError("Definition list is empty or not text", file=path, field="Definition", task=task)
        return definition[0].strip()
    if isinstance(definition, str):
        return definition.strip()
    raise DataError(
        f"Definition must be a list or a string, got {type(definition).__name__}",
        file=path,
        field="Definition",
        task=task,
    )


def load_sni_task(
    path: str | os.PathLike,
    max_instances: int | None = MAX_INSTANCES,
    shuffle_seed: int | None = None,
    report: LoadReport | None = None,
) -> Task:
    """One SNI task file. `shuffle_seed=None`: the first `max_instances` (test protocol); an int: a seeded
    sample of them (train protocol). A bad instance raises `DataError`, or is skipped into `report`."""
    path = Path(path)
    name = path.stem
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", file=path, line=e.lineno, task=name) from e
    definition = _definition_text(require(raw, "Definition", file=path, task=name), path, name)
    demos = []
    for i, d in enumerate(require(raw, "Positive Examples", file=path, task=name)):
        kw = {"file": path, "task": name, "prefix": f"Positive Examples[{i}]."}
        demos.append(Example(str(require(d, "input", **kw)).strip(), str(require(d, "output", **kw)).strip()))
    instances = list(enumerate(require(raw, "Instances", file=path, task=name)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(instances)
    examples = []
    for i, inst in instances:
        if max_instances is not None and len(examples) >= max_instances:
            break
        try:
            kw = {"file": path, "task": name, "prefix": f"Instances[{i}]."}
            inp, refs = require(inst, "input", **kw), require(inst, "output", **kw)
            refs = [refs] if isinstance(refs, str) else list(refs)
            if not refs or not all(isinstance(r, str) for r in refs):
                raise DataError(
                    "output must be a non-empty list of strings",
                    file=path,
                    field=f"Instances[{i}].output",
                    task=name,
                )
        except DataError as e:
            handle(e, report)
            continue
        examples.append(Example(inp.strip(), refs[0].strip(), None, [r.strip() for r in refs]))
    if report is not None:
        report.loaded += len(examples)
    return Task(name, examples, definition, family="sni", meta={"source": str(path)}, fixed_demos=demos)


def load_sni_tasks(
    split: str,
    root: str | os.PathLike | None = None,
    max_instances: int = MAX_INSTANCES,
    seed: int = 0,
    report: LoadReport | None = None,
) -> tuple[list[Task], list[str]]:
    """Tasks of an official split that have a file under `tasks/`, and the names of those that have none.

    Test tasks keep their first `max_instances` instances, train tasks a seeded sample of them."""
    names = load_sni_split(split, root)
    tasks, missing = [], []
    for name in names:
        path = sni_dir(root) / "tasks" / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        tasks.append(load_sni_task(path, max_instances, None if split == "test" else seed, report))
    return tasks, missing


def sni_episode(task: Task, queries: list[Example] | None = None, num_pos: int = NUM_POSITIVE_EXAMPLES) -> Episode:
    """The Tk-Instruct episode: definition + the first `num_pos` positive examples as demos, `queries`
    (default: all the task's instances)."""
    return Episode(
        task.name,
        list((task.fixed_demos or [])[:num_pos]),
        list(queries if queries is not None else task.examples),
        task.definition,
    )


def _end_punct(text: str) -> str:
    return text if text and text[-1] in string.punctuation else text + "."


def tk_instruct_prompt(task: Task, query: Example, num_pos: int = NUM_POSITIVE_EXAMPLES) -> str:
    """The Tk-Instruct source text ("Definition: ... Positive Example 1 - ... Now complete the following
    example - Input: ... Output: "), as in the natural-instructions collator (no task name, no explanations)."""
    text = ""
    if task.definition:
        text += _end_punct("Definition: " + task.definition.strip()) + "\n\n"
    for i, d in enumerate((task.fixed_demos or [])[:num_pos]):
        text += _end_punct(f" Positive Example {i + 1} -\nInput: {d.input.strip()}") + "\n"
        text += _end_punct(f" Output: {d.output.strip()}") + "\n\n"
    text += "Now complete the following example -\n"
    text += _end_punct(f"Input: {query.input.strip()}") + "\n"
    return text + "Output: "
