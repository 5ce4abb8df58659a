"""Write the numbered lesson notebooks from the cell sources below (run from anywhere).

    python notebooks/build_notebooks.py          # rewrites notebooks/0N_*.ipynb, without outputs

The notebooks are generated so that they stay reproducible and reviewable as code: edit this file,
rerun it, commit both. Every notebook has the same frame:

    title + goal (markdown)
    parameters cell (tagged `parameters`, typed literals; papermill overrides them, e.g. TIER="smoke")
    versions + device cell
    the lesson, importing everything from gistlib
    a last cell writing the key numbers to RESULTS_PATH (JSON) for tests/test_notebooks.py

Sizes left at 0 (or []) take the tier's value, so `TIER="smoke"` alone shrinks a lesson to seconds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
LANGUAGE_INFO = {
    "name": "python",
    "version": "3.11",
    "mimetype": "text/x-python",
    "file_extension": ".py",
    "codemirror_mode": {"name": "ipython", "version": 3},
    "pygments_lexer": "ipython3",
    "nbconvert_exporter": "python",
}


def _src(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def md(text):
    return nbformat.v4.new_markdown_cell(_src(text))


def code(text):
    return nbformat.v4.new_code_cell(_src(text))


def params(text):
    cell = code(text)
    cell.metadata["tags"] = ["parameters"]
    return cell


SETUP = """
    # versions and device
    %matplotlib inline
    import json, platform, time
    from pathlib import Path

    import matplotlib, peft, torch, transformers
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
"""

SAVE = """
    # the key numbers, machine-readable (tests/test_notebooks.py asserts them)
    RESULTS["wall_time_s"] = round(time.perf_counter() - T0, 1)
    results_file = ROOT / RESULTS_PATH
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(RESULTS, indent=1))
    print(json.dumps(RESULTS, indent=1))
"""

POCKET_SETUP = """
    # the tier's configuration, the pocket suite, its word-level tokenizer and the pretrained base
    from gistlib.data import COMPACT as FMT
    from gistlib.data import load_pocket_suite, pocket_tokenizer
    from gistlib.models.tiny import gist_token_ids
    from gistlib.course.pipeline import fixed_episodes, load_base, select, tier_config

    assert TIER in ("smoke", "pocket"), "this lesson runs in the smoke and pocket tiers; the llama2 tier is lesson 7"
    CACHE = ROOT / RUN_DIR / TIER  # trained models are cached here (`python -m gistlib course` fills it)
    cfg = tier_config(TIER, cache_dir=str(CACHE), out_dir=str(ROOT / "results" / TIER))
    suite = load_pocket_suite()
    tok = pocket_tokenizer(16)
    t = time.perf_counter()
    base, base_dir = load_base(cfg, suite, tok)  # trains the base if it is not cached (pocket: minutes)
    print(f"base from {base_dir} ({time.perf_counter() - t:.0f} s): {sum(p.numel() for p in base.parameters()):,} "
          f"parameters, {base.config.num_hidden_layers} layers, vocabulary {len(tok)}")
"""


def lesson_01():
    return [
        md("""
        # 1. Gist masks

        Goal: build the attention mask that turns a few gist tokens into a bottleneck. In a sequence
        `[demos][G_1..G_k][query]` the query may look at the gist tokens but not at the demos, so everything
        it learns about the task has to pass through the gists. You will print the mask as a matrix, draw it
        as a heatmap, compare it with the positive control (plain causal: no compression) and the negative
        control (the query sees neither demos nor gists), add padding on either side, and see what goes wrong
        when a boolean mask is handed to transformers' eager attention instead of an additive one.
        """),
        params("""
        TIER: str = "pocket"  # smoke | pocket | llama2 (this lesson is the same in every tier)
        SEED: int = 0
        NUM_GIST_TOKENS: int = 0  # 0: the tier's (smoke 2, otherwise 3)
        NUM_DEMOS: int = 2  # demos in the example sequence (each is `word SYMBOL ;`)
        THREADS: int = 0  # torch threads (0: leave as is)
        RESULTS_PATH: str = "results/notebooks/01.json"
        """),
        code(SETUP),
        md("""
        ## A sequence with gist tokens
        The pocket suite's tasks map made-up words to symbols. One episode rendered for Gisting is
        `[BOS] demos G_1..G_k query ->`; the labels below are the tokens themselves (`[G0]`, `[G1]`, ... are the gists).
        """),
        code("""
        from gistlib.data import COMPACT, EpisodeSampler, load_pocket_suite, pocket_tokenizer, render_gisting_prompt
        from gistlib.core.masks import (make_causal_mask, make_gist_mask, mask_to_string, negative_control_mask,
                                   positive_control_mask, to_additive)
        from gistlib.models.tiny import gist_token_ids
        from gistlib.course.viz import plot_mask, token_labels

        K = NUM_GIST_TOKENS or (2 if TIER == "smoke" else 3)
        tok = pocket_tokenizer(16)
        GIST = gist_token_ids(tok)[:K]
        task = next(t for t in load_pocket_suite()["test"] if t.meta.get("num_categories") == 2)
        episode = EpisodeSampler([task], num_demos=NUM_DEMOS, num_queries=1, seed=SEED).take(1)[0]
        row = render_gisting_prompt(episode, episode.queries[0], tok, GIST, COMPACT)
        ids = torch.tensor([row])  # (B=1, L)
        labels = token_labels(tok, row, GIST)
        print(" ".join(labels))
        """),
        md("""
        ## The mask as a matrix
        `mask[b, 0, i, j]` is True where query `i` may attend key `j`. Before and at the last gist it is the
        usual causal triangle (the gists read the demos); after the gists, only the gist columns and the
        query's own causal part remain.
        """),
        code("""
        mask = make_gist_mask(ids, GIST)  # (1, 1, L, L) bool
        print(mask_to_string(mask[0], labels))
        """),
        md("""
        The rule in three lines of plain Python, written out to teach it, and checked against the library's
        vectorised version (they must agree element for element):
        """),
        code("""
        def gist_rule(row, gists):
            first = min(i for i, t in enumerate(row) if t in gists)
            last = max(i for i, t in enumerate(row) if t in gists)
            return torch.tensor([[j <= i and (i <= last or j >= first) for j in range(len(row))] for i in range(len(row))])

        naive = gist_rule(row, GIST)
        assert torch.equal(naive, mask[0, 0])
        RESULTS["naive_equals_library"] = True
        RESULTS["mask_shape"] = list(mask.shape)
        """),
        code("""
        plot_mask(mask, labels, title=f"gist mask, k={K}")
        """),
        md("""
        ## Positive and negative controls
        Gisting papers compare against two controls. Positive: the gist tokens sit in the sequence but hide
        nothing (plain causal mask), an upper bound. Negative: the query sees neither the demos nor the gists,
        a lower bound (zero-shot).
        """),
        code("""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
        for ax, (name, m) in zip(axes, [("positive control (causal)", positive_control_mask(ids)),
                                        ("gist", mask), ("negative control", negative_control_mask(ids, GIST))]):
            plot_mask(m, labels, title=name, ax=ax)
        fig
        """),
        md("""
        ## Padding, left and right
        A batch pads rows to one length. Pad *keys* are never visible; a pad *query* sees only itself, so no row
        of the attention is all masked (an all-masked row gives NaN in eager attention).
        """),
        code("""
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
        """),
        md("""
        ## A widget: pick the mask and the row
        The plain function `plot_mask` was called above; the widget only wraps it.
        """),
        code("""
        from gistlib.course.widgets import mask_widget

        b = collate([short, long_], tok.pad_token_id, padding_side="left")
        mask_widget(b["input_ids"], GIST, token_labels(tok, b["input_ids"][0], GIST), pad_token_id=tok.pad_token_id);
        """),
        md("""
        ## The pitfall: a boolean 4-D mask under eager attention
        transformers' eager attention *adds* the mask to the attention scores. Hand it a boolean mask and it
        adds 1 where attention is allowed and 0 where it is not: nothing is hidden, not even the future.
        `gistlib.core.masks.to_additive` (0 / `finfo.min`) is applied in one place, `gistlib.core.prefix.forward_with_mask`.
        Below, a random tiny Llama with eager attention reads the same sequence under both masks.
        """),
        code("""
        from gistlib.models.tiny import build_tiny_llama
        from gistlib.course.viz import attention_maps, attention_mass

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
        future_mass = {"boolean": float((wrong_attn * future).sum(-1).max()), "additive": float((right_attn * future).sum(-1).max())}
        print(f"largest attention mass that a query after the gists puts on the hidden demos: {leak}")
        print(f"largest attention mass on future tokens: {future_mass}")
        assert leak["additive"] == 0.0 and future_mass["additive"] == 0.0 and leak["boolean"] > 0
        RESULTS["hidden_mass_boolean"], RESULTS["hidden_mass_additive"] = leak["boolean"], leak["additive"]
        RESULTS["future_mass_boolean"] = future_mass["boolean"]
        """),
        md("""
        The same leak, seen in the output: under the negative control the query sees nothing before it, so
        changing the demos must not change its logits. With the additive mask they do not; with the boolean
        one they do.
        """),
        code("""
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
        """),
        md("""
        **Take-away.** The gist mask is a pure function of the token ids: causal before the gists, gists-only
        after them, pads invisible, every query keeps itself. It must reach eager attention as an additive
        float mask. Next lesson: train a model under this mask and see what compressing demos into k tokens costs.
        """),
        code(SAVE),
    ]


def lesson_02():
    return [
        md("""
        # 2. Gisting in one model

        Goal: fine-tune the pocket base (a tiny Llama that learned in-context learning) under the gist mask, so
        that it learns to squeeze the demos into the gist tokens' activations (Mu et al. 2023). Then check that
        *gist caching* is exact: the keys and values at the gist positions, used as a prefix, give the same
        logits as the whole sequence under the mask. Finally trade compression against quality: train with
        1, 2, 4, 8 and 16 gist tokens and compare each with in-context learning (all demos visible) and
        zero-shot (no demos).
        """),
        params("""
        TIER: str = "pocket"  # smoke | pocket (the llama2 tier is lesson 7)
        SEED: int = 0
        GIST_COUNTS: list = []  # []: the tier's (smoke [1, 2]; pocket [1, 2, 4, 8, 16])
        GISTING_STEPS: int = 0  # per k; 0: the tier's (smoke 20; pocket 400)
        TEST_EPISODES: int = 0  # 0: the tier's (smoke 12; pocket 200)
        RUN_DIR: str = "runs"  # models are cached under RUN_DIR/TIER (shared with `python -m gistlib course`)
        THREADS: int = 0  # torch threads (0: leave as is)
        RESULTS_PATH: str = "results/notebooks/02.json"
        """),
        code(SETUP),
        code(POCKET_SETUP),
        code("""
        GIST_COUNTS = GIST_COUNTS or ([1, 2] if TIER == "smoke" else [1, 2, 4, 8, 16])
        GISTING_STEPS = GISTING_STEPS or (20 if TIER == "smoke" else 400)
        TEST_EPISODES = TEST_EPISODES or (12 if TIER == "smoke" else 200)
        # this lesson's gisting runs live in their own folder: the same steps for every k
        sweep_cfg = tier_config(TIER, cache_dir=str(CACHE / "lesson02"), gisting_steps=GISTING_STEPS,
                                eval_every=max(5, GISTING_STEPS // 4), patience=0)
        test_tasks = select(suite["test"], cfg)
        level_of = {t.name: t.meta["level"] for t in test_tasks}
        test = fixed_episodes(test_tasks, TEST_EPISODES, cfg.queries_per_episode, seed=12345)
        levels = [level_of[ep.task] for ep in test]
        print(f"k in {GIST_COUNTS}, {GISTING_STEPS} steps each; {len(test)} held-out episodes, levels {sorted(set(levels))}")
        """),
        md("""
        ## What a gisting training row looks like
        One sequence, `[BOS] demos G_1..G_k query -> answer`, trained under the gist mask with the loss on the
        answer only (the labels are -100 elsewhere).
        """),
        code("""
        from gistlib.data.batches import gisting_batches
        from gistlib.course.viz import token_labels

        K_SHOW = max(GIST_COUNTS)
        batch = next(gisting_batches(select(suite["train"], cfg), tok, gist_token_ids(tok)[:K_SHOW], batch_size=2))
        for ids, lab in zip(batch["input_ids"], batch["labels"]):
            print(" ".join(token_labels(tok, ids, gist_token_ids(tok))))
            print("   loss on:", tok.decode([t for t in lab.tolist() if t != -100]))
        """),
        md("""
        ## Train one gisting model per k
        `gistlib.course.pipeline.train_gisting` fine-tunes every weight of a fresh copy of the base under the gist mask
        with `gistlib.train.loop.train` and early-stops on validation tasks (never on the test tasks). Trained models
        are cached, so a second run of this notebook is fast.
        """),
        code("""
        from gistlib.course.pipeline import train_gisting
        from gistlib.course.viz import plot_loss_curves

        gisting_models, logs = {}, {}
        for k in GIST_COUNTS:
            t = time.perf_counter()
            gisting_models[k], logs[f"k={k}"] = train_gisting(sweep_cfg, suite, tok, base_dir, k)
            print(f"k={k:2d}: {len(logs[f'k={k}'])} logged steps, {time.perf_counter() - t:.0f} s")
        plot_loss_curves(logs, title="gisting: training loss (and validation accuracy)")
        """),
        md("""
        ## Gist caching is exact
        Run the whole sequence `[BOS] demos G.. query answer` under the gist mask. Then run `[BOS] demos G..`
        alone, keep the gists' keys and values in every layer (re-rotated to positions 0..k-1: the canonical
        prefix) and run `query answer` after that prefix. The query's logits must match, because under the gist
        mask the query saw nothing but the gists anyway.
        """),
        code("""
        from gistlib.data import render_gisting, render_hyper_input
        from gistlib.core.masks import make_gist_mask
        from gistlib.core.prefix import extract_prefix, forward_with_mask, forward_with_prefix, positions_from_mask

        k0 = max(GIST_COUNTS)
        model, gist = gisting_models[k0], gist_token_ids(tok)[:k0]
        caching_diffs = []
        for ep in test[:4]:
            full, _ = render_gisting(ep, ep.queries[0], tok, gist, FMT)
            head = render_hyper_input(ep, tok, gist, FMT)
            assert full[: len(head)] == head
            x = torch.tensor([full])
            with torch.no_grad():
                whole = forward_with_mask(model, make_gist_mask(x, gist), positions_from_mask(torch.ones_like(x)),
                                          input_ids=x).logits[0, len(head):]
                h = torch.tensor([head])
                prefix = extract_prefix(model, h, torch.ones_like(h), gist)
                q = torch.tensor([full[len(head):]])
                cached = forward_with_prefix(model, prefix, q, torch.ones_like(q)).logits[0]
            caching_diffs.append(float((whole - cached).abs().max()))
        print(f"prefix shape (layers, B, kv heads, k, head dim) = {tuple(prefix.keys.shape)}")
        print(f"max |logit difference|, whole sequence vs cached prefix: {max(caching_diffs):.2e}")
        assert max(caching_diffs) < 1e-4
        RESULTS["caching_max_abs_diff"] = max(caching_diffs)
        RESULTS["prefix_shape"] = list(prefix.keys.shape)
        """),
        md("""
        ## Compression against quality
        Every method is scored on the same held-out episodes (tasks whose rules never occurred in training) by
        rank classification over the task's symbols. ICL is the positive control (the query sees every demo),
        zero-shot the negative one (chance by construction).
        """),
        code("""
        from gistlib.train.evaluate import evaluate, gisting, icl, zero_shot
        from gistlib.course.pipeline import compression
        from gistlib.course.viz import accuracy_by_group

        scores = {"zero_shot": evaluate(zero_shot(base, tok, FMT), test, tok, FMT),
                  "icl": evaluate(icl(base, tok, FMT), test, tok, FMT)}
        for k, m in gisting_models.items():
            scores[f"gisting k={k}"] = evaluate(gisting(m, test, tok, gist_token_ids(tok)[:k], FMT), test, tok, FMT)
        demo_tokens = compression(cfg, base, test, tok, 1)["mean_demo_tokens"]
        print(f"demos: {demo_tokens:.1f} tokens on average\\n")
        print(f"{'method':<16} {'accuracy [95% CI]':<24} " + " ".join(f"{lvl:>6}" for lvl in sorted(set(levels))))
        for name, r in scores.items():
            by = accuracy_by_group(r.per_episode, levels)
            print(f"{name:<16} {r.accuracy:.3f} [{r.low:.3f}, {r.high:.3f}]   " + " ".join(f"{v:6.3f}" for v in by.values()))
        RESULTS["accuracy"] = {name: r.accuracy for name, r in scores.items()}
        RESULTS["gisting_loss_first_last"] = {name: [log[0]["loss"], log[-1]["loss"]] for name, log in logs.items()}
        """),
        code("""
        from gistlib.course.report import plot_tradeoff

        summary = {"methods": {"icl": {"by_level": accuracy_by_group(scores["icl"].per_episode, levels)}},
                   "gist_sweep": {str(k): {"by_level": accuracy_by_group(scores[f"gisting k={k}"].per_episode, levels)}
                                  for k in GIST_COUNTS}}
        fig = plot_tradeoff(summary, method="gisting")
        fig.axes[0].set_title("Gisting: accuracy vs gist tokens (dashed: ICL)");
        """),
        md("""
        Read the plot per level: a level's demos carry more information as the number of categories grows
        (C2 < C4 < C8). Where a line sits under its dashed ICL line, k gist tokens could not hold what the demos
        said; where it meets it, compression cost nothing. In the smoke tier every model is a few steps from
        random, so only the shapes of things are meaningful, not the numbers.

        Careful with a line that sits flat at chance: training under the gist mask has the same plateau as
        in-context learning itself (loss stuck near 1.0, then a sudden drop). A model still on the plateau says
        "not trained long enough", not "k is too small". In the pocket run recorded in the README, k = 1, 2, 4 and 8
        were all still on it after 400 steps while k = 16 had left it; the course's k = 8 model, trained 600 steps
        on another schedule, reached 0.75. Raise `GISTING_STEPS` and watch the validation curves above.
        """),
        code(SAVE),
    ]


def lesson_03():
    return [
        md("""
        # 3. Attention maps

        Goal: look inside the gisting model of lesson 2. With eager attention a Llama returns its attention
        probabilities, one `L x L` map per layer and head. Under the gist mask the tokens after the gists must
        put *exactly* zero probability on the demos, and everything they know about the task must come through
        the gist columns. A widget lets you walk through layers and heads.
        """),
        params("""
        TIER: str = "pocket"  # smoke | pocket (the llama2 tier is lesson 7)
        SEED: int = 0
        NUM_GIST_TOKENS: int = 0  # 0: the largest k of lesson 2 (smoke 2; pocket 16)
        GISTING_STEPS: int = 0  # only used if lesson 2's model is not cached; 0: the tier's (smoke 20; pocket 400)
        RUN_DIR: str = "runs"
        THREADS: int = 0  # torch threads (0: leave as is)
        RESULTS_PATH: str = "results/notebooks/03.json"
        """),
        code(SETUP),
        code(POCKET_SETUP),
        code("""
        from gistlib.course.pipeline import train_gisting

        K = NUM_GIST_TOKENS or (2 if TIER == "smoke" else 16)
        steps = GISTING_STEPS or (20 if TIER == "smoke" else 400)
        sweep_cfg = tier_config(TIER, cache_dir=str(CACHE / "lesson02"), gisting_steps=steps,
                                eval_every=max(5, steps // 4), patience=0)
        model, _ = train_gisting(sweep_cfg, suite, tok, base_dir, K)  # lesson 2's model (trained here if missing)
        model.set_attn_implementation("eager")  # sdpa returns no attention maps
        GIST = gist_token_ids(tok)[:K]
        print(f"gisting model with k={K}, attention: {model.config._attn_implementation}")
        """),
        code("""
        from gistlib.data import render_gisting
        from gistlib.core.masks import make_gist_mask
        from gistlib.course.viz import attention_maps, attention_mass, plot_attention, token_labels

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
        """),
        code("""
        plot_attention(attn, layer=attn.shape[0] - 1, head=0, labels=labels)
        """),
        md("""
        ## Pick a layer and a head
        """),
        code("""
        from gistlib.course.widgets import attention_widget

        attention_widget(attn, labels);
        """),
        md("""
        ## After the gists, only the gists
        Sum each query's attention over groups of keys. Queries after the gists: zero on the demos (the mask
        adds `finfo.min`, which `exp` turns into exactly 0), the rest split between the gists and the query itself.
        """),
        code("""
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
        """),
        md("""
        ## For contrast: the base under the causal mask
        The base reads the same tokens without the gist rule (the positive control). Its queries can look at
        the demos directly; how much of their attention goes there?
        """),
        code("""
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
        """),
        md("""
        **Take-away.** The gisting model's query tokens read the task only through the k gist columns; the
        base, under the causal mask, reads the demos themselves. The gist K/V are therefore a complete summary
        of the demos for the query: exactly what lesson 4 turns into a hypernetwork's output.
        """),
        code(SAVE),
    ]


def lesson_04():
    return [
        md("""
        # 4. Training HyperLlama

        Goal: train a gisting-based hypernetwork over a *frozen* base. The hypernetwork is the base plus LoRA on
        every linear map plus k trainable gist embeddings; it reads `[BOS] demos G_1..G_k`, and the gists' keys
        and values in every layer become a prefix for the same base with the adapters switched off, which
        answers the queries. You will look at a batch, count what trains, watch the loss live, and check that
        not one bit of the base changed.
        """),
        params("""
        TIER: str = "pocket"  # smoke | pocket (the llama2 tier is lesson 7)
        SEED: int = 0
        NUM_GIST_TOKENS: int = 0  # 0: the tier's (smoke 2; pocket 8)
        HYPERPRETRAIN_STEPS: int = 0  # stage (a) on plain text; 0: the tier's (smoke 2; pocket 100)
        HYPER_STEPS: int = 0  # stage (b), multi-task; 0: the tier's (smoke 30; pocket 600)
        LR: float = 0.0  # 0: the tier's (smoke 1e-2, so a near-random smoke model moves within 30 steps; pocket 2e-3)
        EVAL_EVERY: int = 0  # live plot and validation every this many steps; 0: smoke 10, pocket 50
        TEST_EPISODES: int = 0  # 0: the tier's (smoke 12; pocket 200)
        RUN_DIR: str = "runs"
        THREADS: int = 0  # torch threads (0: leave as is)
        RESULTS_PATH: str = "results/notebooks/04.json"
        """),
        code(SETUP),
        code(POCKET_SETUP),
        code("""
        from gistlib.core.hyper import HyperConfig, HyperLlama
        from transformers import LlamaForCausalLM

        K = NUM_GIST_TOKENS or cfg.num_gist_tokens
        HYPERPRETRAIN_STEPS = HYPERPRETRAIN_STEPS or (2 if TIER == "smoke" else 100)
        HYPER_STEPS = HYPER_STEPS or (30 if TIER == "smoke" else 600)
        LR = LR or (1e-2 if TIER == "smoke" else cfg.hyper_lr)
        EVAL_EVERY = EVAL_EVERY or (10 if TIER == "smoke" else 50)
        TEST_EPISODES = TEST_EPISODES or (12 if TIER == "smoke" else 200)
        GIST = gist_token_ids(tok)[:K]
        fresh = LlamaForCausalLM.from_pretrained(base_dir, local_files_only=True).float()  # a copy to wrap
        hyper = HyperLlama(fresh, GIST, HyperConfig(num_gist_tokens=K, lora_rank=cfg.lora_rank,
                                                                    lora_alpha=cfg.lora_alpha, seed=SEED))
        n_total = sum(p.numel() for p in hyper.parameters())
        trainable = hyper.trainable_state()
        n_train = sum(p.numel() for p in trainable.values())
        print(f"{n_train:,} trainable of {n_total:,} parameters ({100 * n_train / n_total:.1f}%):")
        for kind in ("lora_A", "lora_B", "gist_embeddings", "prefix_head"):
            print(f"  {kind:<16} {sum(p.numel() for n, p in trainable.items() if kind in n):>8,}")
        RESULTS["trainable_parameters"], RESULTS["total_parameters"] = n_train, n_total
        """),
        md("""
        ## One batch
        Each training step takes a few tasks: for each, the hypernetwork reads its demos (left-padded rows), and
        the downstream model answers several other queries of the same task (`task_index` says which prefix
        each downstream row uses).

        The `icl_*` rows are a teacher, an addition to the paper: the same frozen base reading the demos *in
        context* before the query (`icl_rows` names the downstream row each one teaches). Besides the
        language-modelling loss on the answer, training asks the downstream model's hidden state on every query
        token, in every layer, to point where the teacher's does (`gistlib.core.distill`, 1 - cosine). One answer
        token gives the hypernetwork little to go on; the teacher's hidden states say what the prefix should
        make the model compute. On the pocket suite, runs trained on the answer alone mostly stayed at
        zero-shot accuracy; with the teacher, every seed tried with the course's settings learned (README, "What we
        changed and why").
        Set `distill_weight=0` in the config to train as the paper does.
        """),
        code("""
        from gistlib.data.batches import hyper_batches
        from gistlib.course.viz import token_labels

        train_tasks = select(suite["train"], cfg)
        peek = next(hyper_batches(train_tasks, tok, GIST, tasks_per_batch=2, queries_per_task=2, seed=SEED,
                                  teacher_queries=1))
        for name, v in peek.items():
            print(f"{name:<22} {tuple(v.shape)}")
        print("\\nhypernetwork row 0: ", " ".join(token_labels(tok, peek["hyper_input_ids"][0], GIST)))
        for r in range(2):
            print(f"downstream row {r} (task {int(peek['task_index'][r])}):", " ".join(token_labels(tok, peek["input_ids"][r])))
        print(f"teacher of downstream row {int(peek['icl_rows'][0])}:", " ".join(token_labels(tok, peek["icl_input_ids"][0])))
        """),
        md("""
        ## Snapshot the base, then train with a live loss plot
        Stage (a), hyperpretraining: the hypernetwork reads a stretch of text, the downstream model continues it
        from the prefix alone. Stage (b), multi-task training on the training tasks, validated on separate tasks.
        `gistlib.train.loop.train` calls `evaluate(hyper, step)` every `EVAL_EVERY` steps: we use it to score the
        validation tasks and redraw the loss.
        """),
        code("""
        import shutil

        from IPython.display import display

        from gistlib.data.batches import hyperpretrain_batches
        from gistlib.data import load_pocket_corpus
        from gistlib.train.evaluate import evaluate, hyper_prefixes, icl, with_prefixes, zero_shot
        from gistlib.train.loop import TrainConfig, train
        from gistlib.course.viz import plot_loss_curves, read_metrics

        frozen_before = {n: p.detach().clone() for n, p in hyper.base.named_parameters() if "lora_" not in n}
        trainable_before = {n: p.detach().clone() for n, p in hyper.trainable_state().items()}
        OUT = CACHE / "lesson04"
        shutil.rmtree(OUT, ignore_errors=True)  # this lesson trains from scratch every time

        pre = TrainConfig(steps=HYPERPRETRAIN_STEPS, lr=LR, warmup_steps=min(20, HYPERPRETRAIN_STEPS), seed=SEED,
                          out_dir=str(OUT / "hyperpretrain"), progress=False, log_every=10)
        ctx = 24 if TIER == "smoke" else 48
        pre_log = train(hyper, hyperpretrain_batches(load_pocket_corpus(), tok, GIST, cfg.tasks_per_batch, ctx, 16, seed=SEED), pre)
        print(f"hyperpretraining: loss {pre_log[0]['loss']:.3f} -> {pre_log[-1]['loss']:.3f}")

        val = fixed_episodes(select(suite["validation"], cfg), cfg.val_episodes, 2, seed=1)
        live = display(plot_loss_curves({"hyperpretrain": pre_log}), display_id=True)

        def validate(h, step):
            h.eval()
            with torch.no_grad():
                prefixes = hyper_prefixes(h, val, tok, FMT)
                with h.downstream_mode():
                    acc = evaluate(with_prefixes("hyperllama", h.base, prefixes, tok, FMT), val, tok, FMT).accuracy
            records = read_metrics(OUT / "multitask" / "metrics.jsonl") + [{"step": step, "loss": float("nan"), "eval": acc}]
            live.update(plot_loss_curves({"multi-task": records}, title=f"HyperLlama, step {step}: validation {acc:.2f}"))
            return acc

        main = TrainConfig(steps=HYPER_STEPS, lr=LR, warmup_steps=min(100, HYPER_STEPS // 10), final_lr_fraction=0.1,
                           eval_every=EVAL_EVERY, seed=SEED, out_dir=str(OUT / "multitask"), progress=False, log_every=10,
                           distill_weight=cfg.distill_weight)
        t = time.perf_counter()
        log = train(hyper, hyper_batches(train_tasks, tok, GIST, cfg.tasks_per_batch, cfg.queries_per_task, seed=SEED,
                                         repeat_demo_prob=cfg.repeat_demo_prob, balanced=cfg.balanced_demos,
                                         teacher_queries=cfg.teacher_queries), main, evaluate=validate)
        print(f"{len(log)} steps in {time.perf_counter() - t:.0f} s")
        """),
        code("""
        n = max(1, len(log) // 10)
        loss_start = sum(r["loss"] for r in log[:n]) / n
        loss_end = sum(r["loss"] for r in log[-n:]) / n
        print(f"mean training loss, first {n} steps: {loss_start:.3f}; last {n} steps: {loss_end:.3f}")
        RESULTS["loss_start"], RESULTS["loss_end"] = loss_start, loss_end
        RESULTS["validation"] = [r["eval"] for r in log if "eval" in r]
        plot_loss_curves({"hyperpretrain": pre_log, "multi-task": log}, smooth=min(10, n))
        """),
        md("""
        ## Frozen means frozen
        Every base tensor is compared bit for bit with the snapshot taken before training. The LoRA weights and
        the gist embeddings, on the other hand, must have moved.
        """),
        code("""
        after = dict(hyper.base.named_parameters())
        changed_base = [n for n, p in frozen_before.items() if not torch.equal(p, after[n])]
        now = hyper.trainable_state()
        moved = {n: float((now[n].detach() - p).abs().max()) for n, p in trainable_before.items()}
        print(f"base tensors compared: {len(frozen_before)}, changed: {len(changed_base)}")
        print(f"trainable tensors that moved: {sum(v > 0 for v in moved.values())} of {len(moved)}"
              f" (gist embeddings moved by up to {moved['gist_embeddings']:.3g})")
        assert not changed_base, changed_base[:3]
        assert moved["gist_embeddings"] > 0
        RESULTS["base_frozen"] = not changed_base
        RESULTS["trainable_moved"] = sum(v > 0 for v in moved.values())
        """),
        md("""
        ## How good is it after this short run?
        The same held-out episodes for the hypernetwork's prefixes, in-context learning and zero-shot. The
        pocket course (`python -m gistlib course`) trains longer, with early stopping; lessons 5 and 6 use that model.
        """),
        code("""
        test = fixed_episodes(select(suite["test"], cfg), TEST_EPISODES, cfg.queries_per_episode, seed=12345)
        hyper.eval()
        with torch.no_grad():
            prefixes = hyper_prefixes(hyper, test, tok, FMT)
            with hyper.downstream_mode():
                acc = {"zero_shot": evaluate(zero_shot(hyper.base, tok, FMT), test, tok, FMT),
                       "icl": evaluate(icl(hyper.base, tok, FMT), test, tok, FMT),
                       "hyperllama": evaluate(with_prefixes("hyperllama", hyper.base, prefixes, tok, FMT), test, tok, FMT)}
        for name, r in acc.items():
            print(f"{name:<11} {r.accuracy:.3f} [{r.low:.3f}, {r.high:.3f}]")
        RESULTS["accuracy"] = {name: r.accuracy for name, r in acc.items()}
        """),
        code(SAVE),
    ]


HYPER_LOAD = """
    from gistlib.course.pipeline import train_hyper

    K = cfg.num_gist_tokens
    t = time.perf_counter()
    hyper, hyper_log = train_hyper(cfg, suite, tok, base_dir, K, cfg.seeds[0])  # the course's model (trained if missing)
    hyper.eval()
    print(f"HyperLlama k={K}, seed {cfg.seeds[0]} ({time.perf_counter() - t:.0f} s; {len(hyper_log)} logged steps)")
"""


def lesson_05():
    return [
        md("""
        # 5. Inspecting prefixes

        Goal: look at what the hypernetwork writes. A prefix is, for every layer, k key vectors and k value
        vectors per key/value head. You will browse them with a widget, compare their norms across layers, ask
        whether prefixes of the same task resemble each other more than prefixes of different tasks (heatmap and
        a 2-D projection), watch a prefix change as demos are added, and finally write a task of your own in
        the playground and compare HyperLlama's answers with in-context learning's and zero-shot's.
        """),
        params("""
        TIER: str = "pocket"  # smoke | pocket (the llama2 tier is lesson 7)
        SEED: int = 0
        TASKS_PER_LEVEL: int = 0  # held-out tasks per level; 0: smoke 2, pocket 4
        EPISODES_PER_TASK: int = 3  # different demo sets of the same task
        RUN_DIR: str = "runs"
        THREADS: int = 0  # torch threads (0: leave as is)
        RESULTS_PATH: str = "results/notebooks/05.json"
        """),
        code(SETUP),
        code(POCKET_SETUP),
        code(HYPER_LOAD),
        code("""
        from gistlib.data import EpisodeSampler
        from gistlib.train.evaluate import hyper_prefixes

        TASKS_PER_LEVEL = TASKS_PER_LEVEL or (2 if TIER == "smoke" else 4)
        test_tasks = select(suite["test"], cfg)
        by_level = {}
        for t in test_tasks:
            by_level.setdefault(t.meta["level"], [])
            if len(by_level[t.meta["level"]]) < TASKS_PER_LEVEL:
                by_level[t.meta["level"]].append(t)
        tasks = [t for lvl in sorted(by_level) for t in by_level[lvl]]
        episodes = [ep for i, t in enumerate(tasks)
                    for ep in EpisodeSampler([t], None, 2, seed=SEED + i, num_episodes=EPISODES_PER_TASK).take(EPISODES_PER_TASK)]
        names = [f"{ep.task.split('-')[-1]}/{i % EPISODES_PER_TASK}" for i, ep in enumerate(episodes)]
        task_of = [ep.task for ep in episodes]
        level = [next(t.meta["level"] for t in tasks if t.name == ep.task) for ep in episodes]
        prefixes = hyper_prefixes(hyper, episodes, tok, FMT)
        print(f"{len(tasks)} tasks x {EPISODES_PER_TASK} demo sets -> prefixes (layers, B, kv heads, k, head dim) = "
              f"{tuple(prefixes.keys.shape)}")
        RESULTS["prefix_shape"] = list(prefixes.keys.shape)
        """),
        md("""
        ## Browse a prefix: task, layer, head, keys or values
        """),
        code("""
        from gistlib.course.viz import plot_prefix_slice
        from gistlib.course.widgets import prefix_widget

        plot_prefix_slice(prefixes, row=0, layer=0, head=0, kind="keys")
        """),
        code("""
        prefix_widget(prefixes, names);
        """),
        md("""
        ## Norms per layer
        Keys leave each layer rotated by RoPE but their length is unchanged by the rotation, so norms compare
        layers fairly. The band spans the prefixes of all tasks.
        """),
        code("""
        from gistlib.course.viz import plot_prefix_norms, prefix_norms

        norms = prefix_norms(prefixes)
        RESULTS["key_norm_per_layer"] = norms["keys"].mean(1).tolist()
        RESULTS["value_norm_per_layer"] = norms["values"].mean(1).tolist()
        plot_prefix_norms(prefixes)
        """),
        md("""
        ## Do prefixes of the same task look alike?
        Cosine similarity of the flattened prefixes after removing the mean prefix, ordered by task: a
        hypernetwork that encodes the *task* (and not the particular demos) shows blocks along the diagonal.
        """),
        code("""
        from gistlib.course.viz import plot_similarity, prefix_similarity

        sim = prefix_similarity(prefixes)
        same = torch.tensor([[a == b for b in task_of] for a in task_of])
        off = ~torch.eye(len(task_of), dtype=torch.bool)
        same_task, other_task = float(sim[same & off].mean()), float(sim[~same].mean())
        print(f"mean similarity: same task, other demos {same_task:.3f}; different tasks {other_task:.3f}")
        RESULTS["similarity_same_task"], RESULTS["similarity_other_task"] = same_task, other_task
        plot_similarity(sim, names, title="prefix similarity (centred cosine), ordered by task")
        """),
        code("""
        from gistlib.course.viz import plot_projection, project_2d

        points = project_2d(prefixes)
        RESULTS["projection_shape"] = list(points.shape)
        plot_projection(points, level, title="prefixes, PCA, coloured by level (number of categories)")
        """),
        code("""
        plot_projection(points, [n.split("/")[0] for n in names], title="the same points coloured by task")
        """),
        md("""
        ## Adding demos one at a time
        The hypernetwork reads the first 0, 1, 2, ... demos of one episode. How far is each prefix from the one
        made from all demos (relative distance per layer)? And do more demos give better answers?
        """),
        code("""
        from dataclasses import replace

        from gistlib.train.evaluate import evaluate, with_prefixes
        from gistlib.course.viz import plot_prefix_change, prefix_change, prefixes_by_demo_count

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
        plot_prefix_change(change, counts, title=f"{ep.task}: prefix vs demos read")
        """),
        md("""
        ## The playground
        Make up a task: give each of a few words a symbol, one `word SYMBOL` per line, then ask about other words.
        The words and symbols must come from the pocket vocabulary (below); words of the same category share a
        meaning the base learned, so a symbol given to one word of a category should carry over to the others.
        """),
        code("""
        from gistlib.data.pocket import pocket_world
        from gistlib.course.widgets import format_playground, playground, playground_widget

        world = pocket_world()
        for i, words in enumerate(world["categories"]):
            print(f"category {i}: {' '.join(words)}")
        print("symbols:", " ".join(world["symbols"]))
        cats, syms = world["categories"][:2], world["symbols"][-2:]
        DEMOS = "\\n".join(f"{w} {s}" for s, words in zip(syms, cats) for w in words[:2])
        QUERIES = " ".join(words[-1] for words in cats)
        table = playground(hyper, tok, DEMOS, QUERIES)
        print("\\n" + DEMOS + "\\n")
        print(format_playground(table))
        RESULTS["playground_rows"] = len(table["rows"])
        """),
        code("""
        playground_widget(hyper, tok, DEMOS, QUERIES);
        """),
        code(SAVE),
    ]


def lesson_06():
    return [
        md("""
        # 6. Prefix initialisation

        Goal: test the paper's third finding yourself. Prefix tuning trains a task's prefix directly by gradient
        descent on its demos. Where should it start? From random vectors, from the keys and values of real
        tokens (Li and Liang's recipe), or from the prefix HyperLlama produced for those demos? For each held-out
        episode all three starts are tuned with the same budget of steps; accuracy is measured on the episode's
        queries after 0, 10, 25, ... steps, with 95% bootstrap intervals over episodes.
        """),
        params("""
        TIER: str = "pocket"  # smoke | pocket (the llama2 tier is lesson 7)
        SEED: int = 0
        PREFIX_EPISODES: int = 0  # held-out episodes tuned; 0: the tier's (smoke 6; pocket 120)
        BUDGETS: list = []  # prefix-tuning steps to evaluate at; []: the tier's (smoke [0, 2, 4]; pocket [0, 10, 25, 50, 100, 200])
        PREFIX_LR: float = 0.0  # Adam learning rate on the K/V; 0: the tier's (1e-2)
        RUN_DIR: str = "runs"
        THREADS: int = 0  # torch threads (0: leave as is)
        RESULTS_PATH: str = "results/notebooks/06.json"
        """),
        code(SETUP),
        code(POCKET_SETUP),
        code(HYPER_LOAD),
        code("""
        from gistlib.train.evaluate import hyper_prefixes
        from gistlib.course.pipeline import prefix_ladder

        overrides = {"prefix_episodes": PREFIX_EPISODES or cfg.prefix_episodes,
                     "prefix_budgets": tuple(BUDGETS or cfg.prefix_budgets), "prefix_lr": PREFIX_LR or cfg.prefix_lr}
        ladder_cfg = tier_config(TIER, cache_dir=cfg.cache_dir, **overrides)
        episodes = fixed_episodes(select(suite["test"], cfg), ladder_cfg.prefix_episodes, cfg.queries_per_episode, seed=12345)
        with torch.no_grad():
            start = hyper_prefixes(hyper, episodes, tok, FMT)
        t = time.perf_counter()
        ladder = prefix_ladder(ladder_cfg, hyper, start, episodes, tok)
        print(f"{len(episodes)} episodes x 3 starts x {max(ladder_cfg.prefix_budgets)} steps in {time.perf_counter() - t:.0f} s")
        """),
        code("""
        from gistlib.course.report import plot_prefix_ladder

        summary = {"prefix_tuning": ladder}
        budgets = list(next(iter(ladder.values())))
        print(f"{'start':<12}" + "".join(f"{b + ' steps':>22}" for b in budgets))
        for name, per in ladder.items():
            print(f"{name.removeprefix('prefix_tuning_'):<12}" + "".join(
                f"{per[b]['accuracy']:>8.3f} [{per[b]['ci95'][0]:.2f}, {per[b]['ci95'][1]:.2f}]" for b in budgets))
        RESULTS["ladder"] = {name.removeprefix("prefix_tuning_"): {b: per[b]["accuracy"] for b in budgets}
                             for name, per in ladder.items()}
        plot_prefix_ladder(summary);  # report figures stay open: the semicolon keeps Jupyter from showing it twice
        """),
        md("""
        ## What do these numbers say about the paper's finding?
        The paper reports that HyperLlama prefixes are better starting points for prefix tuning than the usual
        ones. The text below is written from the numbers above (nothing in it is fixed in advance), so it says
        what *your* run shows.
        """),
        code("""
        from IPython.display import Markdown, display

        def at(name, b):
            e = ladder[f"prefix_tuning_{name}"][b]
            return e["accuracy"], e["ci95"][0], e["ci95"][1]

        first, last = budgets[0], budgets[-1]
        others = ("random", "vocab")
        lines = []
        h, h_lo, h_hi = at("hyperllama", first)
        best_other = max(others, key=lambda n: at(n, first)[0])
        o, o_lo, o_hi = at(best_other, first)
        if h_lo > o_hi:
            verdict0, agrees = "starts clearly ahead (the 95% intervals do not overlap)", True
        elif h > o:
            verdict0, agrees = "starts ahead, but the intervals overlap, so this run alone cannot separate them", None
        else:
            verdict0, agrees = "does not start ahead", False
        lines.append(f"- Before any tuning ({first} steps) the HyperLlama prefix scores {h:.2f} [{h_lo:.2f}, {h_hi:.2f}] "
                     f"against {o:.2f} [{o_lo:.2f}, {o_hi:.2f}] for the best other start ({best_other}): it {verdict0}.")

        def steps_to(name, target):
            return next((int(b) for b in budgets if at(name, b)[0] >= target), None)

        target = max(at(n, last)[0] for n in ("hyperllama", *others)) * 0.95
        reach = {n: steps_to(n, target) for n in ("hyperllama", *others)}
        lines.append(f"- Steps to reach {target:.2f} (95% of the best final accuracy): " + ", ".join(
            f"{n} {s if s is not None else f'not within {last}'}" for n, s in reach.items()) + ".")
        hl, hl_lo, _ = at("hyperllama", last)
        ol = max(at(n, last)[0] for n in others)
        lines.append(f"- After {last} steps: HyperLlama start {hl:.2f}, best other start {ol:.2f}"
                     + (" (the gap has closed)." if abs(hl - ol) < 0.02 else "."))
        if agrees is True:
            lines.append("- **This agrees with the paper**: the hypernetwork's prefix is a better initialisation here.")
        elif agrees is False:
            lines.append("- **This does not reproduce the paper's finding** in this run; look at the hypernetwork's "
                         "own accuracy (lesson 4) first: an untrained or weak hypernetwork gives no head start.")
        else:
            lines.append("- **Inconclusive**: more episodes (PREFIX_EPISODES) would narrow the intervals.")
        if TIER == "smoke":
            lines.append("- *Smoke tier: the models are a few steps from random, so these numbers test the code, not the claim.*")
        RESULTS["hyperllama_better_start"] = agrees
        RESULTS["steps_to_target"] = reach
        display(Markdown("\\n".join(lines)))
        """),
        code(SAVE),
    ]


def lesson_07():
    return [
        md("""
        # 7. Llama-2 in 4-bit on a consumer GPU

        Goal: run the same HyperLlama code on a real checkpoint. Llama-2-7B in 4-bit NF4 (double quantisation,
        bfloat16 compute) with LoRA, gradient checkpointing and the two-phase backward fits one 16-24 GB GPU.
        First the memory planner says what fits where; then `gistlib.course.recipes` trains and evaluates on real data
        (P3, Super-NaturalInstructions or Symbol Tuning). **In the smoke and pocket tiers this notebook runs the
        identical code on a tiny random Llama quantised to 4-bit on the CPU** (bitsandbytes runs 4-bit on a CPU):
        the numbers then test the plumbing, not the method. Set `TIER = "llama2"` on a GPU for the real run.
        """),
        params("""
        TIER: str = "pocket"  # smoke | pocket: a tiny 4-bit model on the CPU; llama2: MODEL on a GPU
        SEED: int = 0
        MODEL: str = "meta-llama/Llama-2-7b-hf"  # llama2 tier: any Llama-architecture checkpoint (name or folder)
        RECIPE: str = "symbol"  # p3 | sni | symbol (gistlib.course.recipes)
        STEPS: int = 0  # training steps; 0: llama2 the recipe's (5000), pocket 40, smoke the tiny recipe's (3)
        RUN_DIR: str = "runs"
        THREADS: int = 0  # torch threads (0: leave as is)
        RESULTS_PATH: str = "results/notebooks/07.json"
        """),
        code(SETUP),
        md("""
        ## Memory planning
        Estimated peak memory of one training step (hypernetwork pass over 1,024 tokens plus a downstream pass
        over 384, k = 16, LoRA r = 8), in GiB, and which cards it fits. Formulas in `gistlib/memory.py`; they are
        checked against measured tensor bytes in the tests.
        """),
        code("""
        from IPython.display import Markdown, display

        from gistlib.models.memory import LLAMA2_13B, LLAMA2_7B, estimate_memory, planner_table

        display(Markdown(planner_table([LLAMA2_7B, LLAMA2_13B])))
        est = estimate_memory(LLAMA2_7B)
        RESULTS["llama2_7b_nf4_estimate_gib"] = round(est.gib()["total"], 2)
        print({k: round(v, 2) for k, v in est.gib().items()})
        """),
        md("""
        ## The model
        In the llama2 tier the checkpoint is `MODEL` (gated on the Hub: accept the licence and log in first);
        otherwise a tiny random Llama with a tokenizer trained on the recipe's texts is written to disk and loaded
        through exactly the same `load_llama(path, quantization="nf4")`.
        """),
        code("""
        from dataclasses import replace

        from gistlib.course.recipes import (build_tiny_checkpoint, format_result, get_recipe, load_recipe_tasks, run_recipe,
                                     task_texts, tiny_recipe)

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
            recipe = replace(recipe, train=replace(recipe.train, steps=STEPS, warmup_steps=min(recipe.train.warmup_steps, STEPS)))
        print(f"recipe {recipe.name}: model {recipe.model}, quantization {recipe.quantization}, "
              f"k={recipe.hyper.num_gist_tokens}, {recipe.train.steps} steps")
        """),
        code("""
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
        """),
        md("""
        ## Train and evaluate
        `run_recipe` loads the model with `load_llama`, wraps it as a HyperLlama (LoRA, gist table), trains with
        `gistlib.train.loop.train` (checkpoints, resume) and evaluates on held-out tasks. `check_frozen` compares every
        base tensor, the quantised ones included, before and after (cheap for the tiny model only).
        """),
        code("""
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = run_recipe(recipe, OUT, check_frozen=TIER != "llama2", resume=False)
        print(format_result(result))
        print(f"{time.perf_counter() - t:.0f} s")
        if DEVICE == "cuda":
            RESULTS["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"peak GPU memory {RESULTS['peak_gpu_gib']:.2f} GiB (planner estimate for 7B: {RESULTS['llama2_7b_nf4_estimate_gib']} GiB)")
        RESULTS["final_loss"] = result["final_loss"]
        RESULTS["base_frozen"] = result["base_frozen"]
        RESULTS["eval_metric"], RESULTS["eval_mean"] = result["eval"]["metric"], result["eval"]["mean"]
        RESULTS["steps"] = len(result["train"])
        """),
        code("""
        from gistlib.course.viz import plot_loss_curves

        plot_loss_curves({recipe.name: result["train"]}, title=f"{recipe.name} recipe, {Path(recipe.model).name}")
        """),
        md("""
        **Take-away.** Nothing in the HyperLlama code knows whether the base is a 1M-parameter toy or a 4-bit
        7B model: the tiers differ in the checkpoint and the sizes. On a GPU, `TIER="llama2"` trains the real thing
        for hours; `python -m gistlib.models.memory` prints the planner for other settings.
        """),
        code(SAVE),
    ]


LESSONS = {
    "01_gist_masks": lesson_01,
    "02_gisting": lesson_02,
    "03_attention_maps": lesson_03,
    "04_training_hyperllama": lesson_04,
    "05_inspecting_prefixes": lesson_05,
    "06_prefix_initialisation": lesson_06,
    "07_llama2_4bit": lesson_07,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = LESSONS[name]()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding gives byte-identical files
        cell["id"] = f"{name[:2]}-{i:02d}"
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name in LESSONS:
        path = HERE / f"{name}.ipynb"
        nbformat.write(build(name), path)
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
