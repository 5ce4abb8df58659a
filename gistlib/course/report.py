"""Results of an experiment as files a person reads: summary.json, results.md, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .experiment import METHODS

__all__ = [
    "write_report",
    "results_table",
    "results_markdown",
    "plot_methods",
    "plot_prefix_ladder",
    "plot_losses",
    "plot_tradeoff",
]

METHOD_ORDER = tuple(m for m in METHODS if m != "prefix_tuning")
MAX_GROUP_COLUMNS = 8  # more groups (SNI: one per task) get a table of their own, one row per task
COLORS = {"zero_shot": "#999", "definition_only": "#bbb", "icl": "#4a7", "multitask_icl": "#2a5", "gisting": "#c84",
          "hyperllama": "#47c", "wrong_task_prefix": "#a9c"}  # fmt: skip


def _tries(entry: dict) -> str:
    """The per-seed line's note: ' (2 tries)' where the plateau check started a seed again, else ''."""
    n = entry.get("tries", 1)
    return f" ({n} tries)" if n > 1 else ""


def _fmt(entry: dict) -> str:
    """Accuracy (exact match for generation) with its 95% interval, and ROUGE-L (with its own) where tasks generate."""
    lo, hi = entry["ci95"]
    rouge = ""
    if entry.get("rouge_l") is not None:
        rlo, rhi = entry.get("rouge_l_ci95", (float("nan"), float("nan")))
        rouge = f", ROUGE-L {entry['rouge_l']:.3f} [{rlo:.3f}, {rhi:.3f}]"
    return f"{entry['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]{rouge}"


def _per_task_table(m: dict) -> list[str]:
    """One row per task, ROUGE-L of each method [95% CI over the task's instances] (generation families)."""
    names = [n for n in METHOD_ORDER if n in m and m[n].get("per_task")]
    if not names:
        return []
    rows = {n: {r["task"]: r for r in m[n]["per_task"]} for n in names}
    tasks = list(rows[names[0]])
    lines = ["", "ROUGE-L per task [95% CI over its instances]:", "", "| task | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]  # fmt: skip
    for t in tasks:
        cells = [rows[n].get(t) for n in names]
        lines.append(
            f"| {t} | "
            + " | ".join(
                f"{c['rouge_l']:.3f} [{c['rouge_l_ci95'][0]:.2f}, {c['rouge_l_ci95'][1]:.2f}]" if c else "-"
                for c in cells
            )  # fmt: skip
            + " |"
        )
    return lines


def _template_median_table(m: dict) -> list[str]:
    """P3: per dataset, each method's median accuracy over the dataset's templates (T0's protocol)."""
    names = [n for n in METHOD_ORDER if m.get(n, {}).get("median_over_templates")]
    if not names:
        return []
    datasets = list(m[names[0]]["median_over_templates"])
    lines = ["", "Median accuracy over templates (T0's protocol), per held-out dataset:", "",
             "| method | " + " | ".join(datasets) + " | mean |", "|---|" + "---|" * (len(datasets) + 1)]  # fmt: skip
    for n in names:
        med = m[n]["median_over_templates"]
        cells = [med.get(d, float("nan")) for d in datasets]
        lines.append(f"| {n} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {sum(cells) / len(cells):.3f} |")
    return lines


def results_table(summary: dict) -> str:
    """Markdown: methods (accuracy, 95% CI, n, by level), seeds, the prefix ladder, gist sweep, compression."""
    m = summary["methods"]
    levels = sorted({lvl for e in m.values() for lvl in e.get("by_group", {})})
    levels = levels if len(levels) <= MAX_GROUP_COLUMNS else []
    lines = [
        "| method | accuracy [95% CI] | episodes |" + "".join(f" {lvl} |" for lvl in levels),
        "|---|---|---|" + "---|" * len(levels),
    ]
    for name in METHOD_ORDER:
        if name in m:
            e = m[name]
            lines.append(
                f"| {name} | {_fmt(e)} | {e['n_episodes']} |"
                + "".join(f" {e['by_group'].get(lvl, float('nan')):.3f} |" for lvl in levels)
            )
    lines += [f"\n{name} not run: {why}" for name, why in summary.get("skipped_methods", {}).items()]
    lines += _per_task_table(m)
    lines += _template_median_table(m)
    for name in METHOD_ORDER:
        seeds = m.get(name, {}).get("per_seed", {})
        if seeds:
            e = m[name]
            metric = e.get("seed_metric", "accuracy")
            spread = f", spread (max - min) {e['spread_over_seeds']:.3f}" if "spread_over_seeds" in e else ""
            lines += [
                "",
                f"{name} per seed: "
                + ", ".join(f"seed {s}: {_fmt(v)}{_tries(v)}" for s, v in seeds.items())
                + f"; {metric} mean {e['mean_over_seeds']:.3f}{spread}",
            ]
    ladder = summary.get("prefix_tuning", {})
    if ladder:
        budgets = list(next(iter(ladder.values())).keys())
        key, _ = _ladder_metric(ladder)
        lines += [
            "",
            f"| prefix tuning start ({key.replace('_', '-').upper() if key == 'rouge_l' else key}) | "
            + " | ".join(f"{b} steps" for b in budgets)
            + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for name, per in ladder.items():
            lines.append(
                f"| {name.removeprefix('prefix_tuning_')} | " + " | ".join(f"{per[b][key]:.3f}" for b in budgets) + " |"
            )
    sweep = summary.get("gist_sweep", {})
    if len(sweep) > 1:
        lines += [
            "",
            "| gist tokens k | hyperllama accuracy [95% CI] | " + " | ".join(levels) + " |",
            "|---|---|" + "---|" * len(levels),
        ]
        for k in sorted(sweep, key=int):
            e = sweep[k]
            lines.append(
                f"| {k} | {_fmt(e)} | "
                + " | ".join(f"{e['by_group'].get(lvl, float('nan')):.3f}" for lvl in levels)
                + " |"
            )
    comp = summary.get("compression", [])
    if comp:
        lines += [
            "",
            "| k | demo tokens (mean) | demo tokens per gist token | prefix KV bytes | demo KV bytes |",
            "|---|---|---|---|---|",
        ]
        for c in comp:
            lines.append(
                f"| {c['k']} | {c['mean_demo_tokens']:.1f} | {c['demo_tokens_per_gist_token']:.1f} | "
                f"{c['prefix_kv_bytes']:,} | {c['demo_kv_bytes']:,.0f} |"
            )
    return "\n".join(lines)


def _plt():
    """pyplot; the non-interactive Agg backend only outside IPython/Jupyter (there figures must display)."""
    import sys

    import matplotlib

    if "IPython" not in sys.modules:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_methods(summary: dict):
    """Bar chart: accuracy (ROUGE-L where the tasks generate) per method with 95% intervals; a method trained at
    several seeds shows its mean over seeds as the bar and each seed as a dot with its interval."""
    plt = _plt()
    m = summary["methods"]
    names = [n for n in METHOD_ORDER if n in m]
    rouge = all(m[n].get("rouge_l") is not None for n in names)
    key, ci = ("rouge_l", "rouge_l_ci95") if rouge else ("accuracy", "ci95")
    seeds = {n: list(m[n].get("per_seed", {}).values()) for n in names}
    seeds = {n: v for n, v in seeds.items() if len(v) > 1}
    acc = [sum(v[key] for v in seeds[n]) / len(seeds[n]) if n in seeds else m[n][key] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(names, acc, color=[COLORS.get(n, "#777") for n in names])
    single = [(i, n) for i, n in enumerate(names) if n not in seeds]  # one run: the bar's own interval
    low = [acc[i] - m[n][ci][0] for i, n in single]
    high = [m[n][ci][1] - acc[i] for i, n in single]
    ax.errorbar(
        [i for i, _ in single], [acc[i] for i, _ in single], yerr=[low, high], fmt="none", color="black", capsize=4
    )
    for n, per in seeds.items():  # a method trained at several seeds: each seed a dot with its interval
        i = names.index(n)
        xs = [i - 0.25 + 0.5 * j / (len(per) - 1) for j in range(len(per))]
        ys = [v[key] for v in per]
        yerr = [[y - v[ci][0] for y, v in zip(ys, per)], [v[ci][1] - y for y, v in zip(ys, per)]]
        ax.errorbar(xs, ys, yerr=yerr, fmt="o", color="black", ms=3, lw=0.8, capsize=2)
    ax.tick_params(axis="x", labelsize=8, labelrotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel(("ROUGE-L" if rouge else "accuracy") + " (held-out tasks)")
    note = " (dots: seeds, bar: their mean)" if seeds else ""
    ax.set_title(f"methods, {m[names[0]]['n_episodes']} test episodes, 95% CI{note}", fontsize=10)
    fig.tight_layout()
    return fig


def _ladder_metric(ladder: dict) -> tuple[str, str]:
    """(metric, its interval) of the prefix-tuning ladder: ROUGE-L where the answers are generated, else accuracy."""
    first = next((entry for per in ladder.values() for entry in per.values()), {})
    return ("rouge_l", "rouge_l_ci95") if first.get("rouge_l") is not None else ("accuracy", "ci95")


def plot_prefix_ladder(summary: dict):
    """Prefix-tuning accuracy (ROUGE-L for generation) against steps, one line per start, with 95% bands."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    key, ci = _ladder_metric(summary["prefix_tuning"])
    for name, per in summary["prefix_tuning"].items():
        steps = [int(b) for b in per]
        acc = [per[b][key] for b in per]
        lo = [per[b][ci][0] for b in per]
        hi = [per[b][ci][1] for b in per]
        ax.plot(steps, acc, marker="o", label=name.removeprefix("prefix_tuning_"))
        ax.fill_between(steps, lo, hi, alpha=0.15)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("prefix-tuning steps")
    ax.set_ylabel("ROUGE-L" if key == "rouge_l" else "accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("prefix tuning from three starts")
    fig.tight_layout()
    return fig


def plot_losses(summary: dict):
    """Training loss curves of every trained model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, log in summary.get("logs", {}).items():
        if log:
            ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=name, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_tradeoff(summary: dict, method: str = "hyperllama"):
    """Compression trade-off: `method`'s accuracy against k (one line per level), ICL as dashed lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sweep = summary.get("gist_sweep", {})
    ks = sorted(sweep, key=int)
    icl_levels = summary["methods"].get("icl", {}).get("by_group", {})
    for i, lvl in enumerate(sorted(icl_levels)):
        color = f"C{i}"
        ax.plot(
            [int(k) for k in ks],
            [sweep[k]["by_group"].get(lvl, float("nan")) for k in ks],
            marker="o",
            color=color,
            label=f"{method} {lvl}",
        )
        ax.axhline(icl_levels[lvl], color=color, ls="--", lw=1, label=f"icl {lvl}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("gist tokens k")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("compression: accuracy vs k and task difficulty")
    fig.tight_layout()
    return fig


def results_markdown(summaries: list[dict]) -> str:
    """RESULTS.md: per run of record, the command that made it, where and how long, and its results table."""
    lines = [
        "# Results",
        "",
        "Written by `python -m gistlib report` from the runs' summary.json files: every number below is one a run",
        "printed. Accuracy is rank-classification accuracy (exact match for generation tasks, with ROUGE-L), the",
        "mean over test episodes with a 95% bootstrap interval over episodes.",
    ]
    for s in summaries:
        env = s.get("environment", {})
        where = f"{env.get('torch_threads', '?')} torch thread(s), torch {env.get('torch', '?')}"
        where += f", transformers {env.get('transformers', '?')}, {env.get('device', '?')}"
        episodes = s.get("data", {}).get("test_episodes", "?")
        lines += [
            "",
            f"## {s['name']} ({s.get('family', '?')})",
            "",
            f"`{s.get('command', '?')}`: {s['wall_time_s']:.0f} s wall; {where}; {episodes} test episodes.",
            "",
            results_table(s),
        ]
    return "\n".join(lines) + "\n"


def write_report(summary: dict, out: Path) -> dict[str, Path]:
    """summary.json, results.md and the PNG plots that have something to show into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "table": out / "results.md"}
    paths["summary"].write_text(json.dumps(summary, indent=1))
    paths["table"].write_text(results_table(summary) + "\n")
    plt = _plt()
    shows = {  # a plot with nothing to show is not drawn
        "methods": bool(summary["methods"]),
        "prefix_tuning": bool(summary.get("prefix_tuning")),
        "losses": any(summary.get("logs", {}).values()),
        "tradeoff": len(summary.get("gist_sweep", {})) > 1,
    }
    for name, fn in [
        ("methods", plot_methods),
        ("prefix_tuning", plot_prefix_ladder),
        ("losses", plot_losses),
        ("tradeoff", plot_tradeoff),
    ]:
        if not shows[name]:
            continue
        fig = fn(summary)
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths
