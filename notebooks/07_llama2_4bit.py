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
# First the memory planner says what fits where; then `gistlib.course.recipes` trains and evaluates on real data
# (P3, Super-NaturalInstructions or Symbol Tuning). **In the smoke and pocket tiers this notebook runs the
# identical code on a tiny random Llama quantised to 4-bit on the CPU** (bitsandbytes runs 4-bit on a CPU):
# the numbers then test the plumbing, not the method. Set `TIER = "llama2"` on a GPU for the real run.

# %% tags=["parameters"]
TIER: str = "pocket"  # smoke | pocket: a tiny 4-bit model on the CPU; llama2: MODEL on a GPU
SEED: int = 0
MODEL: str = "meta-llama/Llama-2-7b-hf"  # llama2 tier: any Llama-architecture checkpoint (name or folder)
RECIPE: str = "symbol"  # p3 | sni | symbol (gistlib.course.recipes)
STEPS: int = 0  # training steps; 0: llama2 the recipe's (5000), pocket 40, smoke the tiny recipe's (3)
RUN_DIR: str = "runs"
THREADS: int = 0  # torch threads (0: leave as is)
RESULTS_PATH: str = "results/notebooks/07.json"

# %%
# versions and device
# %matplotlib inline
import json
import platform
import time
from pathlib import Path

import matplotlib
import peft
import torch
import transformers

import gistlib

ROOT = Path(list(gistlib.__path__)[0]).resolve().parent  # the repository: relative paths below start here
if THREADS:
    torch.set_num_threads(THREADS)
torch.manual_seed(SEED)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} "
      f"| peft {peft.__version__} | matplotlib {matplotlib.__version__}")
print(f"device {DEVICE}" + (f" ({torch.cuda.get_device_name(0)})" if DEVICE == "cuda" else "")
      + f" | torch threads {torch.get_num_threads()} | tier {TIER}")
T0 = time.perf_counter()
RESULTS: dict = {"tier": TIER}

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
# ## The model
# In the llama2 tier the checkpoint is `MODEL` (gated on the Hub: accept the licence and log in first);
# otherwise a tiny random Llama with a tokenizer trained on the recipe's texts is written to disk and loaded
# through exactly the same `load_llama(path, quantization="nf4")`.

# %%
from dataclasses import replace

from gistlib.course.recipes import (
    build_tiny_checkpoint,
    format_result,
    get_recipe,
    load_recipe_tasks,
    run_recipe,
    task_texts,
    tiny_recipe,
)

OUT = ROOT / RUN_DIR / TIER / f"lesson07-{RECIPE}"
recipe = get_recipe(RECIPE)
if TIER == "llama2":
    if not torch.cuda.is_available():
        raise RuntimeError("the llama2 tier needs a CUDA GPU; run this notebook with TIER='pocket' on a CPU")
    recipe = replace(recipe, model=MODEL)
else:
    print("smoke/pocket tier: a TINY RANDOM Llama in 4-bit on the CPU stands in for Llama-2 (same code path)")
    recipe = tiny_recipe(recipe, str(OUT / "tiny_model"), str(OUT))
    texts = task_texts(load_recipe_tasks(recipe, "train") + load_recipe_tasks(recipe, "eval"))
    build_tiny_checkpoint(texts, OUT / "tiny_model", recipe.hyper.num_gist_tokens, seed=SEED)
STEPS = STEPS or (40 if TIER == "pocket" else 0)
if STEPS:
    train_cfg = replace(recipe.train, steps=STEPS, warmup_steps=min(recipe.train.warmup_steps, STEPS))
    recipe = replace(recipe, train=train_cfg)
print(f"recipe {recipe.name}: model {recipe.model}, quantization {recipe.quantization}, "
      f"k={recipe.hyper.num_gist_tokens}, {recipe.train.steps} steps")

# %%
from gistlib.models.loading import load_llama

if TIER != "llama2":  # look inside the 4-bit model before training (a 7B model is loaded once, by the recipe)
    import bitsandbytes as bnb

    small = load_llama(recipe.model, quantization="nf4")
    four_bit = [m for m in small.modules() if isinstance(m, bnb.nn.Linear4bit)]
    q = four_bit[0].weight.quant_state
    print(f"{len(four_bit)} Linear4bit layers; quant type {q.quant_type}, compute dtype {four_bit[0].compute_dtype}, "
          f"double quantisation {getattr(q, 'nested', None)}; footprint {small.get_memory_footprint() / 2**20:.2f} MiB")
    print("embeddings dtype:", small.get_input_embeddings().weight.dtype, "| any trainable:",
          any(p.requires_grad for p in small.parameters()))
    RESULTS["linear4bit_layers"], RESULTS["quant_type"] = len(four_bit), q.quant_type
    del small

# %% [markdown]
# ## Train and evaluate
# `run_recipe` loads the model with `load_llama`, wraps it as a HyperLlama (LoRA, gist table), trains with
# `gistlib.train.loop.train` (checkpoints, resume) and evaluates on held-out tasks. `check_frozen` compares every
# base tensor, the quantised ones included, before and after (cheap for the tiny model only).

# %%
if DEVICE == "cuda":
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
result = run_recipe(recipe, OUT, check_frozen=TIER != "llama2", resume=False)
print(format_result(result))
print(f"{time.perf_counter() - t:.0f} s")
if DEVICE == "cuda":
    RESULTS["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak GPU memory {RESULTS['peak_gpu_gib']:.2f} GiB "
          f"(planner estimate for 7B: {RESULTS['llama2_7b_nf4_estimate_gib']} GiB)")
RESULTS["final_loss"] = result["final_loss"]
RESULTS["base_frozen"] = result["base_frozen"]
RESULTS["eval_metric"], RESULTS["eval_mean"] = result["eval"]["metric"], result["eval"]["mean"]
RESULTS["steps"] = len(result["train"])

# %%
from gistlib.course.viz import plot_loss_curves

plot_loss_curves({recipe.name: result["train"]}, title=f"{recipe.name} recipe, {Path(recipe.model).name}")

# %% [markdown]
# **Take-away.** Nothing in the HyperLlama code knows whether the base is a 1M-parameter toy or a 4-bit
# 7B model: the tiers differ in the checkpoint and the sizes. On a GPU, `TIER="llama2"` trains the real thing
# for hours; `python -m gistlib.models.memory` prints the planner for other settings.

# %%
# the key numbers, machine-readable (tests/test_notebooks.py asserts them)
RESULTS["wall_time_s"] = round(time.perf_counter() - T0, 1)
results_file = ROOT / RESULTS_PATH
results_file.parent.mkdir(parents=True, exist_ok=True)
results_file.write_text(json.dumps(RESULTS, indent=1))
print(json.dumps(RESULTS, indent=1))
