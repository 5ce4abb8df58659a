"""P3-style examples: promptsource templates applied to raw SuperGLUE / ANLI rows.

A promptsource template (YAML, tagged `!Template`) holds:
    jinja           "<prompt> ||| <target>", Jinja2 with the custom filters `choice`, `most_frequent`,
                    `highlight` and the global `zip`
    answer_choices  optional Jinja template rendering to "A ||| B ||| C" (rank classification)
    metadata        `!TemplateMetadata` (original_task, choices_in_prompt, metrics, ...)

Raw rows are first mapped to the HF `super_glue` / `anli` schema the templates expect
(`to_hf_schema`), e.g. CB label "entailment" -> 0. The seven P3 *training* datasets (`P3_TRAINING`:
rotten_tomatoes, dream, quail, cos_e, commonsense_qa, common_gen, glue/mrpc) come in upstream files that are not
one record per row (two text files, nested JSON, XML, a join of two files, a TSV): their readers build the HF rows
themselves, each checked once and located (file, line) in any `DataError`.

A template that renders an empty prompt or target for a row (e.g. a COPA template only for "effect"
questions) does not apply to it: P3 drops those, and so do we, counting them in the report. A template
that fails to render raises `DataError` with file, template, row and task.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox
import yaml

from .episodes import Example, Task
from .files import DataError, LoadReport, decode_text, handle, read_csv_rows, read_jsonl, shared_data_dir

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

    Raises KeyError/ValueError on a missing field or unknown label (the caller locates it). Rows of the P3
    training datasets are already in their HF schema (their readers build them) and pass through."""
    row = dict(row)
    if dataset in P3_TRAINING:
        return [row]
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


def default_split(dataset: str) -> str:
    """The split read when none is named: SuperGLUE 'val', a P3 training dataset its first split (the only one
    on disk for most); ANLI has no default (name the round, 'r1' or 'r2')."""
    if dataset in P3_TRAINING:
        return next(iter(P3_TRAINING[dataset]))
    if dataset == "anli":
        raise ValueError("anli has no default split: name the round, e.g. 'anli:r1' or 'anli:r2'")
    return "val"


def read_raw_rows(
    dataset: str,
    split: str | None = None,
    root: str | os.PathLike | None = None,
    report: LoadReport | None = None,
) -> list[tuple[str, int | None, dict]]:
    """(file, line, raw row) triples. SuperGLUE: `superglue/<Task>/<split>.jsonl`; ANLI: split 'r1'/'r2'
    reads `anli/ANLI_analysis_<split>_dev.csv` (line = the file line where the record starts, which is
    not the record number when a quoted field spans lines); the P3 training datasets: `P3_TRAINING`, rows in
    their HF schema. Bytes that are not UTF-8 or a file that does not parse raise `DataError` with the file and
    line; a bad row of a P3 training dataset does too, or, with `report`, is counted there and left out.
    `split` defaults to `default_split(dataset)`."""
    base = Path(root) if root is not None else shared_data_dir()
    split = split or default_split(dataset)
    if dataset in P3_TRAINING:
        return read_p3_training_rows(dataset, split, base, report)
    if dataset == "anli":
        path = base / "anli" / f"ANLI_analysis_{split}_dev.csv"
        return read_csv_records(path, task=dataset)
    if dataset not in SUPERGLUE_FOLDERS:
        known = ", ".join(["anli", *SUPERGLUE_FOLDERS, *P3_TRAINING])
        raise ValueError(f"unknown dataset {dataset!r}; known: {known}")
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


# ----------------------------------------------------------------------------- P3 training datasets (upstream files)

# dataset (its promptsource folder) -> split -> files under the data root; the first split is the default
P3_TRAINING: dict[str, dict[str, tuple[str, ...]]] = {
    "rotten_tomatoes": {
        split: ("p3/rotten_tomatoes/rt-polarity.pos", "p3/rotten_tomatoes/rt-polarity.neg")
        for split in ("train", "validation", "test")
    },
    "dream": {"validation": ("p3/dream/dev.json",), "test": ("p3/dream/test.json",)},
    "quail": {"validation": ("p3/quail/quail_1.3_dev.xml",), "challenge": ("p3/quail/quail_1.3_challenge.xml",)},
    "cos_e/v1.11": {
        "validation": ("p3/cos_e/v1.11/cose_dev_v1.11_processed.jsonl", "p3/commonsense_qa/validation.jsonl")
    },
    "cos_e/v1.0": {
        "validation": ("p3/cos_e/v1.0/cose_dev_v1.0_processed.jsonl", "p3/cos_e/v1.0/cqa_v1.0_dev_rand_split.jsonl")
    },
    "commonsense_qa": {"validation": ("p3/commonsense_qa/validation.jsonl",)},
    "common_gen": {"validation": ("p3/common_gen/commongen.dev.jsonl",)},
    "glue/mrpc": {"test": ("p3/mrpc/msr-para-test.tsv",)},
}
TOMATOES = "rotten_tomatoes"
ROTTEN_TOMATOES_CUTS = (0.8, 0.9)  # HF's train / validation / test: each file sliced in order 80 / 10 / 10
Located = tuple[str, int | None, dict]  # (file, line, row)


def read_p3_training_rows(dataset: str, split: str, base: Path, report: LoadReport | None = None) -> list[Located]:
    """HF-schema rows of one P3 training dataset's split, each with the file and line it came from."""
    splits = P3_TRAINING[dataset]
    if split not in splits:
        raise ValueError(f"{dataset} has no split {split!r}; known: {', '.join(splits)}")
    paths = [base / f for f in splits[split]]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{dataset}: no file {path}")
    if dataset == "rotten_tomatoes":
        return _rotten_tomatoes_rows(paths[0], paths[1], split, report)
    if dataset.startswith("cos_e/"):
        return _cos_e_rows(paths[0], paths[1], dataset, report)
    readers = {
        "dream": _dream_rows,
        "quail": _quail_rows,
        "commonsense_qa": _commonsense_qa_rows,
        "common_gen": _common_gen_rows,
        "glue/mrpc": _mrpc_rows,
    }
    return readers[dataset](paths[0], dataset, report)


def _checked(rows: list[Located], make, task: str, report: LoadReport | None) -> list[Located]:
    """Apply `make(row) -> list of HF rows` to located raw rows; a KeyError/ValueError/TypeError becomes a
    located DataError (raised, or counted in `report` and the row left out)."""
    out = []
    for f, line, raw in rows:
        try:
            out += [(f, line, r) for r in make(raw)]
        except KeyError as e:
            handle(DataError("missing field", file=f, line=line, field=str(e.args[0]), task=task), report)
        except (ValueError, TypeError) as e:
            reason = getattr(e, "reason", None) or "invalid"
            handle(DataError(str(e), file=f, line=line, task=task, reason=reason), report)
    return out


class _BadRow(ValueError):
    """A row that does not fit its dataset's schema; `reason` is the LoadReport tag."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


def _text(value, name: str) -> str:
    """`value` stripped, or `_BadRow` when it is not a non-empty string."""
    if not isinstance(value, str):
        raise _BadRow(f"field {name!r} must be a string, got {type(value).__name__}", "wrong_type")
    if not value.strip():
        raise _BadRow(f"field {name!r} is empty", "empty_input")
    return value.strip()


def _texts(value, name: str, n: int | None = None) -> list[str]:
    """A list of non-empty strings (exactly `n` of them if given), stripped."""
    if not isinstance(value, list):
        raise _BadRow(f"field {name!r} must be a list, got {type(value).__name__}", "wrong_type")
    if n is not None and len(value) != n:
        raise _BadRow(f"field {name!r} must hold {n} entries, got {len(value)}")
    return [_text(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _rotten_tomatoes_rows(pos: Path, neg: Path, split: str, report: LoadReport | None) -> list[Located]:
    """{text, label}: label 1 for `rt-polarity.pos`, 0 for `.neg`; Latin-1 lines, as HF decodes them. HF's splits
    are the files sliced in order 80 / 10 / 10 (4,265 / 533 / 533 lines of each 5,331)."""
    rows: list[Located] = []
    for path, label in ((pos, 1), (neg, 0)):
        # split on b"\n" only: str.splitlines would also split at \x85 (cp1252's ellipsis, in 31 of these lines)
        lines = [b.decode("latin-1") for b in path.read_bytes().split(b"\n")]
        lines = lines[:-1] if lines and not lines[-1] else lines
        train_end, validation_end = (math.ceil(c * len(lines)) for c in ROTTEN_TOMATOES_CUTS)
        bounds = {"train": (0, train_end), "validation": (train_end, validation_end), "test": (validation_end, None)}
        start, stop = bounds[split]
        located = [(str(path), start + i + 1, {"text": t, "label": label}) for i, t in enumerate(lines[start:stop])]
        rows += _checked(located, lambda r: [{"text": _text(r["text"], "text"), "label": r["label"]}], TOMATOES, report)
    return rows


_SPACE = re.compile(r"\s*")


def _json_list_items(path: Path, task: str) -> list[tuple[int, object]]:
    """(line where the item starts, item) for each item of a file holding one JSON list."""
    text = decode_text(path.read_bytes(), path, task=task)
    decoder = json.JSONDecoder()
    try:
        whole, _ = decoder.raw_decode(text, _SPACE.match(text).end())  # parse once: an error comes with its line
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", file=path, line=e.lineno, task=task, reason="bad_json") from e
    if not isinstance(whole, list):
        raise DataError("expected a JSON list", file=path, line=1, task=task, reason="bad_json")
    items, i = [], _SPACE.match(text, _SPACE.match(text).end() + 1).end()  # after "["
    line, counted = 1, 0  # line number at offset `counted`
    for _ in whole:  # walk the valid list again, item by item, for the line where each starts
        line, counted = line + text.count("\n", counted, i), i
        item, end = decoder.raw_decode(text, i)
        items.append((line, item))
        i = _SPACE.match(text, _SPACE.match(text, end).end() + 1).end()  # past the "," (or the closing "]")
    return items


def _dream_rows(path: Path, task: str, report: LoadReport | None) -> list[Located]:
    """HF `dream`: one row per question {dialogue_id, dialogue, question, choice, answer} from the upstream items
    [dialogue turns, [{question, choice[3], answer}], dialogue id]; the answer must be one of the choices."""

    def make(item) -> list[dict]:
        if not isinstance(item, list) or len(item) != 3:
            raise _BadRow("a DREAM item must be [turns, questions, dialogue id]", "wrong_type")
        turns, questions, dialogue_id = item
        dialogue = _texts(turns, "dialogue")
        if not isinstance(questions, list):
            raise _BadRow("the questions of a DREAM item must be a list", "wrong_type")
        rows = []
        for j, q in enumerate(questions):
            if not isinstance(q, dict):
                raise _BadRow(f"question {j} must be an object", "wrong_type")
            choice = _texts(q["choice"], f"questions[{j}].choice", 3)
            answer = _text(q["answer"], f"questions[{j}].answer")
            if answer not in choice:
                raise _BadRow(f"question {j}: answer {answer!r} is not one of its choices", "bad_label")
            question = _text(q["question"], f"questions[{j}].question")
            rows.append(
                {
                    "dialogue_id": str(dialogue_id),
                    "dialogue": dialogue,
                    "question": question,
                    "choice": choice,
                    "answer": answer,
                }
            )
        return rows

    return _checked([(str(path), line, item) for line, item in _json_list_items(path, task)], make, task, report)


def _quail_rows(path: Path, task: str, report: LoadReport | None) -> list[Located]:
    """HF `quail`: one row per `<q>` {id, context_id, question_id, domain, metadata, context, question,
    question_type, answers[4], correct_answer_id}; `line` is the line of the `<q>` tag. Exactly one `<a>` must be
    correct="True"."""
    text = decode_text(path.read_bytes(), path, task=task)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DataError(f"XML does not parse ({e})", file=path, line=e.position[0], task=task, reason="bad_xml") from e
    q_lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<q[\s>/]", text)]
    raw = []
    for story in root.iter("text"):
        meta = story.find("metadata")
        body = story.find("text_body")
        for q in story.iter("q"):
            raw.append({"story": story, "meta": meta, "body": body, "q": q})
    lines = q_lines if len(q_lines) == len(raw) else [None] * len(raw)

    def inner(node) -> str:
        return (node.text or "") if node is not None else ""

    def make(r) -> list[dict]:
        story, q = r["story"], r["q"]
        answers = [inner(a) for a in q.iter("a")]
        correct = [i for i, a in enumerate(q.iter("a")) if a.get("correct") == "True"]
        if len(correct) != 1:
            raise _BadRow(f"question {q.get('id')!r} needs exactly one correct answer, has {len(correct)}", "bad_label")
        context_id, question_id = story.get("id"), q.get("id")
        return [
            {
                "id": f"{context_id}_{question_id}",
                "context_id": context_id,
                "question_id": question_id,
                "domain": story.get("domain"),
                "metadata": {
                    k: inner(r["meta"].find(k) if r["meta"] is not None else None).strip()
                    for k in ("author", "title", "url")
                },
                "context": _text(inner(r["body"]), "text_body"),
                "question": _text(inner(q), "q"),
                "question_type": q.get("type"),
                "answers": _texts(answers, "a", 4),
                "correct_answer_id": correct[0],
            }
        ]

    return _checked([(str(path), line, r) for line, r in zip(lines, raw)], make, task, report)


def _cqa_fields(row: dict) -> tuple[str, list[str], str]:
    """(question, choice texts, answer text) of a CommonsenseQA row, in HF `tau/commonsense_qa`'s layout
    (question str, choices {label, text}) or the original one (question {stem, choices [{label, text}]})."""
    if isinstance(row["question"], dict):  # original CQA layout (the v1.0 file shipped with cos-e)
        labels = [c["label"] for c in row["question"]["choices"]]
        texts = [c["text"] for c in row["question"]["choices"]]
        question = row["question"]["stem"]
    else:
        labels, texts, question = row["choices"]["label"], row["choices"]["text"], row["question"]
    texts = _texts(texts, "choices.text", len(labels))
    if row["answerKey"] not in labels:
        raise _BadRow(f"answerKey {row['answerKey']!r} is not one of the labels {labels}", "bad_label")
    return _text(question, "question"), texts, texts[labels.index(row["answerKey"])]


def _commonsense_qa_rows(path: Path, task: str, report: LoadReport | None) -> list[Located]:
    """HF `commonsense_qa` rows (the file is already in that schema): id, question, question_concept,
    choices {label, text}, answerKey; the answerKey must be one of the labels."""

    def make(row: dict) -> list[dict]:
        question, texts, _ = _cqa_fields(row)
        labels = list(row["choices"]["label"])
        choices = {"label": labels, "text": texts}
        return [
            {
                "id": row["id"],
                "question": question,
                "question_concept": row["question_concept"],
                "choices": choices,
                "answerKey": row["answerKey"],
            }
        ]

    rows = [(str(path), line, r) for line, r in read_jsonl(path, task=task, report=report)]
    return _checked(rows, make, task, report)


def _cos_e_rows(explanations: Path, cqa: Path, task: str, report: LoadReport | None) -> list[Located]:
    """HF `cos_e`: explanation rows {id, explanation {open-ended, selected}} joined on id with their
    CommonsenseQA questions -> {id, question, choices, answer, abstractive_explanation, extractive_explanation}.
    An id without a question in `cqa` is a located error (reason `unmatched_id`)."""
    partner = {r.get("id"): r for _, r in read_jsonl(cqa, task=task)}

    def make(row: dict) -> list[dict]:
        if row["id"] not in partner:
            raise _BadRow(f"id {row['id']!r} has no question in {cqa}", "unmatched_id")
        question, choices, answer = _cqa_fields(partner[row["id"]])
        expl = row["explanation"]
        return [
            {
                "id": row["id"],
                "question": question,
                "choices": choices,
                "answer": answer,
                "abstractive_explanation": _text(expl["open-ended"], "explanation.open-ended"),
                "extractive_explanation": _text(expl["selected"], "explanation.selected"),
            }
        ]

    rows = [(str(explanations), line, r) for line, r in read_jsonl(explanations, task=task, report=report)]
    return _checked(rows, make, task, report)


def _common_gen_rows(path: Path, task: str, report: LoadReport | None) -> list[Located]:
    """HF `common_gen`: one row per scene {concept_set_idx, concepts, target}; concepts = `concept_set` split on
    '#' with the part-of-speech suffix (`_N`, `_V`) cut off."""
    located = [(str(path), line, r) for line, r in read_jsonl(path, task=task, report=report)]

    def make(row: dict) -> list[dict]:
        parts = _text(row["concept_set"], "concept_set").split("#")
        concepts = [_text(p.rsplit("_", 1)[0] if "_" in p else p, "concept_set") for p in parts]
        scenes = _texts(row["scene"], "scene")
        return [{"concept_set_idx": row["_index"], "concepts": concepts, "target": s} for s in scenes]

    indexed = [(f, line, {**r, "_index": i}) for i, (f, line, r) in enumerate(located)]
    return _checked(indexed, make, task, report)


MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def _mrpc_rows(path: Path, task: str, report: LoadReport | None) -> list[Located]:
    """HF `glue/mrpc` rows {sentence1, sentence2, label, idx} from the MSRP TSV (UTF-8 with BOM, no quoting:
    quote marks are text); label = Quality, 1 equivalent, 0 not equivalent."""
    text = decode_text(path.read_bytes(), path, task=task).removeprefix("\ufeff")
    records = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not records or records[0] != MRPC_HEADER:
        raise DataError(f"expected the header {MRPC_HEADER}", file=path, line=1, task=task, reason="bad_header")
    located = [(str(path), i + 1, {"fields": f, "idx": i - 1}) for i, f in enumerate(records) if i and f]

    def make(r: dict) -> list[dict]:
        fields = r["fields"]
        if len(fields) != len(MRPC_HEADER):
            raise _BadRow(f"expected {len(MRPC_HEADER)} tab-separated fields, got {len(fields)}", "wrong_type")
        if fields[0] not in ("0", "1"):
            raise _BadRow(f"Quality must be 0 or 1, got {fields[0]!r}", "bad_label")
        return [
            {
                "sentence1": _text(fields[3], "#1 String"),
                "sentence2": _text(fields[4], "#2 String"),
                "label": int(fields[0]),
                "idx": r["idx"],
            }
        ]

    return _checked(located, make, task, report)


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
    not apply to is counted in `report` (and in `task.meta['not_applicable']`). A row whose target is not among
    the choices the template rendered (rank classification could never pick it: promptsource's commonsense_qa
    `question_to_answer_index` offers A-D for answers A-E) is left out and counted the same way
    (`task.meta['target_not_in_choices']`, reason `target_not_in_choices`, with the first such row's place)."""
    name = f"{dataset.replace('/', '_')}__{template.name.replace(' ', '_')}"
    env = make_environment(random.Random(f"{seed}-{template.id}"))
    examples, not_applicable, not_a_choice, first_not_a_choice = [], 0, 0, ""
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
            if choices is not None and target not in choices:
                not_a_choice += 1
                first_not_a_choice = first_not_a_choice or f"{file}:{line}: target {target!r} not in {choices}"
                continue
            examples.append(Example(prompt, target, choices))
    if report is not None:
        report.loaded += len(examples)
        if not_applicable:
            report.skip(
                ValueError(f"task {name!r}: template does not apply to {not_applicable} rows (P3 drops them)"),
                reason="not_applicable",
                count=not_applicable,
            )
        if not_a_choice:
            report.skip(
                ValueError(
                    f"task {name!r}: {not_a_choice} rows have a target that is not an answer choice "
                    f"(first: {first_not_a_choice})"
                ),
                reason="target_not_in_choices",
                count=not_a_choice,
            )
        if not examples:
            report.empty_task(f"task {name!r}: no example left")
    meta = {
        "dataset": dataset,
        "template": template.name,
        "template_id": template.id,
        "original_task": template.original_task,
        "not_applicable": not_applicable,
        "target_not_in_choices": not_a_choice,
    }
    return Task(name, examples, None, family="p3", meta=meta)


def load_p3_tasks(
    dataset: str,
    split: str | None = None,
    root: str | os.PathLike | None = None,
    templates_root: str | os.PathLike | None = None,
    original_task_only: bool = True,
    seed: int = 0,
    report: LoadReport | None = None,
) -> list[Task]:
    """All P3 tasks of `dataset` (one per template; by default only templates of the original task, as in
    T0's held-out evaluation). `templates_root` defaults to `<root>/promptsource/templates`; `split` to
    `default_split(dataset)`. Rows dropped while reading (P3 training datasets) are counted once in `report`."""
    base = Path(root) if root is not None else shared_data_dir()
    templates = load_templates(
        "anli" if dataset == "anli" else dataset, templates_root or base / "promptsource" / "templates"
    )
    if original_task_only:
        templates = [t for t in templates if t.original_task]
    rows = read_raw_rows(dataset, split, base, report)
    return [build_p3_task(dataset, t, rows, seed, report) for t in templates]
