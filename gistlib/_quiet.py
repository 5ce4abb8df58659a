"""Two log lines that say nothing to a gistlib user, filtered out (every other record of their loggers passes).

On a CPU with AVX512-BF16, importing bitsandbytes (PEFT does, whenever it is installed: the `gpu` extra) looks up an
optional faster 4-bit CPU kernel on the Hugging Face Hub through `kernels`. Offline (HF_HUB_OFFLINE=1, as here) or
without a network that lookup cannot succeed, bitsandbytes falls back to its own kernel, and two warnings reach
stderr: a red box in every lesson and noise at the top of every run.
"""

from __future__ import annotations

import logging

__all__ = ["HUB_KERNEL_NOISE", "quiet_hub_kernel_lookup"]

# (logger, the start of the message it drops)
HUB_KERNEL_NOISE = (
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropPrefix(logging.Filter):
    """Drops records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_hub_kernel_lookup() -> None:
    """Install the filters (once per logger; `import gistlib` does this before anything imports bitsandbytes)."""
    for name, prefix in HUB_KERNEL_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
