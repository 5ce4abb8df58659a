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
# # 1. Gist masks
#
# Goal: build the attention mask that turns a few gist tokens into a bottleneck. In a sequence
# `[demos][G_1..G_k][query]` the query may look at the gist tokens but not at the demos, so everything
# it learns about the task has to pass through the gists. You will print the mask as a matrix, draw it
# as a heatmap, compare it with the positive control (plain causal: no compression) and the negative
# control (the query sees neither demos nor gists), add padding on either side, and see what goes wrong
# when a boolean mask is handed to transformers' eager attention instead of an additive one.

# %% tags=["parameters"]
TIER: str = "pocket"  # smoke | pocket | llama2 (this lesson is the same in every tier)
SEED: int = 0
NUM_GIST_TOKENS: int = 0  # 0: the tier's (smoke 2, otherwise 3)
NUM_DEMOS: int = 2  # demos in the example sequence (each is `word SYMBOL ;`)
THREADS: int = 0  # torch threads (0: leave as is)
RESULTS_PATH: str = "results/notebooks/01.json"

# %%
# versions and device
# %matplotlib inline
import json
import time

import torch

from gistlib.course.lesson import begin

ROOT, DEVICE, T0, RESULTS = begin(TIER, SEED, THREADS)  # the repository root, "cuda" or "cpu", the start time

# %% [markdown]
# ## A sequence with gist tokens
# The pocket suite's tasks map made-up words to symbols. One episode rendered for Gisting is
# `[BOS] demos G_1..G_k query ->`; the labels below are the tokens themselves (`[G0]`, `[G1]`, ... are the gists).

# %%
from gistlib.core.masks import make_gist_mask, mask_to_string, negative_control_mask, positive_control_mask
from gistlib.course.viz import plot_mask, token_labels
from gistlib.data import COMPACT, EpisodeSampler, load_pocket_suite, pocket_tokenizer, render_gisting_prompt
from gistlib.models.tiny import gist_token_ids

K = NUM_GIST_TOKENS or (2 if TIER == "smoke" else 3)
tok = pocket_tokenizer(16)
GIST = gist_token_ids(tok)[:K]
task = next(t for t in load_pocket_suite()["test"] if t.meta.get("num_categories") == 2)
episode = EpisodeSampler([task], num_demos=NUM_DEMOS, num_queries=1, seed=SEED).take(1)[0]
row = render_gisting_prompt(episode, episode.queries[0], tok, GIST, COMPACT)
ids = torch.tensor([row])  # (B=1, L)
labels = token_labels(tok, row, GIST)
print(" ".join(labels))

# %% [markdown]
# ## The mask as a matrix
# `mask[b, 0, i, j]` is True where query `i` may attend key `j`. Before and at the last gist it is the
# usual causal triangle (the gists read the demos); after the gists, only the gist columns and the
# query's own causal part remain.

# %%
mask = make_gist_mask(ids, GIST)  # (1, 1, L, L) bool
print(mask_to_string(mask[0], labels))


# %% [markdown]
# The rule in three lines of plain Python, written out to teach it, and checked against the library's
# vectorised version (they must agree element for element):

# %%
def gist_rule(row, gists):
    first = min(i for i, t in enumerate(row) if t in gists)
    last = max(i for i, t in enumerate(row) if t in gists)
    return torch.tensor([[j <= i and (i <= last or j >= first) for j in range(len(row))] for i in range(len(row))])

naive = gist_rule(row, GIST)
assert torch.equal(naive, mask[0, 0])
RESULTS["naive_equals_library"] = True
RESULTS["mask_shape"] = list(mask.shape)

# %%
plot_mask(mask, labels, title=f"gist mask, k={K}")

# %% [markdown]
# ## Positive and negative controls
# Gisting papers compare against two controls. Positive: the gist tokens sit in the sequence but hide
# nothing (plain causal mask), an upper bound. Negative: the query sees neither the demos nor the gists,
# a lower bound (zero-shot).

# %%
import matplotlib.pyplot as plt

# 10 inches: as wide as a notebook in a 1400 px window, so the browser does not shrink the figure (and its text)
fig, axes = plt.subplots(1, 3, figsize=(10, 4.2))
for ax, (name, m) in zip(axes, [("positive control (causal)", positive_control_mask(ids)),
                                ("gist", mask), ("negative control", negative_control_mask(ids, GIST))]):
    plot_mask(m, labels, title=name, ax=ax)
fig

# %% [markdown]
# ## Padding, left and right
# A batch pads rows to one length. Pad *keys* are never visible; a pad *query* sees only itself, so no row
# of the attention is all masked (an all-masked row gives NaN in eager attention).

# %%
from gistlib.data import collate

first = labels.index("[G0]")
short = row
long_ = row[:first] + row[1:first] + row[first:]  # the demos twice: a longer row
for side in ("left", "right"):
    b = collate([short, long_], tok.pad_token_id, padding_side=side)
    m = make_gist_mask(b["input_ids"], GIST, attention_mask=b["attention_mask"])
    pad_keys_seen = int((m[:, 0] & ~b["attention_mask"].bool()[:, None, :]
                         & ~torch.eye(m.shape[-1], dtype=torch.bool)).sum())
    print(f"{side} padding: pad keys seen by other queries = {pad_keys_seen}, "
          f"rows with nothing visible = {int((m.sum(-1) == 0).sum())}")
    RESULTS[f"pad_keys_seen_{side}"] = pad_keys_seen
plot_mask(m, token_labels(tok, b["input_ids"][0], GIST), title="row 0 of a right-padded batch", row=0)

# %% [markdown]
# ## A widget: pick the mask and the row
# The plain function `plot_mask` was called above; the widget only wraps it.

# %%
from gistlib.course.widgets import mask_widget

b = collate([short, long_], tok.pad_token_id, padding_side="left")
row_labels = [token_labels(tok, r, GIST) for r in b["input_ids"]]  # each row's own tokens
mask_widget(b["input_ids"], GIST, row_labels, pad_token_id=tok.pad_token_id);

# %% [markdown]
# ## The pitfall: a boolean 4-D mask under eager attention
# transformers' eager attention *adds* the mask to the attention scores. Hand it a boolean mask and it
# adds 1 where attention is allowed and 0 where it is not: nothing is hidden, not even the future.
# `gistlib.core.masks.to_additive` (0 / `finfo.min`) is applied in one place, `gistlib.core.prefix.forward_with_mask`.
# Below, a random tiny Llama with eager attention reads the same sequence under both masks.

# %%
from gistlib.course.viz import attention_maps, attention_mass
from gistlib.models.tiny import build_tiny_llama

model = build_tiny_llama(tokenizer=tok, attn_implementation="eager", seed=SEED)
L = ids.shape[1]
first, last = labels.index("[G0]"), labels.index(f"[G{K - 1}]")
after, hidden = slice(last + 1, L), slice(0, first)
positions = torch.arange(L)[None]
with torch.no_grad():  # boolean mask straight into the model: the mistake
    wrong = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
wrong_attn = torch.stack(wrong.attentions)
right_attn = attention_maps(model, ids, mask)  # additive, via forward_with_mask
future = ~torch.ones(L, L, dtype=torch.bool).tril()
leak = {
    "boolean": float(attention_mass(wrong_attn, after, hidden).max()),
    "additive": float(attention_mass(right_attn, after, hidden).max()),
}
future_mass = {"boolean": float((wrong_attn * future).sum(-1).max()),
               "additive": float((right_attn * future).sum(-1).max())}
print(f"largest attention mass that a query after the gists puts on the hidden demos: {leak}")
print(f"largest attention mass on future tokens: {future_mass}")
assert leak["additive"] == 0.0 and future_mass["additive"] == 0.0 and leak["boolean"] > 0
RESULTS["hidden_mass_boolean"], RESULTS["hidden_mass_additive"] = leak["boolean"], leak["additive"]
RESULTS["future_mass_boolean"] = future_mass["boolean"]

# %% [markdown]
# The same leak, seen in the output: under the negative control the query sees nothing before it, so
# changing the demos must not change its logits. With the additive mask they do not; with the boolean
# one they do.

# %%
from gistlib.core.prefix import forward_with_mask, positions_from_mask

other = ids.clone()
other[0, 1:first] = other[0, 1:first].flip(0)  # the same demo tokens in another order
logit_change = {}
torch.set_grad_enabled(False)  # inference only from here on
for name in ("boolean", "additive"):
    outs = []
    for x in (ids, other):
        neg = negative_control_mask(x, GIST)
        if name == "boolean":
            outs.append(model(input_ids=x, attention_mask=neg, position_ids=positions).logits)
        else:
            outs.append(forward_with_mask(model, neg, positions_from_mask(torch.ones_like(x)), input_ids=x).logits)
    logit_change[name] = float((outs[0][0, after] - outs[1][0, after]).abs().max())
print(f"max |change| of the query's logits when the hidden demos change: {logit_change}")
assert logit_change["additive"] == 0.0
RESULTS["negative_control_logit_change"] = logit_change

# %% [markdown]
# **Take-away.** The gist mask is a pure function of the token ids: causal before the gists, gists-only
# after them, pads invisible, every query keeps itself. It must reach eager attention as an additive
# float mask. Next lesson: train a model under this mask and see what compressing demos into k tokens costs.

# %%
# the key numbers, machine-readable (tests/test_notebooks.py asserts them)
RESULTS["wall_time_s"] = round(time.perf_counter() - T0, 1)
results_file = ROOT / RESULTS_PATH
results_file.parent.mkdir(parents=True, exist_ok=True)
results_file.write_text(json.dumps(RESULTS, indent=1))
print(json.dumps(RESULTS, indent=1))
