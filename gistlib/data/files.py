"""Where the real data lives, how bad input is reported, and a line-numbered JSONL reader.

Two rules hold for every loader in `gistlib.data`:

- A file that does not parse, a missing field, a template that fails to render raises `DataError`,
  whose message names the file, the line (or field) and the task.
- A caller that prefers to skip bad rows passes a `LoadReport`; each skipped row is then counted,
  its reason recorded and logged, so no row vanishes silently.
"""

from __future__ import annotations

import json
import logging
import os
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
    """Bad input, located: `DataError("missing field", file=..., line=..., field=..., task=...)`."""

    def __init__(
        self,
        message: str,
        file: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
        task: str | None = None,
    ):
        self.file, self.line, self.field, self.task = file, line, field, task
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
    """Counts what a loader kept and what it skipped (with the reason and location of each skip)."""

    loaded: int = 0
    skipped: list[str] = field(default_factory=list)

    def skip(self, error: Exception) -> None:
        self.skipped.append(str(error))
        log.warning("skipped: %s", error)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        return f"loaded {self.loaded}, skipped {self.num_skipped}"


def handle(error: DataError, report: LoadReport | None) -> None:
    """Raise `error`, or record it in `report` when the caller asked to skip bad rows."""
    if report is None:
        raise error
    report.skip(error)


def read_jsonl(
    path: str | os.PathLike, task: str | None = None, report: LoadReport | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` for each non-blank line (1-based line numbers).

    A line that is not a JSON object raises `DataError` with the file and line, or, with `report`,
    is counted there as skipped and reading goes on.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                handle(DataError(f"not valid JSON ({e.msg})", file=path, line=lineno, task=task), report)
                continue
            if not isinstance(row, dict):
                handle(DataError("a JSONL row must be an object", file=path, line=lineno, task=task), report)
                continue
            yield lineno, row


def require(row: dict, key: str, *, file=None, line=None, task=None, prefix: str = ""):
    """`row[key]`, or a `DataError` naming the missing field."""
    if not isinstance(row, dict) or key not in row:
        raise DataError("missing field", file=file, line=line, field=prefix + key, task=task)
    return row[key]
