"""Pictures of masks, attention and prefixes: plain functions that return matplotlib figures.

Each picture has two halves, so that tests can check the numbers and notebooks can show them:

    analysis (tensors in, tensors out)          picture (figure out)
    ----------------------------------          --------------------
    mask from gistlib.core.masks                     plot_mask(mask, labels)
    attention_maps(model, ids, mask)            plot_attention(attn, layer, head, labels)
    prefix_norms(prefix)                        plot_prefix_norms(prefix)
    prefix_vectors / prefix_similarity          plot_similarity(sim, labels)
    project_2d(prefix)                          plot_projection(points, groups)
    prefix_slice(prefix, row, layer, head, kv)  plot_prefix_slice(prefix, row, layer, head, kv)
    prefixes_by_demo_count / prefix_change      plot_prefix_change(change, demo_counts)
    metrics records (gistlib.train.loop)             plot_loss_curves({name: records})

`gistlib.course.widgets` wraps these in ipywidgets; notebooks call each plain function once before wrapping
it (an exception inside a widget callback does not fail papermill). Nothing here trains or saves.
Prefix shapes follow `gistlib.core.prefix`: keys, values (n_layers, B, H_kv, k, hd).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gistlib.core.prefix import Prefix, forward_with_mask, positions_from_mask
from gistlib.data import collate, render_hyper_input

__all__ = [
    "CELL_INCHES",
    "SMALL_FONT",
    "token_labels",
    "plot_mask",
    "attention_maps",
    "plot_attention",
    "attention_mass",
    "prefix_norms",
    "plot_prefix_norms",
    "prefix_vectors",
    "prefix_similarity",
    "plot_similarity",
    "project_2d",
    "plot_projection",
    "prefix_slice",
    "plot_prefix_slice",
    "prefixes_by_demo_count",
    "prefix_change",
    "plot_prefix_change",
    "plot_loss_curves",
    "accuracy_by_group",
    "read_metrics",
]


# One token's row or column in a mask or attention heatmap, in inches: at 90-100 dpi about 24 px, room for a tick
# label, and a 20-token map with its picker fits a 1400 x 900 browser window without scrolling.
CELL_INCHES = 0.26
# The smallest text in any figure here (tick labels, legends, annotations), in points: 10-11 px at 90-100 dpi.
SMALL_FONT = 8


def _plt():
    import matplotlib

    if not _in_notebook():  # scripts and tests: no display needed
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def _close(fig):
    """Detach `fig` from pyplot's figure manager: notebooks display the returned figure once, and
    scripts that make many figures do not pile them up."""
    _plt().close(fig)
    return fig


# --- masks --------------------------------------------------------------------------------------


def _label_tokens(ax, L: int, labels: Sequence[str] | None) -> list[int]:
    """Token labels on both axes of an (L, L) query x key image; returns the tick positions."""
    ticks = list(range(L))
    labels = list(labels) if labels is not None else [str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=SMALL_FONT)
    ax.set_yticks(ticks, labels, fontsize=SMALL_FONT)
    return ticks


def token_labels(tokenizer, ids: Sequence[int] | torch.Tensor, gist_ids: Sequence[int] = ()) -> list[str]:
    """Short readable labels for a row of token ids: words as decoded, `[G0]..` for gists, `_` for pad.

    (Brackets, because the pocket suite has symbols such as `GO`.)"""
    gist_ids = list(gist_ids)
    out = []
    for t in ids.tolist() if isinstance(ids, torch.Tensor) else list(ids):
        if t in gist_ids:
            out.append(f"[G{gist_ids.index(t)}]")
        elif t == tokenizer.pad_token_id:
            out.append("_")
        else:
            text = tokenizer.convert_ids_to_tokens(t).replace("\u0120", "").replace("\n", "\\n")
            out.append(text[:6] if text else "\u2423")
    return out


def plot_mask(
    mask: torch.Tensor, labels: Sequence[str] | None = None, title: str = "attention mask", row: int = 0, ax=None
):
    """Heatmap of a boolean mask (B, 1, L, L) or (L, L): dark where query (row) may attend key (column).

    The image data is exactly `mask[row, 0]` as 0/1 (tests read it back with `fig.axes[0].images[0]`).
    """
    plt = _plt()
    m = mask[row, 0] if mask.dim() == 4 else mask
    m = m.bool().float().cpu().numpy()
    L = m.shape[0]
    fig, ax = (
        (ax.figure, ax) if ax is not None else plt.subplots(figsize=(CELL_INCHES * L + 1.8, CELL_INCHES * L + 1.4))
    )
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ticks = _label_tokens(ax, L, labels)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title)
    ax.set_xticks([t - 0.5 for t in ticks[1:]], minor=True)
    ax.set_yticks([t - 0.5 for t in ticks[1:]], minor=True)
    ax.grid(which="minor", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    fig.tight_layout()
    return _close(fig)


# --- attention ------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(
    model, input_ids: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention probabilities of every layer and head: (n_layers, B, H, L, L).

    model: a Llama loaded or built with `attn_implementation="eager"` (sdpa returns no attention).
    mask: the boolean (B, 1, L, L) mask from `gistlib.core.masks`; it becomes additive in
    `forward_with_mask`, the one place where that happens. Positions count real tokens from 0.
    """
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if not impl.endswith("eager"):
        raise ValueError(
            f"attention_maps needs eager attention, the model uses {impl!r}: "
            "build it with attn_implementation='eager' or call model.set_attn_implementation('eager')"
        )
    am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    out = forward_with_mask(model, mask, positions_from_mask(am), input_ids=input_ids, output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention maps (is it really running eager attention?)")
    return torch.stack([a.float() for a in out.attentions])  # (n, B, H, L, L)


def attention_mass(attn: torch.Tensor, queries: Sequence[int] | slice, keys: Sequence[int] | slice) -> torch.Tensor:
    """Attention probability that `queries` put on `keys`, summed over those keys: (n, B, H, |queries|)."""
    a = attn[..., queries, :]
    return a[..., keys].sum(-1)


def plot_attention(
    attn: torch.Tensor,
    layer: int = 0,
    head: int = 0,
    labels: Sequence[str] | None = None,
    row: int = 0,
    title: str | None = None,
    ax=None,
):
    """Heatmap of one layer's and head's attention (n, B, H, L, L) -> figure; rows are queries."""
    plt = _plt()
    a = attn[layer, row, head].float().cpu().numpy()
    L = a.shape[0]
    fig, ax = (
        (ax.figure, ax) if ax is not None else plt.subplots(figsize=(CELL_INCHES * L + 2.4, CELL_INCHES * L + 1.4))
    )
    im = ax.imshow(a, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    _label_tokens(ax, L, labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title or f"attention, layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="probability")
    fig.tight_layout()
    return _close(fig)


# --- prefixes ----------------------------------------------------------------------------------


def prefix_norms(prefix: Prefix) -> dict[str, torch.Tensor]:
    """L2 norm per layer and row, averaged over heads and gist tokens: `keys`, `values` each (n, B)."""
    return {
        "keys": prefix.keys.float().norm(dim=-1).mean(dim=(2, 3)),
        "values": prefix.values.float().norm(dim=-1).mean(dim=(2, 3)),
    }


def plot_prefix_norms(prefix: Prefix, title: str = "prefix norms per layer"):
    """Mean L2 norm of gist keys and values per layer; the line is the mean over rows, the band min..max."""
    plt = _plt()
    norms = prefix_norms(prefix)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    layers = list(range(prefix.num_layers))
    for i, (name, n) in enumerate(norms.items()):
        ax.plot(layers, n.mean(1).numpy(), marker="o", color=f"C{i}", label=name)
        ax.fill_between(layers, n.min(1).values.numpy(), n.max(1).values.numpy(), color=f"C{i}", alpha=0.2)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean L2 norm per gist token and head")
    ax.set_title(f"{title} ({prefix.batch_size} prefixes)")
    ax.legend()
    fig.tight_layout()
    return _close(fig)


def prefix_vectors(prefix: Prefix, which: str = "both", layer: int | None = None) -> torch.Tensor:
    """One flat vector per row (B, D): keys, values or both, of one layer or all."""
    parts = {"keys": [prefix.keys], "values": [prefix.values], "both": [prefix.keys, prefix.values]}
    if which not in parts:
        raise ValueError(f"which must be 'keys', 'values' or 'both', got {which!r}")
    ts = [t if layer is None else t[layer : layer + 1] for t in parts[which]]
    return torch.cat([t.float().transpose(0, 1).reshape(prefix.batch_size, -1) for t in ts], dim=1)


def prefix_similarity(prefix: Prefix, which: str = "both", layer: int | None = None) -> torch.Tensor:
    """Cosine similarity between the rows' prefixes (B, B), after removing the mean prefix.

    Centering matters: every prefix shares a large common part (what "being a prefix" looks like),
    which would make all raw cosines close to 1.
    """
    v = prefix_vectors(prefix, which, layer)
    v = v - v.mean(0, keepdim=True)
    v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return v @ v.T


def plot_similarity(sim: torch.Tensor, labels: Sequence[str] | None = None, title: str = "prefix similarity"):
    """Heatmap of a (B, B) similarity matrix in [-1, 1]."""
    plt = _plt()
    B = sim.shape[0]
    size = min(9.0, 0.25 * B + 3)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(sim.cpu().numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    if labels is not None and B <= 40:
        ax.set_xticks(range(B), labels, rotation=90, fontsize=SMALL_FONT)
        ax.set_yticks(range(B), labels, fontsize=SMALL_FONT)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine (centred)")
    fig.tight_layout()
    return _close(fig)


def project_2d(prefix: Prefix | torch.Tensor, which: str = "both") -> torch.Tensor:
    """PCA of the rows' prefix vectors onto their two main directions (B, 2), via SVD of the centred data."""
    v = prefix_vectors(prefix, which) if isinstance(prefix, Prefix) else prefix.float()
    v = v - v.mean(0, keepdim=True)
    _, _, vt = torch.linalg.svd(v, full_matrices=False)
    pts = v @ vt[:2].T  # (B, <=2)
    if pts.shape[1] < 2:
        pts = torch.cat([pts, torch.zeros(pts.shape[0], 2 - pts.shape[1])], dim=1)
    return pts


def plot_projection(
    points: torch.Tensor, groups: Sequence[str], title: str = "prefixes, PCA", names: Sequence[str] | None = None
):
    """Scatter (B, 2) points coloured by group (task family, level, ...); `names` annotate up to 30 points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    pts = points.cpu().numpy()
    kinds = sorted(set(groups), key=str)
    colours = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")  # distinct colours for up to 20 groups
    for i, g in enumerate(kinds):
        idx = [j for j, x in enumerate(groups) if x == g]
        ax.scatter(pts[idx, 0], pts[idx, 1], s=22, color=colours(i % colours.N), label=str(g), alpha=0.8)
    if names is not None and len(names) <= 30:
        for (x, y), n in zip(pts, names):
            ax.annotate(str(n), (x, y), fontsize=SMALL_FONT, alpha=0.7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(fontsize=SMALL_FONT)
    fig.tight_layout()
    return _close(fig)


def prefix_slice(prefix: Prefix, row: int = 0, layer: int = 0, head: int = 0, kind: str = "keys") -> torch.Tensor:
    """One row's gist vectors in one layer and key/value head: (k, hd)."""
    if kind not in ("keys", "values"):
        raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
    return getattr(prefix, kind)[layer, row, head].float()


def plot_prefix_slice(
    prefix: Prefix, row: int = 0, layer: int = 0, head: int = 0, kind: str = "keys", title: str | None = None
):
    """Heatmap of `prefix_slice`: gist tokens (rows) by head dimensions (columns), symmetric colour scale."""
    plt = _plt()
    s = prefix_slice(prefix, row, layer, head, kind)
    lim = float(s.abs().max().clamp(min=1e-6))
    fig, ax = plt.subplots(figsize=(7, 0.3 * s.shape[0] + 1.6))
    im = ax.imshow(s.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(s.shape[0]), [f"G{i}" for i in range(s.shape[0])], fontsize=SMALL_FONT)
    ax.set_xlabel("head dimension")
    ax.set_title(title or f"prefix {kind}, row {row}, layer {layer}, kv head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _close(fig)


@torch.no_grad()
def prefixes_by_demo_count(hyper, episode, tokenizer, fmt, counts: Sequence[int], max_tokens: int = 1024) -> Prefix:
    """HyperLlama prefixes (n, len(counts), H, k, hd) from the first `c` demos of `episode`, one row per c.

    `c = 0` reads only `[BOS] G_1..G_k`. `hyper` is a `gistlib.core.hyper.HyperLlama`.
    """
    from dataclasses import replace

    gist_ids = hyper.gist_ids.tolist()
    rows = [
        render_hyper_input(replace(episode, demos=list(episode.demos[:c])), tokenizer, gist_ids, fmt, max_tokens)
        for c in counts
    ]
    b = collate(rows, tokenizer.pad_token_id, padding_side="left")
    return hyper.make_prefix(b["input_ids"], b["attention_mask"]).detach()


def prefix_change(prefixes: Prefix, reference: int = -1, which: str = "both") -> torch.Tensor:
    """Relative distance of each row's prefix to the `reference` row, per layer: (n, B).

    ||p_b - p_ref|| / ||p_ref|| in every layer (keys and values flattened together for "both").
    """
    n = prefixes.num_layers
    per_layer = torch.stack([prefix_vectors(prefixes, which, layer=i) for i in range(n)])  # (n, B, D)
    ref = per_layer[:, reference : reference + 1 if reference != -1 else None]  # (n, 1, D)
    return (per_layer - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)


def plot_prefix_change(change: torch.Tensor, demo_counts: Sequence[int], title: str | None = None):
    """One line per layer: relative distance to the full-demo prefix as demos are added."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.3))
    for layer in range(change.shape[0]):
        ax.plot(list(demo_counts), change[layer].numpy(), marker="o", label=f"layer {layer}")
    ax.set_xlabel("demos the hypernetwork reads")
    ax.set_ylabel("||p - p_all|| / ||p_all||")
    ax.set_title(title or "how the prefix changes as demos are added")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=SMALL_FONT)
    fig.tight_layout()
    return _close(fig)


# --- training ------------------------------------------------------------------------------------


def plot_loss_curves(
    logs: Mapping[str, Sequence[Mapping]], title: str = "training loss", log_y: bool | None = None, smooth: int = 1
):
    """Loss against step for each `{name: metric records}` (records as `gistlib.train.loop.train` returns them).

    smooth: moving-average window (1 = raw). Records with an `eval` score are drawn on a second axis.
    log_y: None picks a log scale when the losses span more than a factor of 3.
    """
    plt = _plt()
    lows, highs = [], []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax2 = None
    for i, (name, recs) in enumerate(logs.items()):
        recs = [r for r in recs if "loss" in r]
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        loss = torch.tensor([float(r["loss"]) for r in recs])
        if smooth > 1 and len(loss) >= smooth:
            kernel = torch.ones(smooth) / smooth
            loss = torch.nn.functional.conv1d(loss[None, None], kernel[None, None]).flatten()
            steps = steps[smooth - 1 :]
        ax.plot(steps, loss.numpy(), color=f"C{i}", lw=1.2, label=f"{name} loss")
        finite = loss[torch.isfinite(loss)]
        if len(finite):
            lows.append(float(finite.min()))
            highs.append(float(finite.max()))
        evals = [(r["step"], r["eval"]) for r in recs if "eval" in r]
        if evals:
            ax2 = ax2 or ax.twinx()
            ax2.plot(*zip(*evals), color=f"C{i}", ls="--", marker=".", label=f"{name} validation")
            ax2.set_ylabel("validation accuracy")
            ax2.set_ylim(0, 1.02)
    if log_y is None:
        log_y = bool(lows) and min(lows) > 0 and max(highs) / min(lows) > 3
    if log_y:
        ax.set_yscale("log")
        from matplotlib.ticker import ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, fontsize=SMALL_FONT, loc="upper right")
    fig.tight_layout()
    return _close(fig)


def read_metrics(path) -> list[dict]:
    """The metric records of a run (`<out_dir>/metrics.jsonl` written by `gistlib.train.loop.train`); [] if none yet."""
    import json
    from pathlib import Path

    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def accuracy_by_group(per_episode: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Mean per-episode score within each group (e.g. a task's level), groups in sorted order."""
    if len(per_episode) != len(groups):
        raise ValueError(f"{len(per_episode)} scores but {len(groups)} groups")
    acc: dict[str, list[float]] = {}
    for v, g in zip(per_episode, groups):
        acc.setdefault(str(g), []).append(float(v))
    return {g: sum(v) / len(v) for g, v in sorted(acc.items())}
