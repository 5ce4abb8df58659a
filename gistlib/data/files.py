"""Where the real data lives, how bad input is reported, and a line-numbered JSONL reader.

Two rules hold for every loader in `gistlib.data`:

- A file that does not parse, a missing field, a template that fails to render raises `DataError`,
  whose message names the file, the line (or field) and the task.
- A caller that prefers to skip bad rows passes a `LoadReport`; each skipped row is then counted,
  its reason recorded and logged, so no row vanishes silently.

Bytes that are not UTF-8, a field of the wrong type and an empty input or output are bad input too:
`DataError` with the file and the real line of the file (`decode_text`, `read_jsonl`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("gistlib.data")

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV_VAR = "GISTLIB_DATA"


def shared_data_dir() -> Path:
    """The folder of real public data: `$GISTLIB_DATA`, else `../shared/data` next to the repo root."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


class DataError(ValueError):
    """Bad input, located: `DataError("missing field", file=..., line=..., field=..., task=...)`.

    `reason` is a short tag (`not_utf8`, `bad_json`, `missing_field`, `wrong_type`, `empty_input`,
    `empty_output`, `bad_label`, `no_examples`, ...) that `LoadReport` counts skips by."""

    def __init__(
        self,
        message: str,
        file: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
        task: str | None = None,
        reason: str | None = None,
    ):
        self.file, self.line, self.field, self.task = file, line, field, task
        self.reason = reason or ("missing_field" if message == "missing field" else "invalid")
        where = []
        if file is not None:
            where.append(f"{file}" + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field {field!r}")
        if task is not None:
            where.append(f"task {task!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass
class LoadReport:
    """Counts what a loader kept and what it skipped (with the reason and location of each skip).

    `skipped` holds one message per skip; `by_reason` counts the skipped records per reason tag
    (a single message may stand for several records, e.g. P3's rows a template does not apply to)."""

    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)
    empty_tasks: list[str] = field(default_factory=list)  # tasks left with no example (counted as no_examples)

    def skip(self, error: Exception, reason: str | None = None, count: int = 1) -> None:
        self.skipped.append(str(error))
        self.by_reason[reason or getattr(error, "reason", None) or type(error).__name__] += count
        log.warning("skipped: %s", error)

    def empty_task(self, message: str) -> None:
        """Record a task that has no example left (its rows are already counted as loaded or skipped)."""
        self.empty_tasks.append(message)
        self.by_reason["no_examples"] += 1
        log.warning("empty task: %s", message)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items()))
        return f"loaded {self.loaded}, skipped {self.num_skipped}" + (f" ({reasons})" if reasons else "")


def handle(error: DataError, report: LoadReport | None) -> None:
    """Raise `error`, or record it in `report` when the caller asked to skip bad rows."""
    if report is None:
        raise error
    report.skip(error)


def _utf8_error(data: bytes, error: UnicodeDecodeError, path, task=None, line_offset: int = 0) -> DataError:
    """A located `DataError` for bytes that are not UTF-8: the real line (1-based) and byte column."""
    line = data.count(b"\n", 0, error.start) + 1 + line_offset
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    bad = data[error.start : error.end].hex(" ")
    return DataError(
        f"not valid UTF-8 (byte(s) {bad} at column {column})", file=path, line=line, task=task, reason="not_utf8"
    )


def decode_text(data: bytes, path, task: str | None = None) -> str:
    """`data` decoded as UTF-8 (exactly `path.read_text(encoding="utf-8")`), or a `DataError` naming
    the file and line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(data, e, path, task) from None


def read_csv_rows(path: str | os.PathLike, task: str | None = None) -> list[tuple[int, list[str]]]:
    """(line where the record starts, fields) for every non-blank record of a CSV file (quoted newlines kept
    inside their record); a decoding or parse error is a DataError with the file and that line."""
    reader = csv.reader(io.StringIO(decode_text(Path(path).read_bytes(), path, task=task), newline=""))
    out, end = [], 0
    while True:
        start = end + 1
        try:
            fields = next(reader, None)
        except csv.Error as e:
            raise DataError(f"CSV does not parse ({e})", file=path, line=start, task=task, reason="bad_csv") from e
        end = reader.line_num
        if fields is None:
            return out
        if fields:  # blank lines carry no record
            out.append((start, fields))


def read_jsonl(
    path: str | os.PathLike, task: str | None = None, report: LoadReport | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` for each non-blank line (1-based line numbers).

    A line that is not UTF-8 or not a JSON object raises `DataError` with the file and line, or, with
    `report`, is counted there as skipped and reading goes on.
    """
    # surrogateescape: lines split exactly as a plain UTF-8 read would, undecodable bytes are kept
    # (as lone surrogates, which valid UTF-8 never yields) so they are found per line
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                raw = line.encode("utf-8", errors="surrogateescape")
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    handle(_utf8_error(raw, e, path, task, line_offset=lineno - 1), report)
                    continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                handle(
                    DataError(f"not valid JSON ({e.msg})", file=path, line=lineno, task=task, reason="bad_json"), report
                )
                continue
            if not isinstance(row, dict):
                handle(
                    DataError("a JSONL row must be an object", file=path, line=lineno, task=task, reason="wrong_type"),
                    report,
                )
                continue
            yield lineno, row


def require(row: dict, key: str, *, file=None, line=None, task=None, prefix: str = ""):
    """`row[key]`, or a `DataError` naming the missing field."""
    if not isinstance(row, dict) or key not in row:
        raise DataError("missing field", file=file, line=line, field=prefix + key, task=task)
    return row[key]


def require_text(row: dict, key: str, *, file=None, line=None, task=None, prefix: str = "", empty: str = "") -> str:
    """`row[key]` as a string: a `DataError` when missing, not a string, or (with `empty`, the reason
    tag to use) blank."""
    value = require(row, key, file=file, line=line, task=task, prefix=prefix)
    if not isinstance(value, str):
        raise DataError(
            f"must be a string, got {type(value).__name__}",
            file=file,
            line=line,
            field=prefix + key,
            task=task,
            reason="wrong_type",
        )
    if empty and not value.strip():
        raise DataError("is empty", file=file, line=line, field=prefix + key, task=task, reason=empty)
    return value
