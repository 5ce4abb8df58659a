"""Shared bits of the benchmark scripts: the pocket model, side-by-side timing, FLOPs, tables, JSON.

Timing rule: methods that are compared are timed *interleaved* (A B C A B C ...), each sample a few
calls long, and the median of the samples is kept, so background load hits all of them alike.
Ratios measured this way are what the scripts report; absolute times depend on the machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "benchmarks"
BENCH = REPO / "results" / "bench"  # the gist-vs-prompt-cache and thread benchmarks (issue 16)

# The pocket model of DESIGN 5b (about 1M parameters); random weights are fine for timing.
POCKET = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512}


def setup(threads: int | None = None) -> dict:
    """Fix threads and seeds; return a description of the machine for the JSON.

    One torch thread by default (`BENCH_THREADS` overrides): on a small machine shared with other
    jobs, two threads oversubscribe the cores and the spin-waiting threads make timings swing by 5x.
    """
    threads = threads or int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def pocket_model(vocab_size: int = 512, seed: int = 0, attn_implementation: str = "sdpa"):
    from gistlib.models.tiny import build_tiny_llama

    return build_tiny_llama(vocab_size=vocab_size, seed=seed, attn_implementation=attn_implementation, **POCKET)


def time_side_by_side(
    fns: dict[str, Callable[[], object]], repeats: int = 7, target_s: float = 0.03
) -> dict[str, float]:
    """Median seconds per call of each function, sampled interleaved.

    Each function is warmed up twice, then called `number` times per sample (enough for ~target_s).
    """
    number = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        number[name] = max(1, min(50, int(target_s / max(one, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(number[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / number[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def forward_flops(
    cfg,
    new_tokens: int,
    past_tokens: int = 0,
    logits_tokens: int | None = None,
    lora_rank: int = 0,
    backward: str = "none",
) -> float:
    """FLOPs of one row's forward pass computed from the shapes (multiply-add = 2 FLOPs).

    new_tokens run over `past_tokens` cached keys under a causal mask (only the keys a token may see
    are counted). LM head on `logits_tokens` (default: all new tokens). lora_rank > 0 adds LoRA on all
    7 linear maps. backward: "none"; "full" (x3: weight and input gradients); "frozen" (x2 for frozen
    weights: input gradients only, plus the LoRA weights' gradients).
    """
    d, ff, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    n_layers = cfg.num_hidden_layers
    linear_params = d * d + 2 * d * kv + d * d + 3 * d * ff  # q, k, v, o, gate, up, down
    lora_params = lora_rank * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + ff) + (ff + d)) if lora_rank else 0
    keys_seen = new_tokens * past_tokens + new_tokens * (new_tokens + 1) / 2
    attn = 2 * 2 * cfg.num_attention_heads * hd * keys_seen  # QK^T and PV
    logits_tokens = new_tokens if logits_tokens is None else logits_tokens
    per_layer_linear = 2 * (linear_params + lora_params) * new_tokens
    fwd = n_layers * (per_layer_linear + attn) + 2 * d * V * logits_tokens
    if backward == "none":
        return fwd
    if backward == "full":
        return 3 * fwd
    if backward == "frozen":  # input grads everywhere (x1), weight grads only for LoRA
        lora_w = n_layers * 2 * lora_params * new_tokens
        return 2 * fwd + lora_w
    raise ValueError(backward)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str) -> str:
    """rows: dicts; columns: (key, header, format). Prints and returns the table as text."""
    cells = [
        [
            format(r[k], f)
            if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
            else str(r.get(k, ""))
            for k, _, f in columns
        ]
        for r in rows
    ]
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def time_paired(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one call of each function, for slow calls: `warmup` calls each, then `repeats`
    rounds A B C A B C ..., so that background load hits every function alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def write_json(name: str, payload: dict, folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(REPO)}")
    return path


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"
