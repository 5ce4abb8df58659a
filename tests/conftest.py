"""Shared fixtures: offline hub, tiny models built in-process, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test`: one worker per core) each worker gets its share of the cores, and so do the
# processes it starts (OMP_NUM_THREADS is what gistlib's runner and the notebook kernels read): workers that each
# spread over every core would wait on each other's threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    from gistlib.threads import usable_cores  # noqa: E402

    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 64
GIST_IDS = [60, 61, 62, 63]  # four distinct gist tokens at the top of a 64-token vocab
PAD = 0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models():
    """The same random tiny Llama (GQA: 4 query heads, 2 kv heads) under eager and sdpa attention."""
    from gistlib.models.tiny import build_tiny_llama

    return {impl: build_tiny_llama(vocab_size=VOCAB, attn_implementation=impl, seed=0) for impl in ("eager", "sdpa")}


def small_pocket_model(tokenizer, seed: int, **sizes):
    """A 2-layer Llama over a pocket tokenizer, init std 0.2 so random weights give varied scores."""
    from gistlib.models.tiny import build_tiny_llama

    settings = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    settings.update(initializer_range=0.2, **sizes)
    return build_tiny_llama(tokenizer=tokenizer, seed=seed, **settings)
