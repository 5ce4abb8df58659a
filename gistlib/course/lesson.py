"""What every lesson does first: threads and seed set, versions and device printed, a results dict started,
and the libraries' known noise (messages that mean nothing to a learner) silenced, each at its source."""

from __future__ import annotations

import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from gistlib.data.files import REPO_ROOT

__all__ = ["begin", "quiet_known_noise", "show_library_log", "tier_note"]

SMOKE_NOTE = (
    "*Smoke tier: the models here are random or a few training steps from it, so {what}. The smoke tier tests "
    'that the code runs; set `TIER = "pocket"` to see what the method does.*'
)


def quiet_known_noise() -> None:
    """Silence three messages that every lesson would show in red or as extra bars, though nothing is wrong.

    - bitsandbytes (imported by peft) logs at import, on a CPU with AVX-512 BF16, that it could not fetch an
      optional CPU kernel from the Hub (`pip install kernels`); it then uses its own, which is what we want.
    - peft 0.21's FutureWarning about `is_gradient_checkpointing` is filtered at its source
      (`gistlib.core.prefix.peft_wrap`); the filter here also covers peft calls a lesson makes itself.
    - transformers draws a progress bar per `save_pretrained` ("Writing model shards", one shard for a small model)
      and per load: a lesson that trains and caches several models would show a column of them. The training
      stages' own bars (gistlib.train.loop) stay, one per stage.
    """
    import transformers

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()


def show_library_log() -> None:
    """gistlib's own log records (e.g. "skipped: task 'cb': 1 of 24 exceed the budgets") as plain lines on stdout.

    Without a handler, Python prints a warning record on stderr, which a notebook draws as a red box, an error to a
    learner; these are notes about the data. Added once, however often a lesson runs `begin`."""
    log = logging.getLogger("gistlib")
    if not any(getattr(h, "_gistlib_lesson", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler._gistlib_lesson = True
        log.addHandler(handler)
        log.propagate = False


def tier_note(tier: str, what: str) -> None:
    """In the smoke tier, display a note that the numbers or answers above are meaningless, and why: `what` says
    which (e.g. "every answer is a guess"). Nothing in the other tiers."""
    if tier == "smoke":
        from IPython.display import Markdown, display

        display(Markdown(SMOKE_NOTE.format(what=what)))


def begin(tier: str, seed: int, threads: int = 0) -> tuple[Path, str, float, dict]:
    """Set torch's threads (0: leave them) and seed, print versions and device.

    Returns (ROOT, DEVICE, T0, RESULTS): the repository root (relative paths start there), "cuda" or "cpu",
    the start time, and the dict a lesson fills with the numbers its test reads."""
    quiet_known_noise()  # before peft (and with it bitsandbytes) is imported
    show_library_log()
    import matplotlib
    import peft
    import transformers

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} "
        f"| peft {peft.__version__} | matplotlib {matplotlib.__version__}"
    )
    gpu = f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""
    print(f"device {device}{gpu} | torch threads {torch.get_num_threads()} | tier {tier}")
    return REPO_ROOT, device, time.perf_counter(), {"tier": tier}
