"""The plain functions behind the notebooks' pictures and widgets: shapes and values, not looks."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import GIST_IDS, PAD  # noqa: E402

from gistlib.core.hyper import HyperConfig, HyperLlama  # noqa: E402
from gistlib.core.masks import make_causal_mask, make_gist_mask, negative_control_mask  # noqa: E402
from gistlib.core.prefix import Prefix  # noqa: E402
from gistlib.course import viz  # noqa: E402
from gistlib.data import COMPACT, Episode, Example, pocket_tokenizer  # noqa: E402
from gistlib.models.tiny import build_tiny_llama, gist_token_ids  # noqa: E402

# [BOS] a b c G G q r, and a second row with one left pad
ROWS = torch.tensor([[1, 5, 6, 7, 60, 61, 8, 9], [PAD, 1, 5, 6, 60, 61, 8, 9]])
GISTS = GIST_IDS[:2]


def test_plot_mask_image_is_the_mask():
    mask = make_gist_mask(ROWS, GISTS, PAD)
    for row in (0, 1):
        fig = viz.plot_mask(mask, labels=[str(i) for i in range(8)], row=row)
        data = torch.tensor(fig.axes[0].images[0].get_array())
        assert torch.equal(data.bool(), mask[row, 0])
    fig = viz.plot_mask(mask[0, 0])  # a plain (L, L) mask too
    assert fig.axes[0].images[0].get_array().shape == (8, 8)


def test_attention_maps_shape_and_rows_sum_to_one(tiny_models):
    model = tiny_models["eager"]
    mask = make_causal_mask(ROWS, PAD)
    attn = viz.attention_maps(model, ROWS, mask, attention_mask=(ROWS != PAD).long())
    n, H = model.config.num_hidden_layers, model.config.num_attention_heads
    assert attn.shape == (n, 2, H, 8, 8)
    torch.testing.assert_close(attn.sum(-1), torch.ones(n, 2, H, 8))
    assert float(attn[:, 1, :, 1:, 0].abs().max()) == 0.0  # nobody but the pad itself looks at the pad


def test_attention_after_gists_is_zero_on_hidden_keys(tiny_models):
    """Under the gist mask, queries after the gists put exactly zero probability before the gists."""
    attn = viz.attention_maps(tiny_models["eager"], ROWS[:1], make_gist_mask(ROWS[:1], GISTS, PAD))
    after, before = slice(6, 8), slice(0, 4)  # q r | BOS a b c
    assert float(viz.attention_mass(attn, after, before).max()) == 0.0
    torch.testing.assert_close(viz.attention_mass(attn, after, slice(4, 8)), torch.ones(2, 1, 4, 2))
    # the negative control hides the gists as well
    neg = viz.attention_maps(tiny_models["eager"], ROWS[:1], negative_control_mask(ROWS[:1], GISTS, PAD))
    assert float(viz.attention_mass(neg, after, slice(0, 6)).max()) == 0.0
    fig = viz.plot_attention(attn, layer=1, head=3, labels=list("sabcGGqr"))
    assert torch.equal(torch.tensor(fig.axes[0].images[0].get_array()), attn[1, 0, 3])


def test_attention_maps_refuses_sdpa(tiny_models):
    with pytest.raises(ValueError, match="eager"):
        viz.attention_maps(tiny_models["sdpa"], ROWS, make_causal_mask(ROWS, PAD))


def _prefix(B=6, n=2, H=2, k=3, hd=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Prefix(torch.randn(n, B, H, k, hd, generator=g), torch.randn(n, B, H, k, hd, generator=g))


def test_prefix_norms_and_similarity():
    p = _prefix()
    norms = viz.prefix_norms(p)
    assert norms["keys"].shape == norms["values"].shape == (2, 6)
    torch.testing.assert_close(norms["keys"][1, 2], p.keys[1, 2].norm(dim=-1).mean())
    assert viz.prefix_vectors(p).shape == (6, 2 * 2 * 2 * 3 * 4)
    assert viz.prefix_vectors(p, "keys", layer=0).shape == (6, 2 * 3 * 4)
    sim = viz.prefix_similarity(p)
    assert sim.shape == (6, 6)
    torch.testing.assert_close(sim.diagonal(), torch.ones(6))
    torch.testing.assert_close(sim, sim.T)
    # two rows that are the same prefix are maximally similar
    twin = Prefix.cat([p, p.rows([0])])
    assert float(viz.prefix_similarity(twin)[0, -1]) == pytest.approx(1.0, abs=1e-5)
    assert viz.plot_similarity(sim, labels=list("abcdef")).axes[0].images[0].get_array().shape == (6, 6)
    assert len(viz.plot_prefix_norms(p).axes[0].lines) == 2
    with pytest.raises(ValueError):
        viz.prefix_vectors(p, "queries")


def test_project_2d_finds_the_main_direction():
    # rows spread along one direction: PC 1 carries it, PC 2 is near zero
    direction = torch.randn(2, 1, 1, 3, 4)
    scale = torch.arange(6.0).view(1, 6, 1, 1, 1)
    p = Prefix(direction * scale, torch.zeros(2, 6, 1, 3, 4))
    pts = viz.project_2d(p)
    assert pts.shape == (6, 2)
    assert float(pts[:, 1].abs().max()) < 1e-4 * float(pts[:, 0].abs().max())
    assert abs(torch.corrcoef(torch.stack([pts[:, 0], scale.flatten()]))[0, 1]) == pytest.approx(1.0, abs=1e-5)
    fig = viz.plot_projection(pts, ["x", "x", "y", "y", "z", "z"])
    assert len(fig.axes[0].collections) == 3  # one scatter per group
    many = viz.plot_projection(torch.randn(24, 2), [f"task{i}" for i in range(12)] * 2)
    colours = {tuple(c.get_facecolor()[0]) for c in many.axes[0].collections}
    assert len(colours) == 12, "groups beyond ten must not share a colour"


def test_prefix_slice_and_change():
    p = _prefix()
    s = viz.prefix_slice(p, row=3, layer=1, head=0, kind="values")
    assert torch.equal(s, p.values[1, 3, 0])
    fig = viz.plot_prefix_slice(p, 3, 1, 0, "values")
    assert torch.equal(torch.tensor(fig.axes[0].images[0].get_array()), s)
    change = viz.prefix_change(p)
    assert change.shape == (2, 6)
    assert float(change[:, -1].abs().max()) == 0.0  # the reference against itself
    expected = (
        torch.cat([p.keys[0, 0].flatten(), p.values[0, 0].flatten()])
        - torch.cat([p.keys[0, 5].flatten(), p.values[0, 5].flatten()])
    ).norm() / torch.cat([p.keys[0, 5].flatten(), p.values[0, 5].flatten()]).norm()
    torch.testing.assert_close(change[0, 0], expected)
    assert len(viz.plot_prefix_change(change, [0, 1, 2, 3, 4, 5]).axes[0].lines) == 2


def test_loss_curves_draw_every_run():
    logs = {
        "a": [{"step": s, "loss": 3.0 / s} for s in range(1, 21)],
        "b": [{"step": s, "loss": 2.0 / s, **({"eval": 0.1 * s} if s % 5 == 0 else {})} for s in range(1, 11)],
    }
    fig = viz.plot_loss_curves(logs)
    assert len(fig.axes[0].lines) == 2 and len(fig.axes) == 2  # eval scores on a twin axis
    smooth = viz.plot_loss_curves(logs, smooth=5)
    assert len(smooth.axes[0].lines[0].get_xdata()) == 16


def test_token_labels():
    tok = pocket_tokenizer(4)
    gists = gist_token_ids(tok)
    ids = [tok.bos_token_id, *tok("bafo ->")["input_ids"], *gists[:2], tok.pad_token_id]
    labels = viz.token_labels(tok, ids, gists)
    assert labels[-3:] == ["[G0]", "[G1]", "_"] and len(labels) == len(ids)


@pytest.fixture(scope="module")
def pocket_hyper():
    tok = pocket_tokenizer(16)
    base = build_tiny_llama(
        tokenizer=tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0
    )
    return HyperLlama(base, gist_token_ids(tok)[:2], HyperConfig(num_gist_tokens=2)), tok


def test_prefixes_by_demo_count(pocket_hyper):
    hyper, tok = pocket_hyper
    words = sorted(w for w in tok.get_vocab() if w.islower() and w.isalpha())[:6]
    ep = Episode("t", [Example(w, "KE", ["KE"]) for w in words[:4]], [Example(words[5], "KE", ["KE"])])
    p = viz.prefixes_by_demo_count(hyper, ep, tok, COMPACT, [0, 1, 2, 4])
    assert p.keys.shape == (2, 4, 1, 2, 16)
    full = hyper.make_prefix(*_hyper_row(hyper, ep, tok))
    torch.testing.assert_close(p.keys[:, -1:], full.keys, atol=1e-5, rtol=1e-5)  # 4 demos = all demos


def _hyper_row(hyper, ep, tok):
    from gistlib.data import collate, render_hyper_input

    b = collate([render_hyper_input(ep, tok, hyper.gist_ids.tolist(), COMPACT)], tok.pad_token_id, padding_side="left")
    return b["input_ids"], b["attention_mask"]


def test_playground_table(pocket_hyper):
    from gistlib.course.widgets import format_playground, parse_demos, playground

    hyper, tok = pocket_hyper
    symbols = sorted(w for w in tok.get_vocab() if w.isupper() and w.isalpha() and len(w) == 2)[:2]
    words = sorted(w for w in tok.get_vocab() if w.islower() and w.isalpha())[:5]
    demos = "\n".join(f"{w} {symbols[i % 2]}" for i, w in enumerate(words[:4])) + "\n# a comment\n"
    res = playground(hyper, tok, demos, f"{words[4]}, zzzz")
    assert res["choices"] == sorted(symbols)
    assert res["unknown_words"] == ["zzzz"]
    assert [r["query"] for r in res["rows"]] == [words[4], "zzzz"]
    for r in res["rows"]:
        for m in ("hyperllama", "icl", "zero_shot"):
            assert r[m] in symbols and 0.5 <= r[f"p_{m}"] <= 1.0  # the best of two choices
    assert "hyperllama" in format_playground(res)
    with pytest.raises(ValueError, match="line 2"):
        parse_demos("bafo KE\nonly-one-field")
    # the adapters are back on after the playground (downstream_mode is a context)
    assert any(p.requires_grad for p in hyper.parameters())


def test_accuracy_by_group_and_read_metrics(tmp_path):
    assert viz.accuracy_by_group([1, 0, 0.5, 1], ["C4", "C2", "C4", "C2"]) == {"C2": 0.5, "C4": 0.75}
    with pytest.raises(ValueError):
        viz.accuracy_by_group([1], ["a", "b"])
    assert viz.read_metrics(tmp_path / "none.jsonl") == []
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert [r["loss"] for r in viz.read_metrics(tmp_path / "m.jsonl")] == [2.0, 1.5]


def test_the_prefix_widget_opens_where_tasks_differ():
    """Layer 0's gist K/V depend on the gist embeddings only: the same for every task, so the widget opens elsewhere."""
    from gistlib.core.prefix import Prefix
    from gistlib.course.widgets import most_distinct_layer

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(4, 3, 2, 5, 8, generator=g), torch.randn(4, 3, 2, 5, 8, generator=g)
    keys[0], values[0] = keys[0, :1].clone(), values[0, :1].clone()  # layer 0: every row the same
    keys[3], values[3] = keys[3] * 1e-3, values[3] * 1e-3  # tiny but distinct: relative spread counts
    keys[1, 1] += 10.0  # one task far from the others in layer 1
    assert most_distinct_layer(Prefix(keys, values)) == 1
    keys[1, 1] -= 10.0
    assert most_distinct_layer(Prefix(keys, values)) != 0


def _texts_below(fig, points: float) -> list[tuple[str, float]]:
    """Every visible piece of text in `fig` set smaller than `points`."""
    from matplotlib.text import Text

    fig.canvas.draw()  # tick labels exist once drawn
    found = [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return [(text, size) for text, size in found if size < points]


def test_figure_text_is_readable():
    """No text in the lessons' figures under viz.SMALL_FONT points (10-11 px at the notebooks' 90-100 dpi)."""
    mask = make_gist_mask(ROWS, GISTS, PAD)
    p = _prefix(B=6)
    attn = torch.rand(2, 1, 2, 8, 8).softmax(-1)
    figures = {
        "mask": viz.plot_mask(mask, labels=list("sabcGGqr")),
        "attention": viz.plot_attention(attn, labels=list("sabcGGqr")),
        "norms": viz.plot_prefix_norms(p),
        "similarity": viz.plot_similarity(viz.prefix_similarity(p), labels=list("abcdef")),
        "projection": viz.plot_projection(viz.project_2d(p), list("aabbcc"), names=list("abcdef")),
        "slice": viz.plot_prefix_slice(p),
        "change": viz.plot_prefix_change(viz.prefix_change(p), list(range(6))),
        "loss": viz.plot_loss_curves({"a": [{"step": i, "loss": 1 / (i + 1), "eval": 0.5} for i in range(5)]}),
    }
    small = {name: _texts_below(fig, viz.SMALL_FONT) for name, fig in figures.items()}
    assert not any(small.values()), {k: v for k, v in small.items() if v}


def test_attention_spread_and_its_note():
    """Maps that look alike (a near-random model) get a note; maps that differ do not."""
    from gistlib.course.widgets import NOTE_CLASS, VISIBLE, attention_spread, attention_widget

    uniform = torch.full((2, 1, 2, 4, 4), 0.25)
    assert attention_spread(uniform) == {"layers": 0.0, "heads": 0.0}
    sharp = uniform.clone()
    sharp[1, 0, 1] = torch.eye(4)  # layer 1, head 1 looks at itself only
    spread = attention_spread(sharp)
    assert spread["layers"] == spread["heads"] == pytest.approx(0.75)
    assert attention_spread(uniform[:, :, :1])["heads"] == 0.0  # one head: nothing to compare

    def notes(box) -> list[str]:
        return [c.value for c in box.children if NOTE_CLASS in c._dom_classes]

    (note,) = notes(attention_widget(uniform))
    assert "different layers" in note and "different heads" in note and "too little to see" in note
    assert notes(attention_widget(sharp)) == []
    slight = uniform.clone()
    slight[1] += torch.eye(4) * (VISIBLE / 2)  # layers differ a little, heads not at all
    (note,) = notes(attention_widget(slight))
    assert "different layers" in note and "different heads" in note


def test_prefix_widget_views_and_note():
    """Opens at the most distinct layer; as the keys are when rows differ visibly there, else minus the row mean;
    no head slider for one kv head; the note says why layer 0 is flat."""

    from gistlib.course.widgets import NOTE_CLASS, PREFIX_VIEWS, VISIBLE, centred, prefix_widget, row_spread

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 4, 1, 2, 8, generator=g), torch.randn(3, 4, 1, 2, 8, generator=g)
    keys[0], values[0] = keys[0, :1].clone(), values[0, :1].clone()  # layer 0: every row the same
    distinct = Prefix(keys, values)
    assert row_spread(distinct, 0) == 0.0 and row_spread(distinct, 2) > VISIBLE
    c = centred(distinct)
    torch.testing.assert_close(c.keys.mean(1), torch.zeros(3, 1, 2, 8))
    torch.testing.assert_close(c.keys[2, 1] - c.keys[2, 0], keys[2, 1] - keys[2, 0])

    def controls(box) -> dict:
        return {w.description: w.value for w in box.children if getattr(w, "description", "")}

    def note(box) -> str:
        return next(w.value for w in box.children if NOTE_CLASS in w._dom_classes)

    box = prefix_widget(distinct)
    assert "head" not in controls(box) and "one key/value head" in note(box) and "Layer 0 is the same" in note(box)
    assert controls(box)["view"] == PREFIX_VIEWS[0] and controls(box)["layer"] != 0
    alike = Prefix(keys[:, :1].repeat(1, 4, 1, 1, 1) + 1e-3 * keys, values)  # rows differ by 0.1%
    box = prefix_widget(alike)
    assert controls(box)["view"] == PREFIX_VIEWS[2] and "too little to see" in note(box)
    two_heads = Prefix(torch.randn(2, 3, 2, 2, 4, generator=g), torch.randn(2, 3, 2, 2, 4, generator=g))
    assert "head" in controls(prefix_widget(two_heads))


def test_mask_widget_labels_every_row():
    import ipywidgets

    from gistlib.course.widgets import mask_widget

    labels = [[f"r{r}t{i}" for i in range(8)] for r in range(2)]
    box = mask_widget(ROWS, GISTS, labels, pad_token_id=PAD)
    row = next(w for w in box.children if getattr(w, "description", "") == "row")
    row.value = 1  # the picture is redrawn with row 1's own labels (no error, a new PNG)
    assert isinstance(box.children[-1], ipywidgets.Image) and box.children[-1].value
    with pytest.raises(ValueError, match="one per row"):
        mask_widget(ROWS, GISTS, labels[:1], pad_token_id=PAD)


def test_the_playground_example_words_exist():
    """The example that a mistyped demo line is shown uses a word and a symbol the pocket tokenizer knows."""
    from gistlib.course.widgets import example_demo, parse_demos

    word, symbol = example_demo().split()
    vocab = pocket_tokenizer(16).get_vocab()
    assert word in vocab and symbol in vocab
    with pytest.raises(ValueError, match=f"e.g. '{word} {symbol}'"):
        parse_demos("a b c")
