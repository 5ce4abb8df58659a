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
from .files import DataError, LoadReport, decode_text, handle, require, require_text, shared_data_dir

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
    return [line.strip() for line in decode_text(path.read_bytes(), path).splitlines() if line.strip()]


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


def _element_lines(text: str, key: str) -> list[int]:
    """Line (1-based) where each element of the top-level array `key` starts in the JSON `text`.

    Only called to locate an error, so the happy path parses the file once."""
    decoder = json.JSONDecoder()
    ws = json.decoder.WHITESPACE.match

    def skip(i: int) -> int:
        return ws(text, i).end()

    i = skip(0)
    if text[i : i + 1] != "{":
        return []
    i = skip(i + 1)
    while i < len(text) and text[i] == '"':
        name, i = json.decoder.scanstring(text, i + 1)
        i = skip(skip(i) + 1)  # past ':'
        if name == key and text[i : i + 1] == "[":
            lines, i = [], skip(i + 1)
            while i < len(text) and text[i] != "]":
                lines.append(text.count("\n", 0, i) + 1)
                _, i = decoder.raw_decode(text, i)
                i = skip(i)
                if text[i : i + 1] == ",":
                    i = skip(i + 1)
            return lines
        _, i = decoder.raw_decode(text, i)
        i = skip(i)
        if text[i : i + 1] == ",":
            i = skip(i + 1)
    return []


def load_sni_task(
    path: str | os.PathLike,
    max_instances: int | None = MAX_INSTANCES,
    shuffle_seed: int | None = None,
    report: LoadReport | None = None,
) -> Task:
    """One SNI task file. `shuffle_seed=None`: the first `max_instances` (test protocol); an int: a seeded
    sample of them (train protocol). A bad instance (missing field, wrong type, empty input or output)
    raises `DataError` naming the file and line, or is skipped into `report`. A task left without any
    instance raises, or is counted in `report` (reason `no_examples`) and returned empty."""
    path = Path(path)
    name = path.stem
    text = decode_text(path.read_bytes(), path, task=name)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", file=path, line=e.lineno, task=name, reason="bad_json") from e
    if not isinstance(raw, dict):
        raise DataError("an SNI task file must hold a JSON object", file=path, line=1, task=name, reason="wrong_type")
    definition = _definition_text(require(raw, "Definition", file=path, task=name), path, name)
    located: dict[str, list[int]] = {}

    def line_of(key: str, i: int) -> int | None:
        if key not in located:
            located[key] = _element_lines(text, key)
        return located[key][i] if i < len(located[key]) else None

    def a_list(key: str) -> list:
        value = require(raw, key, file=path, task=name)
        if not isinstance(value, list):
            raise DataError(
                f"must be a list, got {type(value).__name__}", file=path, field=key, task=name, reason="wrong_type"
            )
        return value

    demos = []
    for i, d in enumerate(a_list("Positive Examples")):
        kw = {"file": path, "line": line_of("Positive Examples", i), "task": name, "prefix": f"Positive Examples[{i}]."}
        try:
            inp = require_text(d, "input", empty="empty_input", **kw)
            out = require_text(d, "output", empty="empty_output", **kw)
        except DataError as e:
            handle(e, report)
            continue
        demos.append(Example(inp.strip(), out.strip()))
    instances = list(enumerate(a_list("Instances")))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(instances)
    examples = []
    for i, inst in instances:
        if max_instances is not None and len(examples) >= max_instances:
            break
        try:
            kw = {"file": path, "line": line_of("Instances", i), "task": name, "prefix": f"Instances[{i}]."}
            inp = require_text(inst, "input", empty="empty_input", **kw)
            refs = require(inst, "output", **kw)
            refs = [refs] if isinstance(refs, str) else refs
            where = {"file": path, "line": kw["line"], "field": f"Instances[{i}].output", "task": name}
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise DataError("output must be a non-empty list of strings", **where, reason="wrong_type")
            if not refs[0].strip():
                raise DataError("is empty (the model would learn to answer nothing)", **where, reason="empty_output")
        except DataError as e:
            handle(e, report)
            continue
        examples.append(Example(inp.strip(), refs[0].strip(), None, [r.strip() for r in refs]))
    if not examples:
        error = DataError("no usable instance left", file=path, field="Instances", task=name, reason="no_examples")
        if report is None:
            raise error
        report.empty_task(str(error))
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

    Test tasks keep their first `max_instances` instances, train tasks a seeded sample of them. With
    `report`, a task left without instances is counted there (reason `no_examples`) and left out."""
    names = load_sni_split(split, root)
    tasks, missing = [], []
    for name in names:
        path = sni_dir(root) / "tasks" / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        task = load_sni_task(path, max_instances, None if split == "test" else seed, report)
        if task.examples:
            tasks.append(task)
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
