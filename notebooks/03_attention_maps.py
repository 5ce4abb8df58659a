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
# # 3. Attention maps
#
# Goal: look inside the gisting model of lesson 2. With eager attention a Llama returns its attention
# probabilities, one `L x L` map per layer and head. Under the gist mask the tokens after the gists must
# put *exactly* zero probability on the demos, and everything they know about the task must come through
# the gist columns. A widget lets you walk through layers and heads.

# %% tags=["parameters"]
TIER: str = "pocket"  # smoke | pocket (the llama2 tier is lesson 7)
SEED: int = 0
# OVERRIDES: "section.field=value" strings on top of configs/TIER.json; give lesson 2's, to read its models
OVERRIDES: list = []  # config changes (printed below with the values the lesson uses)
RUN_DIR: str = "runs"  # models are cached under RUN_DIR/TIER (shared with `python -m gistlib run configs/TIER.json`)
THREADS: int = 0  # torch threads (0: leave as is)
RESULTS_PATH: str = "results/notebooks/03.json"

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
from dataclasses import replace

from gistlib.course.experiment import load_experiment
from gistlib.course.runner import load_bundle

assert TIER in ("smoke", "pocket"), "this lesson runs in the smoke and pocket tiers; the llama2 tier is lesson 7"
CACHE = ROOT / RUN_DIR / TIER  # trained models are cached here (`python -m gistlib run configs/TIER.json` fills it)
# lesson 2's sweep settings, unchanged: its cached models are read (a model trained otherwise would be refused)
LESSON = {"smoke": ["methods.gist_sweep=[1]", "train.gisting_steps=20", "train.eval_every=5"],
          "pocket": ["methods.gist_sweep=[1,2,4,16]", "train.gisting_steps=400", "train.eval_every=100"]}[TIER]
exp = load_experiment(TIER, [f"run.cache_dir={CACHE}", *LESSON, *OVERRIDES])
t = time.perf_counter()
b = load_bundle(exp)  # trains the base into CACHE/base if there is none (pocket ships data/pocket_base)
b.exp = replace(exp, run=replace(exp.run, cache_dir=str(CACHE / "lesson02")))  # lesson 2's folder
tok, FMT = b.tokenizer, b.fmt
base = b.fresh_base()
print(f"base from {b.base_dir} ({time.perf_counter() - t:.0f} s): {sum(p.numel() for p in base.parameters()):,} "
      f"parameters, {base.config.num_hidden_layers} layers, vocabulary {len(tok)}")

# %%
from gistlib.course.runner import train_gisting

K = max(exp.gist_counts)  # lesson 2's largest k
print(f"k = {K}, {exp.train.gisting_steps} gisting steps (lr {exp.train.gisting_lr}), models in {b.cache}")
t = time.perf_counter()
trainee, _ = train_gisting(b, K)  # lesson 2's model (trained here if missing)
model = trainee.model
model.set_attn_implementation("eager")  # sdpa returns no attention maps
GIST = b.gist_ids(K)
print(f"gisting model with k={K} ({time.perf_counter() - t:.0f} s), attention: {model.config._attn_implementation}")

# %%
from gistlib.core.masks import make_gist_mask
from gistlib.course.viz import attention_maps, attention_mass, plot_attention, token_labels
from gistlib.data import EpisodeSampler, render_gisting

test_tasks = b.source.test
c2 = [t for t in test_tasks if t.meta["level"] == "C2"] or test_tasks  # the easiest level: the fewest demos
episode = EpisodeSampler(c2, None, 1, seed=SEED, num_episodes=1, balanced=exp.data.balanced_demos).take(1)[0]
row, _ = render_gisting(episode, episode.queries[0], tok, GIST, FMT)
ids = torch.tensor([row])
labels = token_labels(tok, row, GIST)
first, last = labels.index("[G0]"), labels.index(f"[G{K - 1}]")
attn = attention_maps(model, ids, make_gist_mask(ids, GIST))  # (layers, B, heads, L, L)
print(" ".join(labels))
print(f"attention maps: (layers, B, heads, L, L) = {tuple(attn.shape)}")
RESULTS["attention_shape"] = list(attn.shape)

# %%
plot_attention(attn, layer=attn.shape[0] - 1, head=0, labels=labels)

# %% [markdown]
# ## Pick a layer and a head

# %%
from gistlib.course.widgets import attention_widget

attention_widget(attn, labels);

# %% [markdown]
# ## After the gists, only the gists
# Sum each query's attention over groups of keys. Queries after the gists: zero on the demos (the mask
# adds `finfo.min`, which `exp` turns into exactly 0), the rest split between the gists and the query itself.

# %%
L = ids.shape[1]
after, demos, gists = slice(last + 1, L), slice(0, first), slice(first, last + 1)
on_demos = attention_mass(attn, after, demos)  # (layers, B, heads, queries after the gists)
on_gists = attention_mass(attn, after, gists)
print(f"max attention on the demos from after the gists: {float(on_demos.max())}")
print("mean attention on the gists from after the gists, per layer (rows) and head (columns):")
print(on_gists.mean(-1)[:, 0].numpy().round(2))
assert float(on_demos.max()) == 0.0
torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
RESULTS["hidden_attention_max"] = float(on_demos.max())
RESULTS["gist_attention_mean"] = float(on_gists.mean())

# %% [markdown]
# ## For contrast: the base under the causal mask
# The base reads the same tokens without the gist rule (the positive control). Its queries can look at
# the demos directly; how much of their attention goes there?

# %%
from gistlib.core.masks import make_causal_mask

base.set_attn_implementation("eager")
icl_row = [t for t in row if t not in GIST]  # the same sequence without the gists: an ICL prompt
icl_ids = torch.tensor([icl_row])
base_attn = attention_maps(base, icl_ids, make_causal_mask(icl_ids))
q_start = len(icl_row) - (L - last - 1)
base_on_demos = attention_mass(base_attn, slice(q_start, len(icl_row)), slice(0, first))
print(f"base (ICL): mean attention of the query tokens on the demos = {float(base_on_demos.mean()):.2f}")
RESULTS["icl_attention_on_demos_mean"] = float(base_on_demos.mean())
plot_attention(base_attn, layer=base_attn.shape[0] - 1, head=0, labels=token_labels(tok, icl_row, GIST),
               title="base model, causal mask (ICL), last layer, head 0")

# %% [markdown]
# **Take-away.** The gisting model's query tokens read the task only through the k gist columns; the
# base, under the causal mask, reads the demos themselves. The gist K/V are therefore a complete summary
# of the demos for the query: exactly what lesson 4 turns into a hypernetwork's output.

# %%
# the key numbers, machine-readable (tests/test_notebooks.py asserts them)
RESULTS["wall_time_s"] = round(time.perf_counter() - T0, 1)
results_file = ROOT / RESULTS_PATH
results_file.parent.mkdir(parents=True, exist_ok=True)
results_file.write_text(json.dumps(RESULTS, indent=1))
print(json.dumps(RESULTS, indent=1))
