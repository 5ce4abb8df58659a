"""The optional hub-kernel lookup of bitsandbytes stays out of stderr; every other record of its loggers passes."""

import logging
import os
import subprocess
import sys

from gistlib._quiet import HUB_KERNEL_NOISE, quiet_hub_kernel_lookup


def test_only_the_hub_kernel_lines_are_dropped(caplog):
    quiet_hub_kernel_lookup()
    quiet_hub_kernel_lookup()  # twice: still one filter per logger
    assert all(len(logging.getLogger(name).filters) == 1 for name, _ in HUB_KERNEL_NOISE)
    with caplog.at_level(logging.WARNING):
        for name, prefix in HUB_KERNEL_NOISE:
            logging.getLogger(name).warning(prefix + ": %s", "offline")
            logging.getLogger(name).warning("another warning of %s", name)
    assert [r.getMessage() for r in caplog.records] == [f"another warning of {n}" for n, _ in HUB_KERNEL_NOISE]


def test_importing_gistlib_then_peft_offline_prints_neither_line():
    """What a lesson does first; on a CPU without AVX512-BF16 bitsandbytes makes no lookup and this holds anyway."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "import gistlib, peft\ntry:\n    import bitsandbytes\nexcept ImportError:\n    pass\n"
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert not [p for _, p in HUB_KERNEL_NOISE if p.split("'")[0] in err], err
