"""Checking dataclass configs: a bad value is an error that names the field and where it is documented."""

from __future__ import annotations

import inspect


def check_fields(config: object, checks: dict[str, bool]) -> None:
    """Raise ValueError for the first field whose check is False, e.g.
    `TrainConfig.lr = -1.0 is out of range (see the comment on `lr` in gistlib/train.py)`."""
    cls = type(config)
    source = inspect.getsourcefile(cls) or cls.__module__
    where = "gistlib/" + source.split("gistlib/")[-1] if "gistlib/" in source else source
    for name, ok in checks.items():
        if not ok:
            raise ValueError(
                f"{cls.__name__}.{name} = {getattr(config, name)!r} is out of range "
                f"(see the comment on `{name}` in {where})"
            )
