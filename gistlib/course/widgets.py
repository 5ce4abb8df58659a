"""Thin ipywidgets wrappers over `gistlib.course.viz`, and the playground.

Every widget here is a set of controls over a plain function that a notebook (and a test) calls once
first: an exception inside a widget callback only prints, it does not fail papermill.

    mask_widget(ids, gist_ids, labels)          pick gist / causal / positive / negative control
    attention_widget(attn, labels)              pick layer and head
    prefix_widget(prefix, names)                pick task row, layer, kv head, keys or values
    playground(hyper, tok, demos, queries)      -> dict: HyperLlama's answers next to ICL's and zero-shot's
    playground_widget(hyper, tok)               text boxes for demos ("word SYMBOL" per line) and queries
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch

from gistlib.core.masks import make_causal_mask, make_gist_mask, negative_control_mask
from gistlib.course.viz import plot_attention, plot_mask, plot_prefix_slice
from gistlib.data import COMPACT, Episode, Example, RenderFormat, collate, render_hyper_input
from gistlib.train.evaluate import Method, choice_scores, icl, with_prefixes, zero_shot

__all__ = [
    "MASKS",
    "mask_for",
    "mask_widget",
    "attention_widget",
    "prefix_widget",
    "parse_demos",
    "predict_choices",
    "playground",
    "format_playground",
    "playground_widget",
]

MASKS = ("gist", "causal (positive control)", "negative control")


def mask_for(kind: str, input_ids: torch.Tensor, gist_ids: Sequence[int], pad_token_id: int | None = None):
    """The boolean mask (B, 1, L, L) of one of `MASKS` for `input_ids`."""
    if kind == "gist":
        return make_gist_mask(input_ids, gist_ids, pad_token_id)
    if kind.startswith("causal"):
        return make_causal_mask(input_ids, pad_token_id)
    if kind.startswith("negative"):
        return negative_control_mask(input_ids, gist_ids, pad_token_id)
    raise ValueError(f"unknown mask {kind!r}: choose one of {MASKS}")


def _figure_png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _interact(fn, **controls):
    """Controls (as `ipywidgets.interact` abbreviations) over `fn(**values) -> Figure`, shown as a PNG.

    Not `interact` itself: its Output widget captures the figure with `clear_output`, a message pattern
    that can leave papermill/nbclient waiting forever (nbclient#312, papermill#723). An Image widget
    whose value is replaced needs no output capture at all.
    """
    import ipywidgets
    from IPython.display import display

    widgets = {}
    for name, abbrev in controls.items():
        widget = ipywidgets.interactive.widget_from_abbrev(abbrev)
        widget.description = name
        widgets[name] = widget
    image = ipywidgets.Image(format="png")

    def refresh(_=None):
        image.value = _figure_png(fn(**{name: w.value for name, w in widgets.items()}))

    for w in widgets.values():
        w.observe(refresh, names="value")
    refresh()
    box = ipywidgets.VBox([*widgets.values(), image])
    display(box)
    return box


def mask_widget(
    input_ids: torch.Tensor,
    gist_ids: Sequence[int],
    labels: Sequence[str] | Sequence[Sequence[str]] | None = None,
    pad_token_id: int | None = None,
):
    """Dropdown over the three masks and a row slider, each drawn with `plot_mask`.

    labels: one list of token labels per row (or one list, for row 0 only)."""
    import ipywidgets

    per_row = labels is not None and len(labels) > 0 and not isinstance(labels[0], str)

    def show(kind=MASKS[0], row=0):
        row_labels = labels[row] if per_row else (labels if row == 0 else None)
        return plot_mask(
            mask_for(kind, input_ids, gist_ids, pad_token_id),
            row_labels,
            title=f"{kind} mask, row {row}",
            row=row,
        )

    return _interact(show, kind=list(MASKS), row=ipywidgets.IntSlider(0, 0, input_ids.shape[0] - 1))


def attention_widget(attn: torch.Tensor, labels: Sequence[str] | None = None, row: int = 0):
    """Sliders for layer and head over `plot_attention` (attn: (n, B, H, L, L) from `viz.attention_maps`)."""
    import ipywidgets

    n, _, H = attn.shape[:3]

    def show(layer=0, head=0):
        return plot_attention(attn, layer, head, labels, row=row)

    return _interact(show, layer=ipywidgets.IntSlider(0, 0, n - 1), head=ipywidgets.IntSlider(0, 0, H - 1))


def most_distinct_layer(prefix) -> int:
    """The layer whose prefixes differ most between rows (tasks): the variance over rows of the layer's K/V,
    relative to their mean square. Layer 0 is the flattest: its gist keys and values depend only on the gist
    embeddings, never on the demos (the gist tokens attend to the demos only from layer 0's output on)."""
    kv = torch.cat([prefix.keys, prefix.values], dim=-1).float()  # (n, B, H, k, 2 hd)
    flat = kv.flatten(2)  # (n, B, D)
    spread = flat.var(dim=1, unbiased=False).mean(-1) / flat.pow(2).mean((1, 2)).clamp_min(1e-12)
    return int(spread.argmax()) if prefix.batch_size > 1 else prefix.keys.shape[0] - 1


def prefix_widget(prefix, names: Sequence[str] | None = None):
    """Task (row), layer, kv head and keys/values over `plot_prefix_slice`; it opens at `most_distinct_layer`."""
    import ipywidgets

    n, B, H = prefix.keys.shape[:3]
    rows = [(names[i] if names else str(i), i) for i in range(B)]

    def show(row=0, layer=0, head=0, kind="keys"):
        title = f"{kind}: {rows[row][0]}, layer {layer}, kv head {head}"
        return plot_prefix_slice(prefix, row, layer, head, kind, title=title)

    return _interact(
        show,
        row=ipywidgets.Dropdown(options=rows, value=0),
        layer=ipywidgets.IntSlider(most_distinct_layer(prefix), 0, n - 1),
        head=ipywidgets.IntSlider(0, 0, H - 1, disabled=H == 1),
        kind=["keys", "values"],
    )


# --- the playground ------------------------------------------------------------------------------


def parse_demos(text: str) -> list[tuple[str, str]]:
    """Lines `word SYMBOL` (blank lines and `#` comments skipped) -> [(word, SYMBOL)].

    A line needs exactly two fields; anything else raises ValueError naming the line.
    """
    pairs = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"demo line {no} {line!r}: write one input word and one output symbol, e.g. 'bafo KE'")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError("no demos: write at least one line 'word SYMBOL'")
    return pairs


@torch.no_grad()
def predict_choices(method: Method, episode: Episode, tokenizer, fmt: RenderFormat) -> list[dict[str, float]]:
    """For each query of `episode` (index 0 of the method's prefixes): the probability of every choice,
    normalised over the choices from the summed token log-probabilities (rank classification)."""
    scores = choice_scores(method, [(0, episode, q) for q in episode.queries], tokenizer, fmt)
    return [dict(zip(q.choices, s.softmax(0).tolist())) for q, s in zip(episode.queries, scores)]


@torch.no_grad()
def playground(
    hyper, tokenizer, demos: str | Sequence[tuple[str, str]], queries: str | Sequence[str], fmt: RenderFormat = COMPACT
) -> dict:
    """Your own task: HyperLlama's answers next to in-context learning's and zero-shot's.

    demos: lines `word SYMBOL` (or pairs); queries: words (a string is split on whitespace/commas).
    The choices are the symbols in your demos. Words the tokenizer does not know become `<unk>`
    (reported in `unknown_words`). Returns {"choices", "unknown_words", "rows": [{"query",
    "hyperllama", "icl", "zero_shot", "p_hyperllama", "p_icl", "p_zero_shot"}]}.
    """
    pairs = parse_demos(demos) if isinstance(demos, str) else [tuple(p) for p in demos]
    words = queries.replace(",", " ").split() if isinstance(queries, str) else list(queries)
    if not words:
        raise ValueError("no queries: write at least one word")
    choices = sorted({y for _, y in pairs})
    episode = Episode(
        "playground", [Example(x, y, choices) for x, y in pairs], [Example(w, choices[0], choices) for w in words]
    )
    vocab = tokenizer.get_vocab()
    unknown = sorted({w for w in [*(x for x, _ in pairs), *choices, *words] if w not in vocab})
    gist_ids = hyper.gist_ids.tolist()
    h = collate([render_hyper_input(episode, tokenizer, gist_ids, fmt)], tokenizer.pad_token_id, padding_side="left")
    hyper.eval()
    prefix = hyper.make_prefix(h["input_ids"], h["attention_mask"])
    with hyper.downstream_mode():
        base = hyper.base
        methods = {
            "hyperllama": with_prefixes("hyperllama", base, prefix, tokenizer, fmt),
            "icl": icl(base, tokenizer, fmt),
            "zero_shot": zero_shot(base, tokenizer, fmt),
        }
        probs = {name: predict_choices(m, episode, tokenizer, fmt) for name, m in methods.items()}
    rows = []
    for i, w in enumerate(words):
        row = {"query": w}
        for name, per in probs.items():
            best = max(per[i], key=per[i].get)
            row[name], row[f"p_{name}"] = best, per[i][best]
        rows.append(row)
    return {"choices": choices, "unknown_words": unknown, "rows": rows}


def format_playground(result: dict) -> str:
    """The playground's result as a small text table."""
    lines = [f"choices: {' '.join(result['choices'])}"]
    if result["unknown_words"]:
        lines.append(f"unknown to the tokenizer (read as <unk>): {' '.join(result['unknown_words'])}")
    lines.append(f"{'query':<10} {'hyperllama':>16} {'icl':>16} {'zero-shot':>16}")
    for r in result["rows"]:
        cells = [f"{r[m]} ({r['p_' + m]:.2f})" for m in ("hyperllama", "icl", "zero_shot")]
        lines.append(f"{r['query']:<10} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def playground_widget(hyper, tokenizer, demos: str = "", queries: str = "", fmt: RenderFormat = COMPACT):
    """Text areas for demos and queries and a button; prints `format_playground(playground(...))`."""
    import ipywidgets
    from IPython.display import display

    demo_box = ipywidgets.Textarea(value=demos, description="demos", layout=ipywidgets.Layout(height="140px"))
    query_box = ipywidgets.Text(value=queries, description="queries")
    button = ipywidgets.Button(description="ask")
    out = ipywidgets.HTML()  # not an Output widget: see `_interact`

    def run(_=None):
        try:
            text = format_playground(playground(hyper, tokenizer, demo_box.value, query_box.value, fmt))
        except ValueError as e:  # the learner's typing, not a bug: say what is wrong
            text = f"error: {e}"
        out.value = "<pre>" + html.escape(text) + "</pre>"

    button.on_click(run)
    box = ipywidgets.VBox([demo_box, query_box, button, out])
    display(box)
    run()
    return box
