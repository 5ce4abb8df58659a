"""What every lesson does first: threads and seed set, versions and device printed, a results dict started."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from gistlib.data.files import REPO_ROOT

__all__ = ["begin"]


def begin(tier: str, seed: int, threads: int = 0) -> tuple[Path, str, float, dict]:
    """Set torch's threads (0: leave them) and seed, print versions and device.

    Returns (ROOT, DEVICE, T0, RESULTS): the repository root (relative paths start there), "cuda" or "cpu",
    the start time, and the dict a lesson fills with the numbers its test reads."""
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
