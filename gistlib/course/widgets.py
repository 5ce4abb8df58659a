"""Thin ipywidgets wrappers over `gistlib.course.viz`, and the playground.

Every widget here is a set of controls over a plain function that a notebook (and a test) calls once
first: an exception inside a widget callback only prints, it does not fail papermill.

    mask_widget(ids, gist_ids, labels)          pick gist / causal / positive / negative control, and the row
    attention_widget(attn, labels)              pick layer and head (a note when the maps look alike)
    prefix_widget(prefix, names)                pick task row, layer, kv head, keys or values (as they are, or minus
                                                the mean over rows); opens where the rows differ most
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
    "PREFIX_VIEWS",
    "VISIBLE",
    "mask_for",
    "mask_widget",
    "attention_spread",
    "attention_widget",
    "most_distinct_layer",
    "row_spread",
    "centred",
    "prefix_widget",
    "example_demo",
    "parse_demos",
    "predict_choices",
    "playground",
    "format_playground",
    "playground_widget",
]

MASKS = ("gist", "causal (positive control)", "negative control")
PREFIX_VIEWS = ("keys", "values", "keys minus the mean over rows", "values minus the mean over rows")
# a difference under this share of a colour scale is too small to see (about 13 of 255 colour levels)
VISIBLE = 0.05
NOTE_CLASS = "gistlib-note"  # the HTML class of a widget's note (tests/test_browser.py looks for it)


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


def _interact(fn, note: str = "", **controls):
    """Controls (as `ipywidgets.interact` abbreviations) over `fn(**values) -> Figure`, shown as a PNG, with an
    optional `note` (HTML) between the controls and the picture.

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
    # at its own size: a VBox stretches its children to its width, which would enlarge a small figure's text
    image = ipywidgets.Image(format="png", layout=ipywidgets.Layout(align_self="flex-start"))

    def refresh(_=None):
        image.value = _figure_png(fn(**{name: w.value for name, w in widgets.items()}))

    for w in widgets.values():
        w.observe(refresh, names="value")
    refresh()
    notes = [ipywidgets.HTML(note).add_class(NOTE_CLASS)] if note else []
    box = ipywidgets.VBox([*widgets.values(), *notes, image])
    display(box)
    return box


def mask_widget(
    input_ids: torch.Tensor,
    gist_ids: Sequence[int],
    labels: Sequence[str] | Sequence[Sequence[str]] | None = None,
    pad_token_id: int | None = None,
):
    """Dropdown over the three masks and a row slider, each drawn with `plot_mask`.

    labels: one list of token labels per row (`viz.token_labels` of each row), or one list shared by every row."""
    import ipywidgets

    per_row = labels is not None and len(labels) > 0 and not isinstance(labels[0], str)
    if per_row and len(labels) != input_ids.shape[0]:
        raise ValueError(f"{len(labels)} lists of labels for {input_ids.shape[0]} rows: give one per row")

    def show(kind=MASKS[0], row=0):
        row_labels = labels[row] if per_row else labels
        return plot_mask(
            mask_for(kind, input_ids, gist_ids, pad_token_id),
            row_labels,
            title=f"{kind} mask, row {row}",
            row=row,
        )

    return _interact(show, kind=list(MASKS), row=ipywidgets.IntSlider(0, 0, input_ids.shape[0] - 1))


def attention_spread(attn: torch.Tensor, row: int = 0) -> dict[str, float]:
    """How far apart the maps of one row are (attn: (n, B, H, L, L)), in probability, the unit of the colour scale:
    `layers`, the largest difference between two layers' maps of the same head; `heads`, between two heads' maps
    of the same layer (0.0 where there is only one)."""
    a = attn[:, row].float()  # (n, H, L, L)

    def widest(x: torch.Tensor, dim: int) -> float:
        return float((x.amax(dim) - x.amin(dim)).max()) if x.shape[dim] > 1 else 0.0

    return {"layers": widest(a, 0), "heads": widest(a, 1)}


def attention_widget(attn: torch.Tensor, labels: Sequence[str] | None = None, row: int = 0):
    """Sliders for layer and head over `plot_attention` (attn: (n, B, H, L, L) from `viz.attention_maps`).

    When the maps of different layers or heads differ by less than `VISIBLE` of the colour scale, a note says so:
    moving that slider redraws a picture that looks the same (a model a few steps from random attends almost
    uniformly to what it may see)."""
    import ipywidgets

    n, _, H = attn.shape[:3]
    spread = attention_spread(attn, row)
    alike = [
        f"{what} (at most {spread[what]:.3f})"
        for what, count in (("layers", n), ("heads", H))
        if count > 1 and spread[what] < VISIBLE
    ]
    note = ""
    if alike:
        note = (
            f"<b>Note:</b> in this model the maps of different {' and of different '.join(alike)} differ by less "
            f"than {VISIBLE:.0%} of the colour scale, too little to see: its attention is close to uniform over the "
            "keys each query may see, as in a model a few steps from random (the smoke tier). The attention sums "
            "below still show exactly where it goes."
        )

    def show(layer=0, head=0):
        return plot_attention(attn, layer, head, labels, row=row)

    return _interact(show, note=note, layer=ipywidgets.IntSlider(0, 0, n - 1), head=ipywidgets.IntSlider(0, 0, H - 1))


def most_distinct_layer(prefix) -> int:
    """The layer whose prefixes differ most between rows (tasks): the variance over rows of the layer's K/V,
    relative to their mean square. Layer 0 is the flattest: its gist keys and values are projections of the gist
    embeddings alone, made before any attention has read the demos (which reach them from layer 1 on)."""
    kv = torch.cat([prefix.keys, prefix.values], dim=-1).float()  # (n, B, H, k, 2 hd)
    flat = kv.flatten(2)  # (n, B, D)
    spread = flat.var(dim=1, unbiased=False).mean(-1) / flat.pow(2).mean((1, 2)).clamp_min(1e-12)
    return int(spread.argmax()) if prefix.batch_size > 1 else prefix.keys.shape[0] - 1


def centred(prefix):
    """The prefix minus its mean over rows (tasks), in every layer: what is specific to each row."""
    from gistlib.core.prefix import Prefix

    return Prefix(prefix.keys - prefix.keys.mean(1, keepdim=True), prefix.values - prefix.values.mean(1, keepdim=True))


def row_spread(prefix, layer: int, kind: str = "keys") -> float:
    """How different two rows' pictures of `layer` look in `plot_prefix_slice` (every kv head): the largest
    difference between two rows' slices, each scaled to its own colour scale [-1, 1], as a share of that range."""
    t = getattr(prefix, kind)[layer].float()  # (B, H, k, hd)
    scaled = t / t.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return float((scaled.amax(0) - scaled.amin(0)).max()) / 2


def prefix_widget(prefix, names: Sequence[str] | None = None):
    """Task (row), layer, kv head and view over `plot_prefix_slice`.

    It opens at `most_distinct_layer`, showing the keys as they are if the rows' pictures differ visibly there
    (`row_spread` at least `VISIBLE`), else the keys minus the mean over rows, where what is specific to each
    row shows. With one key/value head there is no head slider. A note says why layer 0 is flat."""
    import ipywidgets

    n, B, H = prefix.keys.shape[:3]
    rows = [(names[i] if names else str(i), i) for i in range(B)]
    views = {"keys": prefix, "values": prefix}
    views.update(dict.fromkeys(PREFIX_VIEWS[2:], centred(prefix)))
    layer = most_distinct_layer(prefix)
    spread = row_spread(prefix, layer)
    view = PREFIX_VIEWS[0] if spread >= VISIBLE or B == 1 else PREFIX_VIEWS[2]

    def show(row=0, layer=layer, head=0, view=view):
        kind = "keys" if view.startswith("keys") else "values"
        title = f"{view}: {rows[row][0]}, layer {layer}" + (f", kv head {head}" if H > 1 else "")
        return plot_prefix_slice(views[view], row, layer, head, kind, title=title)

    note = (
        f"Opened at layer {layer}, where the rows differ most. Layer 0 is the same for every row: a gist token's "
        "key and value there are projections of its own embedding, made before any attention has read the demos "
        "(the demos reach the gists' keys and values from layer 1 on), so its picture cannot change with the task."
    )
    if view != PREFIX_VIEWS[0]:
        note += (
            f" As they are, the rows' keys in layer {layer} differ by at most {spread:.0%} of the colour scale, too "
            "little to see (a barely trained hypernetwork, as in the smoke tier): the view subtracts the mean over "
            "rows, leaving what is specific to each."
        )
    if H == 1:
        note += " This model has one key/value head, so there is no head to pick."
    controls = {"row": ipywidgets.Dropdown(options=rows, value=0), "layer": ipywidgets.IntSlider(layer, 0, n - 1)}
    if H > 1:
        controls["head"] = ipywidgets.IntSlider(0, 0, H - 1)
    wide = ipywidgets.Layout(width="340px")  # the longest view's name in full
    controls["view"] = ipywidgets.Dropdown(options=list(PREFIX_VIEWS), value=view, layout=wide)
    return _interact(show, note=note, **controls)


# --- the playground ------------------------------------------------------------------------------


def example_demo() -> str:
    """A demo line of words the pocket tokenizer knows: a word of the first category and the first symbol."""
    from gistlib.data.pocket import pocket_world

    world = pocket_world()
    return f"{world['categories'][0][0]} {world['symbols'][0]}"


def parse_demos(text: str) -> list[tuple[str, str]]:
    """Lines `word SYMBOL` (blank lines and `#` comments skipped) -> [(word, SYMBOL)].

    A line needs exactly two fields; anything else raises ValueError naming the line (with `example_demo`).
    """
    pairs = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"demo line {no} {line!r}: write one input word and one output symbol, e.g. {example_demo()!r}"
            )
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"no demos: write at least one line 'word SYMBOL', e.g. {example_demo()!r}")
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
