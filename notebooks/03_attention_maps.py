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
NUM_GIST_TOKENS: int = 0  # 0: the largest k of lesson 2 (smoke 2; pocket 16)
GISTING_STEPS: int = 0  # only used if lesson 2's model is not cached; 0: the tier's (smoke 20; pocket 400)
RUN_DIR: str = "runs"
THREADS: int = 0  # torch threads (0: leave as is)
RESULTS_PATH: str = "results/notebooks/03.json"

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

# %%
# the tier's configuration, the pocket suite, its word-level tokenizer and the pretrained base
from gistlib.course.pipeline import fixed_episodes, load_base, select, tier_config

from gistlib.data import COMPACT as FMT
from gistlib.data import load_pocket_suite, pocket_tokenizer
from gistlib.models.tiny import gist_token_ids

assert TIER in ("smoke", "pocket"), "this lesson runs in the smoke and pocket tiers; the llama2 tier is lesson 7"
CACHE = ROOT / RUN_DIR / TIER  # trained models are cached here (`python -m gistlib course` fills it)
cfg = tier_config(TIER, cache_dir=str(CACHE), out_dir=str(ROOT / "results" / TIER))
suite = load_pocket_suite()
tok = pocket_tokenizer(16)
t = time.perf_counter()
base, base_dir = load_base(cfg, suite, tok)  # trains the base if it is not cached (pocket: minutes)
print(f"base from {base_dir} ({time.perf_counter() - t:.0f} s): {sum(p.numel() for p in base.parameters()):,} "
      f"parameters, {base.config.num_hidden_layers} layers, vocabulary {len(tok)}")

# %%
from gistlib.course.pipeline import train_gisting

K = NUM_GIST_TOKENS or (2 if TIER == "smoke" else 16)
steps = GISTING_STEPS or (20 if TIER == "smoke" else 400)
sweep_cfg = tier_config(TIER, cache_dir=str(CACHE / "lesson02"), gisting_steps=steps,
                        eval_every=max(5, steps // 4), patience=0)
model, _ = train_gisting(sweep_cfg, suite, tok, base_dir, K)  # lesson 2's model (trained here if missing)
model.set_attn_implementation("eager")  # sdpa returns no attention maps
GIST = gist_token_ids(tok)[:K]
print(f"gisting model with k={K}, attention: {model.config._attn_implementation}")

# %%
from gistlib.core.masks import make_gist_mask
from gistlib.course.viz import attention_maps, attention_mass, plot_attention, token_labels
from gistlib.data import render_gisting

test_tasks = select(suite["test"], cfg)
episode = fixed_episodes([t for t in test_tasks if t.meta["level"] == "C2"] or test_tasks, 1, 1, seed=SEED)[0]
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
