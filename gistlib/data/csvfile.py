"""CSV classification files in the AG News layout (Zhang et al. 2015; also DBpedia, Yelp, Yahoo):

    train.csv     "3","Wall St. Bears Claw Back","Reuters - Short-sellers, ..."   (no header)
    classes.txt   World / Sports / Business / Sci/Tech, one class name per line

Column `label_column` holds the class index, 1-based into classes.txt; the other columns (or
`text_columns`) are the text, stripped and joined with a space. The result is a `Task` like the other
classification readers (`gistlib.data.symbol.read_sst2`, `read_trec`, `read_nli_jsonl`): inputs the
text, outputs the class name, family "classification".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .episodes import Example, Task
from .files import DataError, LoadReport, decode_text, handle, read_csv_rows, shared_data_dir

__all__ = ["read_classes", "read_csv_classification", "read_ag_news"]


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names, one per non-blank line; an empty or duplicated name raises `DataError`."""
    names = []
    for lineno, line in enumerate(decode_text(Path(path).read_bytes(), path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise DataError(f"class {name!r} is listed twice", file=path, line=lineno, reason="bad_label")
        names.append(name)
    if not names:
        raise DataError("no class names", file=path, reason="bad_label")
    return names


def read_csv_classification(
    path: str | os.PathLike,
    classes: str | os.PathLike | Sequence[str],
    name: str | None = None,
    label_column: int = 0,
    text_columns: Sequence[int] | None = None,
    header: bool = False,
    report: LoadReport | None = None,
) -> Task:
    """A CSV of `label index, text, ...` rows -> Task `name` (default: the CSV's folder name).

    classes: the classes file (one name per line) or the names themselves; label index i (1-based)
    means `classes[i - 1]`. text_columns: the columns to join (default: every column but the label).
    A bad label index, a missing column or an empty text raises `DataError` with the file and line
    (the line where the record starts), or, with `report`, is skipped and counted there."""
    path = Path(path)
    name = name or path.parent.name
    labels = read_classes(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
    records = read_csv_rows(path, name)
    examples = []
    for start, row in records[1:] if header else records:
        try:
            examples.append(_example(row, labels, label_column, text_columns, path, start, name))
        except DataError as e:
            handle(e, report)
    if report is not None:
        report.loaded += len(examples)
    return Task(name, examples, family="classification", meta={"source": str(path), "classes": labels})


def _example(row, labels, label_column, text_columns, path, line, name) -> Example:
    where = {"file": path, "line": line, "task": name}
    cols = list(text_columns) if text_columns is not None else [i for i in range(len(row)) if i != label_column]
    if max([label_column, *cols]) >= len(row):
        raise DataError(f"expected at least {max([label_column, *cols]) + 1} columns, got {len(row)}", **where)
    raw = row[label_column].strip()
    if not raw.isdigit() or not 1 <= int(raw) <= len(labels):
        raise DataError(
            f"label index {raw!r} is not a class number 1..{len(labels)}",
            field=f"column {label_column}",
            **where,
            reason="bad_label",
        )
    text = " ".join(row[i].strip() for i in cols if row[i].strip())
    if not text:
        raise DataError("the text is empty", reason="empty_input", **where)
    return Example(text, labels[int(raw) - 1])


def read_ag_news(split: str = "train", root: str | os.PathLike | None = None, report: LoadReport | None = None) -> Task:
    """AG News `<classification>/ag_news/{split}.csv` with `classes.txt` -> Task 'ag_news' (title and
    description joined)."""
    base = (Path(root) if root is not None else shared_data_dir() / "classification") / "ag_news"
    return read_csv_classification(base / f"{split}.csv", base / "classes.txt", "ag_news", report=report)
