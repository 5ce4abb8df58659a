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
# # 5. Inspecting prefixes
#
# Goal: look at what the hypernetwork writes. A prefix is, for every layer, k key vectors and k value
# vectors per key/value head. You will browse them with a widget, compare their norms across layers, ask
# whether prefixes of the same task resemble each other more than prefixes of different tasks (heatmap and
# a 2-D projection), watch a prefix change as demos are added, and finally write a task of your own in
# the playground and compare HyperLlama's answers with in-context learning's and zero-shot's.

# %% tags=["parameters"]
TIER: str = "pocket"  # smoke | pocket (the llama2 tier is lesson 7)
SEED: int = 0
TASKS_PER_LEVEL: int = 4  # held-out tasks per level
EPISODES_PER_TASK: int = 3  # different demo sets of the same task
# OVERRIDES: "section.field=value" strings applied on top of configs/TIER.json. The course's cached models were
# trained with the config's values: an override of the fields that shaped them is refused (set run.cache_dir)
OVERRIDES: list = []  # config changes (printed below with the values the lesson uses)
RUN_DIR: str = "runs"  # models are cached under RUN_DIR/TIER (shared with `python -m gistlib run configs/TIER.json`)
THREADS: int = 0  # torch threads (0: leave as is)
RESULTS_PATH: str = "results/notebooks/05.json"

# %%
# versions and device
# %matplotlib inline
import json
import time

import torch

from gistlib.course.lesson import begin

ROOT, DEVICE, T0, RESULTS = begin(TIER, SEED, THREADS)  # the repository root, "cuda" or "cpu", the start time

# %%
# the tier's experiment (configs/TIER.json), its tokenizer, pocket tasks and the pretrained base
from gistlib.course.experiment import load_experiment
from gistlib.course.runner import load_bundle

assert TIER in ("smoke", "pocket"), "this lesson runs in the smoke and pocket tiers; the llama2 tier is lesson 7"
CACHE = ROOT / RUN_DIR / TIER  # trained models are cached here (`python -m gistlib run configs/TIER.json` fills it)
exp = load_experiment(TIER, [f"run.cache_dir={CACHE}", *OVERRIDES])
t = time.perf_counter()
b = load_bundle(exp)  # trains the base into CACHE/base if there is none (pocket ships data/pocket_base)
tok, FMT = b.tokenizer, b.fmt
print(f"base from {b.base_dir} ({time.perf_counter() - t:.0f} s), vocabulary {len(tok)}")

# %%
from gistlib.course.runner import train_hyper

K, SEED0 = exp.hyper.num_gist_tokens, exp.run.seeds[0]
tr = exp.train
print(f"the course's HyperLlama: k = {K}, seed {SEED0}, {tr.hyperpretrain_steps} + {tr.hyper_steps} steps "
      f"(lr {tr.hyper_lr}); cached in {CACHE}")
t = time.perf_counter()
hyper, hyper_log = train_hyper(b, K, SEED0)  # the course's model (trained here if missing)
hyper.eval()
print(f"HyperLlama k={K}, seed {SEED0} ({time.perf_counter() - t:.0f} s; {len(hyper_log)} logged steps)")

# %%
from gistlib.data import EpisodeSampler
from gistlib.train.evaluate import hyper_prefixes

test_tasks = b.source.test
by_level = {}
for t in test_tasks:
    by_level.setdefault(t.meta["level"], [])
    if len(by_level[t.meta["level"]]) < TASKS_PER_LEVEL:
        by_level[t.meta["level"]].append(t)
tasks = [t for lvl in sorted(by_level) for t in by_level[lvl]]
episodes = [ep for i, t in enumerate(tasks)
            for ep in EpisodeSampler([t], None, 2, seed=SEED + i, num_episodes=EPISODES_PER_TASK)
            .take(EPISODES_PER_TASK)]
names = [f"{ep.task.split('-')[-1]}/{i % EPISODES_PER_TASK}" for i, ep in enumerate(episodes)]
task_of = [ep.task for ep in episodes]
level = [next(t.meta["level"] for t in tasks if t.name == ep.task) for ep in episodes]
prefixes = hyper_prefixes(hyper, episodes, tok, FMT, exp.data.max_hyper_tokens)
print(f"{len(tasks)} tasks x {EPISODES_PER_TASK} demo sets -> prefixes (layers, B, kv heads, k, head dim) = "
      f"{tuple(prefixes.keys.shape)}")
RESULTS["prefix_shape"] = list(prefixes.keys.shape)

# %% [markdown]
# ## Browse a prefix: task, layer, head, keys or values
# Layer 0 is the same for every task: there a gist token's key and value are projections of its own embedding,
# made before any attention has read the demos (the demos reach the gists from layer 1 on). So the picture starts
# at the layer where the rows differ most, `most_distinct_layer`. Every prefix also shares a large common part;
# "minus the mean over rows" removes it and leaves what is specific to one task and demo set.

# %%
from gistlib.course.viz import plot_prefix_slice
from gistlib.course.widgets import most_distinct_layer, prefix_widget

LAYER = most_distinct_layer(prefixes)
print(f"the rows differ most in layer {LAYER}")
plot_prefix_slice(prefixes, row=0, layer=LAYER, head=0, kind="keys")

# %%
prefix_widget(prefixes, names);

# %% [markdown]
# ## Norms per layer
# Keys leave each layer rotated by RoPE but their length is unchanged by the rotation, so norms compare
# layers fairly. The band spans the prefixes of all tasks.

# %%
from gistlib.course.viz import plot_prefix_norms, prefix_norms

norms = prefix_norms(prefixes)
RESULTS["key_norm_per_layer"] = norms["keys"].mean(1).tolist()
RESULTS["value_norm_per_layer"] = norms["values"].mean(1).tolist()
plot_prefix_norms(prefixes)

# %% [markdown]
# ## Do prefixes of the same task look alike?
# Cosine similarity of the flattened prefixes after removing the mean prefix, ordered by task: a
# hypernetwork that encodes the *task* (and not the particular demos) shows blocks along the diagonal.

# %%
from gistlib.course.viz import plot_similarity, prefix_similarity

sim = prefix_similarity(prefixes)
same = torch.tensor([[a == b for b in task_of] for a in task_of])
off = ~torch.eye(len(task_of), dtype=torch.bool)
same_task, other_task = float(sim[same & off].mean()), float(sim[~same].mean())
print(f"mean similarity: same task, other demos {same_task:.3f}; different tasks {other_task:.3f}")
RESULTS["similarity_same_task"], RESULTS["similarity_other_task"] = same_task, other_task
plot_similarity(sim, names, title="prefix similarity (centred cosine), ordered by task")

# %%
from gistlib.course.viz import plot_projection, project_2d

points = project_2d(prefixes)
RESULTS["projection_shape"] = list(points.shape)
plot_projection(points, level, title="prefixes, PCA, coloured by level (number of categories)")

# %%
plot_projection(points, [n.split("/")[0] for n in names], title="the same points coloured by task")

# %% [markdown]
# ## Adding demos one at a time
# The hypernetwork reads the first 0, 1, 2, ... demos of one episode. How far is each prefix from the one
# made from all demos (relative distance per layer)? And do more demos give better answers?

# %%
from dataclasses import replace

from gistlib.course.lesson import tier_note
from gistlib.course.viz import plot_prefix_change, prefix_change, prefixes_by_demo_count
from gistlib.train.evaluate import evaluate, with_prefixes

ep = episodes[-1]  # a task of the highest level
counts = list(range(len(ep.demos) + 1))
grown = prefixes_by_demo_count(hyper, ep, tok, FMT, counts)
change = prefix_change(grown)  # (layers, len(counts)), relative to the all-demos prefix
acc_by_count = []
with hyper.downstream_mode():
    for i, c in enumerate(counts):
        acc_by_count.append(evaluate(with_prefixes("hyperllama", hyper.base, grown.rows([i]), tok, FMT),
                                     [replace(ep, demos=ep.demos[:c])], tok, FMT).accuracy)
print("demos read:     ", counts)
print("query accuracy: ", [round(a, 2) for a in acc_by_count])
RESULTS["change_no_demos"], RESULTS["change_all_demos"] = float(change[:, 0].mean()), float(change[:, -1].mean())
tier_note(TIER, "the accuracy does not move with the number of demos")
plot_prefix_change(change, counts, title=f"{ep.task}: prefix vs demos read")

# %% [markdown]
# Layer 0's line lies flat at 0, whatever the demos: its gist keys and values never see them (above). Every
# later layer starts far from the all-demos prefix and comes closer as demos are added.

# %% [markdown]
# ## The playground
# Make up a task: give each of a few words a symbol, one `word SYMBOL` per line, then ask about other words.
# The words and symbols must come from the pocket vocabulary (below); words of the same category share a
# meaning the base learned, so a symbol given to one word of a category should carry over to the others.

# %%
from gistlib.course.widgets import format_playground, playground, playground_widget
from gistlib.data.pocket import pocket_world

world = pocket_world()
for i, words in enumerate(world["categories"]):
    print(f"category {i}: {' '.join(words)}")
print("symbols:", " ".join(world["symbols"]))
cats, syms = world["categories"][:2], world["symbols"][-2:]
DEMOS = "\n".join(f"{w} {s}" for s, words in zip(syms, cats) for w in words[:2])
QUERIES = " ".join(words[-1] for words in cats)
table = playground(hyper, tok, DEMOS, QUERIES)
print("\n" + DEMOS + "\n")
print(format_playground(table))
RESULTS["playground_rows"] = len(table["rows"])
tier_note(TIER, "every method gives about the same answer to every query, a guess")

# %%
playground_widget(hyper, tok, DEMOS, QUERIES);

# %%
# the key numbers, machine-readable (tests/test_notebooks.py asserts them)
RESULTS["wall_time_s"] = round(time.perf_counter() - T0, 1)
results_file = ROOT / RESULTS_PATH
results_file.parent.mkdir(parents=True, exist_ok=True)
results_file.write_text(json.dumps(RESULTS, indent=1))
print(json.dumps(RESULTS, indent=1))
