"""GPU check: HyperLlama training on a random Llama-2-7B (and 13B) shape in 4-bit nf4, no download.

    python benchmarks/gpu_check.py                 # full size: NEEDS A CUDA GPU (about 16+ GB for 7B)
    python benchmarks/gpu_check.py --tiny          # a tiny shape on the CPU in seconds (what CI runs)

What it does, per size (7b, then 13b if the free GPU memory exceeds the planner's estimate):
1. builds `LlamaForCausalLM` with the exact shape (7B: hidden 4096, 32 layers, 32 heads, MLP 11008,
   vocab 32000; 13B: 5120, 40, 40, 13824) under `accelerate.init_empty_weights` (no host memory), then
   fills it layer by layer on the device: each decoder linear becomes a `bnb.nn.Linear4bit` (nf4,
   double quantisation, bf16 compute) quantised from a random bf16 tensor made on the device;
   embeddings, lm_head and norms are random bf16 / ones. No fp32 copy of the weights ever exists.
2. prepares it like `gistlib.models.loading.load_llama` does (k-bit preparation: non-quantised weights to fp32,
   non-reentrant gradient checkpointing, everything frozen) and wraps it in `HyperLlama` (LoRA r8/a16 on all
   7 linears, 16 gist tokens);
3. runs `--steps` training steps (AdamW, bf16 autocast as `gistlib.train.loop.make_accelerator` does on a GPU,
   two-phase `loss_and_backward`) at batch 4, hypernetwork input 1024 tokens (incl. the 16 gists) and
   downstream input 384 tokens (loss on the last 64), after one warm-up step;
4. reports peak memory (`torch.cuda.max_memory_allocated`; on the CPU the tensor tracker of
   `gistlib.models.memory`), tokens/s (hypernetwork + downstream tokens) and `gistlib.models.memory.estimate_memory`
   for the same setting, and writes everything to `results/benchmarks/gpu_check.json`.

A hard internal timeout (`--timeout`, default 540 s) stops the run and still writes what was measured,
so the whole script finishes in under 10 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # the exact Llama-2 shapes (config.json of meta-llama/Llama-2-{7,13}b-hf)
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "13b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
    ),
}
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
GiB = 2**30


class Timeout(Exception):
    pass


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[size],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
        use_cache=False,
    )


def quantised_linear(in_f: int, out_f: int, device: torch.device, std: float = 0.02):
    """A `bnb.nn.Linear4bit` (nf4, double quant, bf16 compute) from a random bf16 weight made on `device`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta"
    )
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16, device=device) * std
    layer.weight = bnb.nn.Params4bit(
        w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
    ).to(device)  # .to() quantises
    del w
    return layer


def build_random_4bit_llama(size: str, device: torch.device, seed: int = 0):
    """The model of `size` with random weights, decoder linears in 4-bit, built without host copies."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(size)
    with init_empty_weights():  # parameters on the meta device; buffers (RoPE inv_freq) real
        model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        for block, names in LINEARS.items():
            parent = getattr(layer, block)
            for name in names:
                old = getattr(parent, name)
                setattr(parent, name, quantised_linear(old.in_features, old.out_features, device))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = torch.nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.bfloat16, device=device))
    model.model.norm.weight = torch.nn.Parameter(torch.ones(cfg.hidden_size, dtype=torch.bfloat16, device=device))
    for emb in (model.model.embed_tokens, model.lm_head):
        emb.weight = torch.nn.Parameter(torch.randn(emb.weight.shape, dtype=torch.bfloat16, device=device) * 0.02)
    model.to(device)  # buffers; every parameter is already there
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=nf4) sets; peft reads it
    model.config.quantization_config = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    return model.eval()


def random_batch(
    cfg,
    batch: int,
    hyper_len: int,
    down_len: int,
    gist_ids: list[int],
    answer_len: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """hypernetwork rows [BOS] random... G_1..G_k and downstream rows [BOS] random..., loss on the last tokens."""
    g = torch.Generator().manual_seed(seed)
    k = len(gist_ids)
    h = torch.randint(3, cfg.vocab_size, (batch, hyper_len), generator=g)
    h[:, 0] = cfg.bos_token_id
    h[:, -k:] = torch.tensor(gist_ids)
    d = torch.randint(3, cfg.vocab_size, (batch, down_len), generator=g)
    d[:, 0] = cfg.bos_token_id
    labels = torch.full_like(d, -100)
    labels[:, -answer_len:] = d[:, -answer_len:]
    out = {
        "hyper_input_ids": h,
        "hyper_attention_mask": torch.ones_like(h),
        "input_ids": d,
        "attention_mask": torch.ones_like(d),
        "labels": labels,
    }
    return {n: t.to(device) for n, t in out.items()}


def check_size(size: str, args, device: torch.device, deadline: float) -> dict:
    from gistlib.core.hyper import HyperConfig, HyperLlama
    from gistlib.models.loading import is_frozen, prepare_for_training
    from gistlib.models.memory import ModelShape, estimate_memory, measure_peak_bytes

    cuda = device.type == "cuda"
    res: dict = {
        "size": size,
        "shape": SHAPES[size],
        "batch": args.batch,
        "hyper_len": args.hyper_len,
        "down_len": args.down_len,
        "num_gist_tokens": args.gists,
        "lora_rank": 8,
        "steps": args.steps,
    }
    cfg = llama_config(size)
    est = estimate_memory(
        ModelShape.from_config(cfg, size),
        "nf4",
        lora_rank=8,
        num_gist_tokens=args.gists,
        batch_size=args.batch,
        hyper_len=args.hyper_len,
        down_len=args.down_len,
        gradient_checkpointing=True,
    )
    res["estimate_gib"] = {k: round(v, 3) for k, v in est.gib().items()}
    res["estimate_bytes"] = {
        **{k: int(v) for k, v in est.__dict__.items() if isinstance(v, (int, float))},
        "total": int(est.total),
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        res["gpu_free_gib_before"] = round(free / GiB, 2)
        if est.total > 0.95 * free:
            res["skipped"] = f"planner estimate {est.total / GiB:.1f} GiB > free {free / GiB:.1f} GiB"
            return res
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    base = build_random_4bit_llama(size, device)
    base = prepare_for_training(base, quantized=True, gradient_checkpointing=True)
    if cuda:
        torch.cuda.synchronize()
        res["weights_gib"] = round(torch.cuda.memory_allocated() / GiB, 3)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    gist_ids = list(range(cfg.vocab_size, cfg.vocab_size + args.gists))  # outside the vocabulary: own table
    hyper = HyperLlama(base, gist_ids, HyperConfig(num_gist_tokens=args.gists))
    hyper.train()
    params = [p for p in hyper.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = random_batch(cfg, args.batch, args.hyper_len, args.down_len, gist_ids, args.answer_len, device)
    tokens = int(batch["hyper_attention_mask"].sum() + batch["attention_mask"].sum())
    before = {n: p.detach().clone() for n, p in hyper.base.named_parameters() if "lora_" not in n} if not cuda else None

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda or args.cpu_bf16):
            loss = hyper.loss_and_backward(**batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    losses = [step()]  # warm-up (kernels, allocator, optimizer state)
    if cuda:
        torch.cuda.synchronize()
    peak_cpu = 0
    if not cuda:  # one step under the tensor tracker (slow: it sees every op), not timed
        box: list[float] = []
        peak_cpu = measure_peak_bytes(lambda: box.append(step()))
        losses.append(box[0])
    times = []
    for _ in range(args.steps):
        if time.monotonic() > deadline:
            res["stopped_early"] = "time budget"
            break
        t = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    res["losses"] = [round(x, 4) for x in losses]
    res["s_per_step"] = round(sum(times) / max(len(times), 1), 4) if times else None
    res["tokens_per_step"] = tokens
    res["tokens_per_s"] = round(tokens / res["s_per_step"], 1) if times else None
    if cuda:
        res["peak_bytes"] = torch.cuda.max_memory_allocated()
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GiB, 3)
        res["device"] = torch.cuda.get_device_name()
    else:
        # the tracker sees what the step allocates; weights, adapters and optimizer state exist before it
        held = sum(p.numel() * p.element_size() for p in hyper.parameters()) + sum(
            b.numel() * b.element_size() for b in hyper.buffers()
        )
        res["step_peak_bytes"] = peak_cpu
        res["peak_bytes"] = peak_cpu + held
        res["peak_gib"] = round((peak_cpu + held) / GiB, 6)
        res["device"] = f"cpu ({platform.processor() or platform.machine()})"
        after = {n: p.detach() for n, p in hyper.base.named_parameters() if "lora_" not in n}
        res["base_unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
    res["base_frozen"] = is_frozen(base) or all(
        ("lora_" in n) for n, p in hyper.base.named_parameters() if p.requires_grad
    )
    # the planner adds a constant runtime overhead (CUDA context, allocator slack): compare with and without it
    res["estimate_over_measured"] = round(est.total / res["peak_bytes"], 3)
    res["estimate_without_overhead_over_measured"] = round((est.total - est.overhead) / res["peak_bytes"], 3)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (seconds); otherwise 7b and 13b on CUDA")
    p.add_argument("--sizes", default=None, help="comma list of 7b,13b,tiny (default: 7b,13b; tiny with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 5; 2 with --tiny)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--hyper-len", type=int, default=None, help="hypernetwork input tokens incl. gists (1024)")
    p.add_argument("--down-len", type=int, default=None, help="downstream input tokens (384)")
    p.add_argument("--answer-len", type=int, default=None, help="labelled downstream tokens (64)")
    p.add_argument("--gists", type=int, default=None, help="gist tokens k (16)")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU too")
    p.add_argument("--timeout", type=float, default=540.0, help="hard limit in seconds for the whole run")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "gpu_check.json"))
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(
        steps=2 if tiny else 5,
        batch=2 if tiny else 4,
        hyper_len=48 if tiny else 1024,
        down_len=24 if tiny else 384,
        answer_len=8 if tiny else 64,
        gists=4 if tiny else 16,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sizes = (args.sizes or ("tiny" if tiny else "7b,13b")).split(",")
    cuda = torch.cuda.is_available() and not tiny
    if not tiny and not cuda:
        raise SystemExit("benchmarks/gpu_check.py: the full-size check needs a CUDA GPU; use --tiny on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    start = time.monotonic()
    deadline = start + args.timeout - 30  # leave time to finish a step and write the JSON
    report = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "timeout_s": args.timeout,
        "sizes": {},
    }
    try:
        import bitsandbytes
        import transformers

        report.update(bitsandbytes=bitsandbytes.__version__, transformers=transformers.__version__)
    except ImportError:
        pass

    def on_alarm(signum, frame):
        raise Timeout(f"hard timeout after {args.timeout:.0f} s")

    finished = threading.Event()

    def watchdog():  # a kernel that never returns cannot be interrupted by a signal: exit the process
        if not finished.wait(args.timeout + 20):
            _write(report, args.out, note="killed by watchdog")
            os._exit(124)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.timeout))
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for size in sizes:
            if time.monotonic() > deadline:
                report["sizes"][size] = {"skipped": "time budget used up"}
                continue
            try:
                report["sizes"][size] = check_size(size, args, device, deadline)
                gc.collect()  # the model of this size is gone with check_size's frame
                if cuda:
                    torch.cuda.empty_cache()
            except torch.OutOfMemoryError as e:
                report["sizes"][size] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps({size: report["sizes"][size]}, indent=1), flush=True)
    except Timeout as e:
        report["timeout"] = str(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        finished.set()
        report["wall_s"] = round(time.monotonic() - start, 1)
        _write(report, args.out)
    return report


def _write(report: dict, out: str, note: str | None = None) -> None:
    if note:
        report["note"] = note
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
