# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: language_info,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   language_info:
#     codemirror_mode:
#       name: ipython
#       version: 3
#     file_extension: .py
#     mimetype: text/x-python
#     name: python
#     nbconvert_exporter: python
#     pygments_lexer: ipython3
#     version: '3.11'
# ---

# %% [markdown]
# # 7. Llama-2 in 4-bit on a consumer GPU
#
# Goal: run the same HyperLlama code on a real checkpoint. Llama-2-7B in 4-bit NF4 (double quantisation,
# bfloat16 compute) with LoRA, gradient checkpointing and the two-phase backward fits one 16-24 GB GPU.
# First the memory planner says what fits where; then the course's experiment runner (`run_experiment`, what
# `python -m gistlib run configs/symbol.json` calls) trains and evaluates every method on real data (P3,
# Super-NaturalInstructions or Symbol Tuning: configs/p3.json, sni.json, symbol.json). **In the smoke and pocket
# tiers this notebook runs the identical code on a tiny random Llama quantised to 4-bit on the CPU**
# (`tiny_experiment`, as `python -m gistlib run configs/symbol.json --tiny`; bitsandbytes runs 4-bit on a CPU):
# the numbers then test the plumbing, not the method. Set `TIER = "llama2"` on a GPU for the real run.

# %% tags=["parameters"]
TIER: str = "pocket"  # smoke | pocket: a tiny 4-bit model on the CPU; llama2: MODEL on a GPU
SEED: int = 0
MODEL: str = "meta-llama/Llama-2-7b-hf"  # llama2 tier: any Llama-architecture checkpoint (name or folder)
RECIPE: str = "symbol"  # p3 | sni | symbol: the real-data config configs/RECIPE.json
# OVERRIDES: "section.field=value" strings applied last (smoke/pocket: to the tiny experiment),
# e.g. ["train.hyper_steps=100", "methods.enabled=[\"zero_shot\",\"icl\",\"hyperllama\"]"]
OVERRIDES: list = []  # config changes (printed below with the values the lesson uses)
RUN_DIR: str = "runs"  # models and results under RUN_DIR/TIER/lesson07-RECIPE
THREADS: int = 0  # torch threads (0: leave as is)
RESULTS_PATH: str = "results/notebooks/07.json"

# %%
# versions and device
# %matplotlib inline
import json
import time
from pathlib import Path

import torch

from gistlib.course.lesson import begin

ROOT, DEVICE, T0, RESULTS = begin(TIER, SEED, THREADS)  # the repository root, "cuda" or "cpu", the start time

# %% [markdown]
# ## Memory planning
# Estimated peak memory of one training step (hypernetwork pass over 1,024 tokens plus a downstream pass
# over 384, k = 16, LoRA r = 8), in GiB, and which cards it fits. Formulas in `gistlib/memory.py`; they are
# checked against measured tensor bytes in the tests.

# %%
from IPython.display import Markdown, display

from gistlib.models.memory import LLAMA2_7B, LLAMA2_13B, estimate_memory, planner_table

display(Markdown(planner_table([LLAMA2_7B, LLAMA2_13B])))
est = estimate_memory(LLAMA2_7B)
RESULTS["llama2_7b_nf4_estimate_gib"] = round(est.gib()["total"], 2)
print({k: round(v, 2) for k, v in est.gib().items()})

# %% [markdown]
# ## The experiment and the model
# In the llama2 tier the checkpoint is `MODEL` (gated on the Hub: accept the licence and log in first);
# otherwise `tiny_experiment` shrinks the recipe: a tiny random Llama with a tokenizer trained on the recipe's
# texts is written to disk and loaded through exactly the same `load_llama(path, quantization="nf4")`, with a
# few steps, examples and episodes per method.

# %%
from gistlib.config import apply_overrides
from gistlib.course.experiment import SECTIONS, experiment_from_dict, load_experiment, tiny_experiment
from gistlib.course.runner import load_bundle

OUT = ROOT / RUN_DIR / TIER / f"lesson07-{RECIPE}"
where = [f"run.cache_dir={OUT / 'models'}", f"run.out_dir={OUT / 'results'}"]
if TIER == "llama2":
    if not torch.cuda.is_available():
        raise RuntimeError("the llama2 tier needs a CUDA GPU; run this notebook with TIER='pocket' on a CPU")
    exp = load_experiment(RECIPE, [*where, f"model.path={MODEL}", *OVERRIDES])
else:
    print("smoke/pocket tier: a TINY RANDOM Llama in 4-bit on the CPU stands in for Llama-2 (same code path)")
    exp = tiny_experiment(load_experiment(RECIPE, where))
    # the pocket tier trains the tiny HyperLlama 40 steps instead of tiny_experiment's 2 (the smoke tier keeps 2)
    lesson = ["train.hyper_steps=40"] if TIER == "pocket" else []
    exp = experiment_from_dict(apply_overrides(exp.to_dict(), [*lesson, *OVERRIDES], SECTIONS))
m, tr = exp.model, exp.train
print(f"{exp.run.name}: model {m.source} {m.path if m.source == 'checkpoint' else '(tiny)'}, quantization "
      f"{m.quantization or 'none'}, k={exp.hyper.num_gist_tokens}, LoRA rank {exp.hyper.lora_rank}")
print(f"HyperLlama {tr.hyperpretrain_steps} + {tr.hyper_steps} steps (lr {tr.hyper_lr}); gisting {tr.gisting_steps}, "
      f"multitask ICL {tr.multitask_steps} steps; methods {list(exp.methods.enabled)}; seeds {list(exp.run.seeds)}")
t = time.perf_counter()
b = load_bundle(exp)  # tokenizer, the data family's Source (tiny: also builds the tiny checkpoint)
print(f"{len(b.source.train)} training tasks, {len(b.source.test)} test tasks; model folder {b.base_dir} "
      f"({time.perf_counter() - t:.0f} s)")

# %%
if TIER != "llama2":  # look inside the 4-bit model before training (a 7B model is loaded by the runner)
    import bitsandbytes as bnb

    small = b.fresh_base()  # load_llama(path, quantization="nf4")
    four_bit = [mod for mod in small.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    q = four_bit[0].weight.quant_state
    print(f"{len(four_bit)} Linear4bit layers; quant type {q.quant_type}, compute dtype {four_bit[0].compute_dtype}, "
          f"double quantisation {getattr(q, 'nested', None)}; footprint {small.get_memory_footprint() / 2**20:.2f} MiB")
    print("embeddings dtype:", small.get_input_embeddings().weight.dtype, "| any trainable:",
          any(p.requires_grad for p in small.parameters()))
    RESULTS["linear4bit_layers"], RESULTS["quant_type"] = len(four_bit), q.quant_type
    del small

# %% [markdown]
# ## Train and evaluate every method
# `run_experiment` scores zero-shot and in-context learning on the frozen base, trains Gisting, HyperLlama (once
# per seed) and the multi-task ICL baseline, tunes prefixes from random, vocabulary and HyperLlama starts, and
# scores them all on the same test episodes (`gistlib.train.loop.train` trains; checkpoints and settings are
# cached under `run.cache_dir`). It writes summary.json and results.md to `run.out_dir` and returns the summary.

# %%
from gistlib.course.report import results_table
from gistlib.course.runner import run_experiment

if DEVICE == "cuda":
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
summary = run_experiment(exp, b)
print(results_table(summary))
print(f"{time.perf_counter() - t:.0f} s; summary.json and results.md in {exp.run.out_dir}")
if DEVICE == "cuda":
    RESULTS["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak GPU memory {RESULTS['peak_gpu_gib']:.2f} GiB "
          f"(planner estimate for 7B: {RESULTS['llama2_7b_nf4_estimate_gib']} GiB)")
methods = summary["methods"]
RESULTS["accuracy"] = {name: e["accuracy"] for name, e in methods.items()}
RESULTS["rouge_l"] = {name: e["rouge_l"] for name, e in methods.items() if "rouge_l" in e}
RESULTS["prefix_tuning"] = {name: {steps: e["accuracy"] for steps, e in per.items()}
                            for name, per in summary["prefix_tuning"].items()}
main = methods["hyperllama"]
RESULTS["eval_metric"] = "rouge_l" if "rouge_l" in main else "accuracy"
RESULTS["eval_mean"] = 100 * main[RESULTS["eval_metric"]]  # HyperLlama's score, in percent
hyper_log = summary["logs"][f"hyperllama_seed{exp.run.seeds[0]}"]
RESULTS["final_loss"] = hyper_log[-1]["loss"]
RESULTS["steps"] = len(hyper_log)
print(f"HyperLlama: {RESULTS['eval_metric']} {RESULTS['eval_mean']:.1f}%, final loss {RESULTS['final_loss']:.3f} "
      f"after {RESULTS['steps']} steps")

# %% [markdown]
# ## Was the 4-bit base left alone?
# The runner cached the trained HyperLlama; `train_hyper` loads it back (no training). Every base tensor, the
# quantised ones included, is compared with an untrained HyperLlama over a fresh copy of the base (cheap for the
# tiny model only).

# %%
from dataclasses import replace

from gistlib.core.hyper import HyperLlama
from gistlib.course.runner import train_hyper

if TIER != "llama2":
    k, seed = exp.hyper.num_gist_tokens, exp.run.seeds[0]
    hyper, _ = train_hyper(b, k, seed)  # cached by run_experiment: loaded, not trained
    untrained = HyperLlama(b.fresh_base(), b.gist_ids(k), replace(exp.hyper, num_gist_tokens=k, seed=seed))
    fresh = {n: p for n, p in untrained.base.named_parameters() if "lora_" not in n}
    trained = dict(hyper.base.named_parameters())
    changed = [n for n, p in fresh.items() if not torch.equal(p.data, trained[n].data)]
    print(f"base tensors compared: {len(fresh)}, changed: {len(changed)}")
    RESULTS["base_frozen"] = not changed
    del hyper, untrained
else:
    RESULTS["base_frozen"] = None  # not checked on a 7B model (a second copy would not fit)

# %%
from gistlib.course.viz import plot_loss_curves

plot_loss_curves({name: log for name, log in summary["logs"].items() if log},
                 title=f"{exp.run.name}: training loss, {Path(str(b.base_dir)).name}")

# %% [markdown]
# **Take-away.** Nothing in the HyperLlama code knows whether the base is a 1M-parameter toy or a 4-bit
# 7B model: the tiers differ in the checkpoint and the sizes. On a GPU, `TIER="llama2"` trains the real thing
# for hours (`python -m gistlib run configs/symbol.json`); `python -m gistlib.models.memory` prints the planner for
# other settings.

# %%
# the key numbers, machine-readable (tests/test_notebooks.py asserts them)
RESULTS["wall_time_s"] = round(time.perf_counter() - T0, 1)
results_file = ROOT / RESULTS_PATH
results_file.parent.mkdir(parents=True, exist_ok=True)
results_file.write_text(json.dumps(RESULTS, indent=1))
print(json.dumps(RESULTS, indent=1))
