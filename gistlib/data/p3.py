"""P3-style examples: promptsource templates applied to raw SuperGLUE / ANLI rows.

A promptsource template (YAML, tagged `!Template`) holds:
    jinja           "<prompt> ||| <target>", Jinja2 with the custom filters `choice`, `most_frequent`,
                    `highlight` and the global `zip`
    answer_choices  optional Jinja template rendering to "A ||| B ||| C" (rank classification)
    metadata        `!TemplateMetadata` (original_task, choices_in_prompt, metrics, ...)

Raw rows are first mapped to the HF `super_glue` / `anli` schema the templates expect
(`to_hf_schema`), e.g. CB label "entailment" -> 0. A template that renders an empty prompt or target for a
row (e.g. a COPA template only for "effect" questions) does not apply to it: P3 drops those, and so do
we, counting them in the report. A template that fails to render raises `DataError` with file, template,
row and task.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox
import yaml

from .episodes import Example, Task
from .files import DataError, LoadReport, handle, read_csv_rows, read_jsonl, shared_data_dir

# ----------------------------------------------------------------------------- templates


class _TemplateLoader(yaml.SafeLoader):
    """SafeLoader that reads promptsource's `!Template` / `!TemplateMetadata` tags as plain mappings."""


def _as_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict:
    return loader.construct_mapping(node, deep=True)


_TemplateLoader.add_constructor("!Template", _as_mapping)
_TemplateLoader.add_constructor("!TemplateMetadata", _as_mapping)


@dataclass
class PromptTemplate:
    """One promptsource template."""

    id: str
    name: str
    jinja: str
    answer_choices: str | None
    metadata: dict = field(default_factory=dict)
    file: str = ""

    @property
    def original_task(self) -> bool:
        return bool(self.metadata.get("original_task"))


def templates_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else shared_data_dir() / "promptsource" / "templates"


def load_templates(dataset: str, root: str | os.PathLike | None = None) -> list[PromptTemplate]:
    """Templates of `dataset` ("super_glue/cb", "anli", ...), sorted by name. Bad YAML or a template
    without `jinja` raises `DataError` naming the file."""
    path = templates_dir(root) / dataset / "templates.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no promptsource templates at {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_TemplateLoader)
    except yaml.YAMLError as e:
        line = e.problem_mark.line + 1 if getattr(e, "problem_mark", None) else None
        raise DataError(f"YAML does not parse ({getattr(e, 'problem', e)})", file=path, line=line, task=dataset) from e
    if not isinstance(raw, dict) or not isinstance(raw.get("templates"), dict):
        raise DataError("no 'templates' mapping", file=path, field="templates", task=dataset)
    out = []
    for tid, t in raw["templates"].items():
        if not isinstance(t, dict) or "jinja" not in t:
            raise DataError("template without 'jinja'", file=path, field=f"templates.{tid}.jinja", task=dataset)
        out.append(
            PromptTemplate(
                str(tid),
                str(t.get("name", tid)),
                t["jinja"],
                t.get("answer_choices"),
                t.get("metadata") or {},
                str(path),
            )
        )
    return sorted(out, key=lambda t: t.name)


# ----------------------------------------------------------------------------- rendering (promptsource semantics)

_PIPE_GUARD = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's stand-in for '|||' inside field values


def _most_frequent(items):
    """The items that occur most often (promptsource's `most_frequent` filter)."""
    if not items:
        return None
    counts = Counter(items).most_common()
    return [x for x, c in counts if c == counts[0][1]]


def make_environment(rng: random.Random) -> jinja2.Environment:
    """A sandboxed Jinja environment with promptsource's filters; `choice` draws from `rng` (seeded)."""
    # templates are looked up by their own source text, so each compiles once and is cached
    env = jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, loader=jinja2.FunctionLoader(lambda source: source), cache_size=4096
    )
    env.filters["choice"] = lambda seq: rng.choice(list(seq))
    env.filters["most_frequent"] = _most_frequent
    env.filters["highlight"] = lambda s: s  # a display-only filter in promptsource; plain text here
    env.globals["zip"] = zip
    return env


def _protect(row: dict) -> dict:
    return {k: v.replace("|||", _PIPE_GUARD) if isinstance(v, str) else v for k, v in row.items()}


def answer_choices(template: PromptTemplate, row: dict, env: jinja2.Environment) -> list[str] | None:
    """The answer choices rendered for `row`, or None if the template has none."""
    if template.answer_choices is None:
        return None
    text = env.get_template(template.answer_choices).render(**_protect(row))
    return [c.strip().replace(_PIPE_GUARD, "|||") for c in text.split("|||")]


def apply_template(
    template: PromptTemplate, row: dict, env: jinja2.Environment
) -> tuple[str, str, list[str] | None] | None:
    """(prompt, target, choices) for `row`, or None when the template does not apply to it (empty part).

    Raises jinja2 errors as they come; `build_p3_task` turns them into located `DataError`s."""
    if "answer_choices" in row:
        raise ValueError("row contains the reserved key 'answer_choices'")
    choices = answer_choices(template, row, env)
    text = env.get_template(template.jinja).render(**_protect(row), answer_choices=choices)
    parts = [p.replace(_PIPE_GUARD, "|||").strip() for p in text.split("|||")]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1], choices


# ----------------------------------------------------------------------------- raw rows -> HF schema

LABELS = {
    "super_glue/cb": {"entailment": 0, "contradiction": 1, "neutral": 2},
    "super_glue/rte": {"entailment": 0, "not_entailment": 1},
    "anli": {"e": 0, "n": 1, "c": 2},
}
BOOL_LABEL_TASKS = ("super_glue/wic", "super_glue/boolq", "super_glue/wsc.fixed")
SUPERGLUE_FOLDERS = {
    "super_glue/cb": "CB",
    "super_glue/copa": "COPA",
    "super_glue/rte": "RTE",
    "super_glue/wic": "WiC",
    "super_glue/wsc.fixed": "WSC",
    "super_glue/boolq": "BoolQ",
    "super_glue/multirc": "MultiRC",
}


def to_hf_schema(dataset: str, row: dict) -> list[dict]:
    """Map one raw row to the HF schema of `dataset` (a list: MultiRC gives one row per answer).

    Raises KeyError/ValueError on a missing field or unknown label (the caller locates it)."""
    row = dict(row)
    if dataset == "super_glue/multirc":
        p = row["passage"]
        return [
            {
                "paragraph": p["text"],
                "question": q["question"],
                "answer": a["text"],
                "label": int(a["label"]),
                "idx": {"paragraph": row["idx"], "question": q["idx"], "answer": a["idx"]},
            }
            for q in p["questions"]
            for a in q["answers"]
        ]
    if dataset == "anli":
        if row["gold_label"] not in LABELS["anli"]:
            raise ValueError(f"unknown label {row['gold_label']!r} (known: e, n, c)")
        return [
            {
                "premise": row["context"],
                "hypothesis": row["statement"],
                "label": LABELS["anli"][row["gold_label"]],
                "uid": row.get("uid"),
            }
        ]
    if dataset == "super_glue/wsc.fixed":
        row.update({k: row["target"][k] for k in ("span1_index", "span1_text", "span2_index", "span2_text")})
        del row["target"]
    if dataset in LABELS:
        if row["label"] not in LABELS[dataset]:
            raise ValueError(f"unknown label {row['label']!r} (known: {', '.join(LABELS[dataset])})")
        row["label"] = LABELS[dataset][row["label"]]
    elif dataset in BOOL_LABEL_TASKS:
        if not isinstance(row["label"], bool):
            raise ValueError(f"label must be true/false, got {row['label']!r}")
        row["label"] = int(row["label"])
    elif dataset == "super_glue/copa":
        row["label"] = int(row["label"])
    else:
        raise ValueError(f"no label mapping for {dataset!r}")
    return [row]


def read_raw_rows(
    dataset: str, split: str = "val", root: str | os.PathLike | None = None
) -> list[tuple[str, int, dict]]:
    """(file, line, raw row) triples. SuperGLUE: `superglue/<Task>/<split>.jsonl`; ANLI: split 'r1'/'r2'
    reads `anli/ANLI_analysis_<split>_dev.csv` (line = the file line where the record starts, which is
    not the record number when a quoted field spans lines). Bytes that are not UTF-8 or a CSV that does
    not parse raise `DataError` with the file and line."""
    base = Path(root) if root is not None else shared_data_dir()
    if dataset == "anli":
        path = base / "anli" / f"ANLI_analysis_{split}_dev.csv"
        return read_csv_records(path, task=dataset)
    if dataset not in SUPERGLUE_FOLDERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: anli, {', '.join(SUPERGLUE_FOLDERS)}")
    path = base / "superglue" / SUPERGLUE_FOLDERS[dataset] / f"{split}.jsonl"
    return [(str(path), line, r) for line, r in read_jsonl(path, task=dataset)]


def read_csv_records(path: str | os.PathLike, task: str | None = None) -> list[tuple[str, int, dict]]:
    """(file, line, row) for each record of a CSV with a header, rows as `csv.DictReader` gives them
    (short rows padded with None, extra fields under the key None); `line` is the record's first line."""
    records = read_csv_rows(path, task)
    if not records:
        return []
    (_, header), out = records[0], []
    for start, fields in records[1:]:
        row: dict = dict(zip(header, fields))
        if len(fields) > len(header):
            row[None] = fields[len(header) :]
        for key in header[len(fields) :]:
            row[key] = None
        out.append((str(path), start, row))
    return out


# ----------------------------------------------------------------------------- tasks

# what rendering a template on a row can raise: Jinja's own errors and the Python errors of the
# expressions inside templates (a bad index into answer_choices, a method on a missing value, ...)
RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def build_p3_task(
    dataset: str,
    template: PromptTemplate,
    raw_rows: list[tuple[str, int, dict]],
    seed: int = 0,
    report: LoadReport | None = None,
) -> Task:
    """One P3 task = one (dataset, template): every row mapped to the HF schema, then rendered.

    Examples carry the template's answer choices (rank classification) when it has them. A row whose
    mapping or rendering fails raises `DataError` (or is skipped into `report`); a row the template does
    not apply to is counted in `report` (and in `task.meta['not_applicable']`)."""
    name = f"{dataset.replace('/', '_')}__{template.name.replace(' ', '_')}"
    env = make_environment(random.Random(f"{seed}-{template.id}"))
    examples, not_applicable = [], 0
    for file, line, raw in raw_rows:
        try:
            rows = to_hf_schema(dataset, raw)
        except KeyError as e:
            handle(DataError("missing field", file=file, line=line, field=str(e.args[0]), task=name), report)
            continue
        except (ValueError, TypeError) as e:
            handle(
                DataError(f"cannot map the row to the HF schema: {e}", file=file, line=line, task=name),
                report,
            )
            continue
        for row in rows:
            try:
                out = apply_template(template, row, env)
            except RENDER_ERRORS as e:  # all become located errors
                handle(
                    DataError(
                        f"template {template.name!r} ({template.file}) failed: {type(e).__name__}: {e}",
                        file=file,
                        line=line,
                        task=name,
                    ),
                    report,
                )
                continue
            if out is None:
                not_applicable += 1
                continue
            prompt, target, choices = out
            examples.append(Example(prompt, target, choices))
    if report is not None:
        report.loaded += len(examples)
        if not_applicable:
            report.skip(
                ValueError(f"task {name!r}: template does not apply to {not_applicable} rows (P3 drops them)"),
                reason="not_applicable",
                count=not_applicable,
            )
        if not examples:
            report.empty_task(f"task {name!r}: no example left")
    meta = {
        "dataset": dataset,
        "template": template.name,
        "template_id": template.id,
        "original_task": template.original_task,
        "not_applicable": not_applicable,
    }
    return Task(name, examples, None, family="p3", meta=meta)


def load_p3_tasks(
    dataset: str,
    split: str = "val",
    root: str | os.PathLike | None = None,
    templates_root: str | os.PathLike | None = None,
    original_task_only: bool = True,
    seed: int = 0,
    report: LoadReport | None = None,
) -> list[Task]:
    """All P3 tasks of `dataset` (one per template; by default only templates of the original task, as in
    T0's held-out evaluation). `templates_root` defaults to `<root>/promptsource/templates`."""
    base = Path(root) if root is not None else shared_data_dir()
    templates = load_templates(
        "anli" if dataset == "anli" else dataset, templates_root or base / "promptsource" / "templates"
    )
    if original_task_only:
        templates = [t for t in templates if t.original_task]
    rows = read_raw_rows(dataset, split, base)
    return [build_p3_task(dataset, t, rows, seed, report) for t in templates]
