"""Symbol tuning (Wei et al. 2023): in-context classification where labels are arbitrary symbols.

No data was released; episodes are built from any classification task. For every episode:
a fresh injective map label -> symbol (numbers, random letter strings, unrelated words; never a real
label word), no instruction, k exemplars per class, shuffled, then the query. Each example keeps the
episode's symbols as answer choices, so rank classification works as for P3.

Readers for the raw files in `<shared data>/classification/` turn them into `Task`s with real label words.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .csvfile import read_classes
from .episodes import Episode, Example, Task
from .files import DataError, LoadReport, decode_text, handle, read_jsonl, require_text, shared_data_dir

# unrelated words: common nouns/adjectives that are no label of any dataset here
UNRELATED_WORDS = [
    "apple",
    "river",
    "candle",
    "violin",
    "pepper",
    "marble",
    "tunnel",
    "falcon",
    "ladder",
    "cactus",
    "saddle",
    "button",
    "glacier",
    "lantern",
    "walnut",
    "pillow",
    "rocket",
    "meadow",
    "copper",
    "harbor",
    "pencil",
    "orbit",
    "velvet",
    "bucket",
    "thunder",
    "garlic",
    "kettle",
    "mirror",
    "zebra",
    "quartz",
]
TREC_LABELS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
SST2_LABELS = {"0": "negative", "1": "positive"}
CR_LABELS = {"0": "negative", "1": "positive"}  # label ids as in yaolu/ordered-prompt's config/cr.yaml
SUBJ_LABELS = {"0": "subjective", "1": "objective"}  # and config/subj.yaml


# ----------------------------------------------------------------------------- readers


def _classification_dir(root) -> Path:
    return Path(root) if root is not None else shared_data_dir() / "classification"


def _labelled_lines(path: Path, task: str, text: str, parse, expected: str, report: LoadReport | None) -> Task:
    """One example per non-blank line, `parse(line) -> (input, output)` or None for a bad line (DataError with
    the file and line, or counted in `report`)."""
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parsed = parse(line)
        if parsed is None:
            handle(DataError(f"expected {expected!r}, got {line[:40]!r}", file=path, line=lineno, task=task), report)
            continue
        examples.append(Example(*parsed))
    return _finish(Task(task, examples, family="classification"), report)


def read_sst2(split: str = "train", root: str | os.PathLike | None = None, report: LoadReport | None = None) -> Task:
    """SST-2 lines `<0/1> <sentence>` -> Task 'sst2' with outputs 'negative'/'positive'."""
    path = _classification_dir(root) / "sst2" / f"stsa.binary.{split}"

    def parse(line: str):
        label, _, text = line.partition(" ")
        return (text.strip(), SST2_LABELS[label]) if label in SST2_LABELS and text.strip() else None

    text = decode_text(path.read_bytes(), path, task="sst2")
    return _labelled_lines(path, "sst2", text, parse, "<0/1> <sentence>", report)


def read_trec(split: str = "train", root: str | os.PathLike | None = None, report: LoadReport | None = None) -> Task:
    """TREC lines `COARSE:fine question` -> Task 'trec' with the 6 coarse classes as words."""
    path = _classification_dir(root) / "trec" / f"{split}.txt"

    def parse(line: str):
        label, _, text = line.partition(" ")
        coarse = label.split(":")[0]
        return (text.strip(), TREC_LABELS[coarse]) if coarse in TREC_LABELS and text.strip() else None

    text = path.read_text(encoding="utf-8", errors="replace")
    return _labelled_lines(path, "trec", text, parse, "COARSE:fine question", report)


def read_nli_jsonl(path: str | os.PathLike, name: str, report: LoadReport | None = None) -> Task:
    """SuperGLUE-style NLI jsonl (CB, RTE): input 'Premise: ...\\nHypothesis: ...', output the label string."""
    examples = []
    for lineno, row in read_jsonl(path, task=name, report=report):
        missing = [k for k in ("premise", "hypothesis", "label") if k not in row]
        if missing:
            handle(DataError("missing field", file=path, line=lineno, field=missing[0], task=name), report)
            continue
        kinds = {"premise": (str,), "hypothesis": (str,), "label": (str, int)}
        bad = [k for k, ok in kinds.items() if not isinstance(row[k], ok) or isinstance(row[k], bool)]
        if bad:
            got = type(row[bad[0]]).__name__
            error = DataError(
                f"must be text, got {got}", file=path, line=lineno, field=bad[0], task=name, reason="wrong_type"
            )
            handle(error, report)
            continue
        empty = [k for k in ("premise", "hypothesis", "label") if not str(row[k]).strip()]
        if empty:
            reason = "empty_output" if empty[0] == "label" else "empty_input"
            handle(DataError("is empty", file=path, line=lineno, field=empty[0], task=name, reason=reason), report)
            continue
        examples.append(Example(f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}", str(row["label"])))
    return _finish(Task(name, examples, family="classification"), report)


def unquote_csv_field(text: str) -> tuple[str, bool]:
    """(text, changed): a field still wrapped in CSV quotes (`"a ""b"" c"`) -> `a "b" c`; other text as it is.

    The yaolu/ordered-prompt JSONL copies of CR and SUBJ kept LM-BFF's CSV quoting: 969 of CR's 2,000 sentences and
    1,339 of SUBJ's are wrapped in quotes, with the quote marks inside doubled."""
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1].replace('""', ""):
        return text[1:-1].replace('""', '"'), True
    return text, False


def read_sentence_jsonl(
    path: str | os.PathLike, name: str, labels: Mapping[str, str], report: LoadReport | None = None
) -> Task:
    """JSONL rows `{"sentence", "label"}` (label a string key of `labels`) -> Task `name`, outputs the label words.

    Sentences are stripped and unquoted (`unquote_csv_field`; how many: `task.meta["unquoted"]`). A row with a
    missing or non-string field, an empty sentence or an unknown label raises `DataError` with the file and line,
    or, with `report`, is counted there and left out."""
    examples, unquoted = [], 0
    for lineno, row in read_jsonl(path, task=name, report=report):
        where = {"file": path, "line": lineno, "task": name}
        try:
            sentence = require_text(row, "sentence", **where, empty="empty_input")
            label = require_text(row, "label", **where)
            if label not in labels:
                known = ", ".join(labels)
                raise DataError(f"unknown label {label!r} (known: {known})", field="label", **where, reason="bad_label")
        except DataError as e:
            handle(e, report)
            continue
        text, changed = unquote_csv_field(sentence.strip())
        unquoted += changed
        examples.append(Example(text, labels[label]))
    task = Task(name, examples, family="classification", meta={"source": str(path), "unquoted": unquoted})
    return _finish(task, report)


def read_cr(root: str | os.PathLike | None = None, report: LoadReport | None = None) -> Task:
    """CR (customer reviews, Hu & Liu 2004), test split: Task 'cr', outputs 'negative'/'positive'."""
    return read_sentence_jsonl(_classification_dir(root) / "cr" / "test.jsonl", "cr", CR_LABELS, report)


def read_subj(root: str | os.PathLike | None = None, report: LoadReport | None = None) -> Task:
    """SUBJ (Pang & Lee 2004), test split: Task 'subj', outputs 'subjective'/'objective'."""
    return read_sentence_jsonl(_classification_dir(root) / "subj" / "test.jsonl", "subj", SUBJ_LABELS, report)


def class_words(name: str) -> str:
    """A CamelCase class name as words, the way promptsource's dbpedia_14 answer choices spell them:
    'MeanOfTransportation' -> 'Mean Of Transportation'."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)


def read_dbpedia(root: str | os.PathLike | None = None, report: LoadReport | None = None) -> Task:
    """The 256-row DBpedia-14 sample (contents only, no titles): Task 'dbpedia', outputs the 14 class names of
    `classes.txt` as words (label "1" is the first line)."""
    base = _classification_dir(root) / "dbpedia"
    names = read_classes(base / "classes.txt")
    labels = {str(i): class_words(n) for i, n in enumerate(names, start=1)}
    return read_sentence_jsonl(base / "dev_subsample.jsonl", "dbpedia", labels, report)


def _finish(task: Task, report: LoadReport | None) -> Task:
    if report is not None:
        report.loaded += len(task.examples)
    return task


def classification_tasks(root: str | os.PathLike | None = None) -> list[Task]:
    """SST-2, TREC, CB and RTE training sets, CR and SUBJ test sets and the DBpedia sample as classification tasks
    with real label words."""
    base = _classification_dir(root)
    return [
        read_sst2("train", base),
        read_trec("train", base),
        read_nli_jsonl(base / "cb" / "train.jsonl", "cb"),
        read_nli_jsonl(base / "rte" / "train.jsonl", "rte"),
        read_cr(base),
        read_subj(base),
        read_dbpedia(base),
    ]


# ----------------------------------------------------------------------------- symbols


def _letter_string(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))


def draw_symbols(labels: Sequence[str], rng: random.Random) -> dict[str, str]:
    """A fresh injective map label -> symbol. Symbols are all of one kind, drawn per call:
    integers, random letter strings, or unrelated words; none equals any label (case-insensitively)."""
    forbidden = {label.lower() for label in labels}
    kind = rng.choice(["number", "letters", "word"])
    symbols: list[str] = []
    while len(symbols) < len(labels):
        if kind == "number":
            s = str(rng.randint(0, 99))
        elif kind == "letters":
            s = _letter_string(rng)
        else:
            s = rng.choice(UNRELATED_WORDS)
        if s.lower() not in forbidden and s not in symbols:
            symbols.append(s)
    return dict(zip(labels, symbols))


def symbol_episode(task: Task, k_per_class: int, num_queries: int, rng: random.Random) -> Episode:
    """One symbol-tuning episode: k shuffled exemplars per class and `num_queries` other examples as
    queries, all outputs replaced by a fresh symbol map; no definition. Choices = the episode's symbols."""
    by_label: dict[str, list[Example]] = {}
    for ex in task.examples:
        by_label.setdefault(ex.output, []).append(ex)
    labels = sorted(by_label)
    for label in labels:
        if len(by_label[label]) < k_per_class:
            raise ValueError(
                f"task {task.name!r}: label {label!r} has {len(by_label[label])} examples < k={k_per_class}"
            )
    mapping = draw_symbols(labels, rng)
    choices = [mapping[label] for label in labels]
    demos, used = [], set()
    for label in labels:
        for ex in rng.sample(by_label[label], k_per_class):
            demos.append(ex)
            used.add(id(ex))
    rng.shuffle(demos)
    pool = [ex for ex in task.examples if id(ex) not in used]
    if len(pool) < num_queries:
        raise ValueError(f"task {task.name!r}: not enough examples left for {num_queries} queries")
    queries = rng.sample(pool, num_queries)

    def relabel(ex: Example) -> Example:
        return Example(ex.input, mapping[ex.output], choices)

    return Episode(task.name, [relabel(e) for e in demos], [relabel(e) for e in queries], definition=None)


def symbol_episodes(
    tasks: Sequence[Task],
    k_per_class: int = 4,
    num_queries: int = 1,
    seed: int = 0,
    num_episodes: int | None = None,
) -> Iterator[Episode]:
    """A seeded stream of symbol-tuning episodes, tasks drawn uniformly."""
    rng = random.Random(seed)
    n = 0
    while num_episodes is None or n < num_episodes:
        yield symbol_episode(rng.choice(list(tasks)), k_per_class, num_queries, rng)
        n += 1
