"""The one experiment runner: the smoke tier end to end, caches stamped with their settings, and every real-data
config (p3, sni, symbol) running every method on a tiny 4-bit model over ../shared/data."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gistlib.course.experiment import METHODS, load_experiment, tiny_experiment
from gistlib.course.runner import (
    check_cache_base,
    load_bundle,
    other_task_rows,
    run_experiment,
    ship_models,
    train_hyper,
    trained_model_dirs,
)
from gistlib.data import shared_data_dir

SCORED = ("zero_shot", "icl", "multitask_icl", "gisting", "hyperllama", "wrong_task_prefix")
STARTS = ("prefix_tuning_random", "prefix_tuning_vocab", "prefix_tuning_hyperllama")
DATA = shared_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "superglue").is_dir(), reason=f"shared data folder {DATA} is absent (set GISTLIB_DATA to the real data)"
)


def _smoke(root: Path, *overrides: str):
    sets = [f"run.out_dir={root / 'results'}", f"run.cache_dir={root / 'runs'}", "run.progress=false", *overrides]
    return load_experiment("smoke", sets)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    exp = _smoke(tmp_path_factory.mktemp("smoke"))
    return exp, run_experiment(exp)


def test_every_method_produced_a_number(smoke):
    exp, summary = smoke
    assert set(METHODS) - {"definition_only"} == set(exp.methods.enabled)  # no task definitions in the pocket suite
    for name in SCORED:
        entry = summary["methods"][name]
        assert 0.0 <= entry["ci95"][0] <= entry["accuracy"] <= entry["ci95"][1] <= 1.0
        assert entry["n_episodes"] == exp.eval.test_episodes
    for name in ("hyperllama", "gisting"):  # every seed, and their mean and spread
        entry = summary["methods"][name]
        per = [v["accuracy"] for v in entry["per_seed"].values()]
        assert set(entry["per_seed"]) == {str(s) for s in exp.run.seeds} and len(per) >= 2
        assert entry["mean_over_seeds"] == pytest.approx(sum(per) / len(per))
        assert entry["spread_over_seeds"] == pytest.approx(max(per) - min(per))
    for start in STARTS:
        assert set(summary["prefix_tuning"][start]) == {str(b) for b in exp.methods.prefix_budgets}
    assert set(summary["gist_sweep"]) == {str(k) for k in exp.gist_counts}
    comp = {c["k"]: c for c in summary["compression"]}
    k = exp.hyper.num_gist_tokens
    assert comp[k]["kv_ratio"] == pytest.approx(comp[k]["prefix_kv_bytes"] / comp[k]["demo_kv_bytes"])
    assert summary["environment"]["torch_threads"] >= 1 and summary["config"] == exp.to_dict()


def test_the_methods_plot_shows_every_seed_and_their_mean(smoke):
    """methods.png: a method trained at several seeds is drawn as its mean over seeds, with a dot per seed."""
    from matplotlib.collections import LineCollection

    from gistlib.course.report import plot_methods

    _, summary = smoke
    m = summary["methods"]
    ax = plot_methods(summary).axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    heights = dict(zip(names, [bar.get_height() for bar in ax.patches]))
    for name in ("gisting", "hyperllama"):
        assert heights[name] == pytest.approx(m[name]["mean_over_seeds"])
    assert heights["zero_shot"] == pytest.approx(m["zero_shot"]["accuracy"])
    dots = sorted(y for line in ax.get_lines() if line.get_marker() == "o" for y in line.get_ydata())
    seeds = sorted(v["accuracy"] for name in ("gisting", "hyperllama") for v in m[name]["per_seed"].values())
    assert dots == pytest.approx(seeds)
    assert any(isinstance(c, LineCollection) for c in ax.collections)  # the intervals


def test_files_exist(smoke):
    exp, _ = smoke
    out = Path(exp.run.out_dir)
    for name in ("summary.json", "results.md", "methods.png", "prefix_tuning.png", "losses.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "results.md").read_text()
    assert all(m in table for m in SCORED)
    assert json.loads((out / "summary.json").read_text())["name"] == "smoke"


def test_the_smoke_base_was_pretrained_in_two_stages(smoke):
    exp, _ = smoke
    log = json.loads((Path(exp.run.cache_dir) / "base" / "train_log.json").read_text())
    assert [r["stage"] for r in log] == [1] * exp.base.warmup_steps + [2] * exp.base.steps


def test_a_second_run_reuses_the_cache_and_gives_the_same_numbers(smoke):
    exp, first = smoke
    again = run_experiment(exp)
    for name in SCORED:
        assert again["methods"][name] == first["methods"][name], name
    assert again["prefix_tuning"] == first["prefix_tuning"]


def test_shipped_models_are_loaded_instead_of_trained(smoke, tmp_path):
    """`gistlib ship` copies final weights, settings and logs (no checkpoints); a run pointed at them
    (run.shipped_dir) with the same settings trains nothing and scores the same; other settings train anew."""
    exp, first = smoke
    shipped = tmp_path / "shipped"
    folders = ship_models(exp, shipped)
    assert sorted(f.name for f in folders) == sorted(trained_model_dirs(exp)) and len(folders) >= 4
    assert not [p for f in folders for p in f.rglob("*") if "checkpoint" in p.name or "optimizer" in p.name]
    cache = tmp_path / "cache"
    shutil.copytree(Path(exp.run.cache_dir) / "base", cache / "base")  # the smoke base is trained, not shipped
    run = replace(exp.run, cache_dir=str(cache), shipped_dir=str(shipped), out_dir=str(tmp_path / "out"))
    again = run_experiment(replace(exp, run=run))
    assert not [n for n in trained_model_dirs(exp) if (cache / n).exists()]  # nothing was trained
    assert {n: again["methods"][n] for n in SCORED} == {n: first["methods"][n] for n in SCORED}
    assert again["logs"]["hyperllama_seed0"] == first["logs"]["hyperllama_seed0"]
    changed = replace(
        exp, run=run, train=replace(exp.train, gisting_lr=0.5), methods=replace(exp.methods, enabled=("gisting",))
    )
    run_experiment(changed)
    assert (cache / f"gisting-k{exp.hyper.num_gist_tokens}-s0" / "final").exists()  # trained into the cache
    assert (
        json.loads((shipped / f"gisting-k{exp.hyper.num_gist_tokens}-s0" / "settings.json").read_text())["train"][
            "gisting_lr"
        ]
        == exp.train.gisting_lr
    )  # the shipped copy is untouched


def test_a_config_trained_by_another_scores_its_models_and_trains_nothing(smoke, tmp_path):
    """run.trained_by: the trainer's models (its cache, its settings) scored on this config's episodes; with
    the trainer's own data and episodes the numbers are the trainer's; nothing is trained or written there."""
    from gistlib.config import ConfigError

    exp, first = smoke
    trainer = tmp_path / "trainer.json"
    trainer.write_text(json.dumps(exp.to_dict()))
    cache = Path(exp.run.cache_dir)
    weights = lambda: {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    files, before = set(cache.rglob("*")), weights()

    def transfer(name: str, **sections) -> dict:
        raw = {"run": {"name": name, "out_dir": str(tmp_path / name), "trained_by": str(trainer), "progress": False},
               "data": exp.to_dict()["data"], "methods": exp.to_dict()["methods"], **sections}  # fmt: skip
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        loaded = load_experiment(path)
        assert loaded.train == exp.train and loaded.hyper == exp.hyper and loaded.run.cache_dir == exp.run.cache_dir
        return run_experiment(loaded)

    same = transfer("same", eval=exp.to_dict()["eval"])
    assert {n: same["methods"][n] for n in SCORED} == {n: first["methods"][n] for n in SCORED}
    other = transfer("other", eval={**exp.to_dict()["eval"], "seed": 77})
    assert other["methods"]["hyperllama"] != first["methods"]["hyperllama"]  # other episodes
    assert weights() == before and set(cache.rglob("*")) == files  # nothing trained, nothing added
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"run": {"trained_by": str(trainer)}, "train": {"hyper_steps": 9}}))
    with pytest.raises(ConfigError, match="train, which come from run.trained_by"):
        load_experiment(clash)


def test_the_same_settings_in_a_fresh_folder_give_the_same_numbers(smoke, tmp_path):
    """Reproducibility: retraining everything from scratch (same threads, same seeds) repeats every number."""
    exp, first = smoke
    fresh = run_experiment(_smoke(tmp_path, f"run.threads={torch.get_num_threads()}"))
    assert {n: fresh["methods"][n] for n in SCORED} == {n: first["methods"][n] for n in SCORED}
    losses = lambda s, key: [(r["step"], r["loss"], r.get("eval")) for r in s["logs"][key]]  # not tokens/s
    for key in ("gisting_seed0", "gisting_seed1", "multitask_icl", "hyperllama_seed0", "hyperllama_seed1"):
        assert losses(fresh, key) == losses(first, key), key


def test_a_cached_model_of_other_settings_is_refused_or_retrained(smoke):
    exp, _ = smoke
    changed = replace(exp, train=replace(exp.train, gisting_lr=0.5))
    with pytest.raises(
        RuntimeError, match=r"gisting-k2-s0 was trained with other settings \(train\.gisting_lr: 0\.001 -> 0\.5\)"
    ):
        run_experiment(replace(changed, methods=replace(exp.methods, enabled=("gisting",))))
    other = replace(exp, hyper=replace(exp.hyper, distill_weight=0.0))
    b = load_bundle(other)
    with pytest.raises(RuntimeError, match=r"hyper\.distill_weight: 3\.0 -> 0\.0.*run\.retrain=true"):
        train_hyper(b, exp.hyper.num_gist_tokens, exp.run.seeds[0])
    b.exp = replace(other, run=replace(other.run, retrain=True, cache_dir=exp.run.cache_dir))
    _, log = train_hyper(b, exp.hyper.num_gist_tokens, exp.run.seeds[0])  # retrained with the new settings
    assert len(log) == exp.train.hyper_steps
    stamp = json.loads(
        (Path(exp.run.cache_dir) / f"hyper-k{exp.hyper.num_gist_tokens}-s0" / "settings.json").read_text()
    )
    assert stamp["hyper"]["distill_weight"] == 0.0


def test_cached_models_of_another_base_are_refused(smoke, tmp_path):
    exp, _ = smoke
    cache = Path(exp.run.cache_dir)
    check_cache_base(cache, cache / "base")  # same base: fine
    other = tmp_path / "other_base"
    shutil.copytree(cache / "base", other)
    with (other / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(RuntimeError, match="another base"):
        check_cache_base(cache, other)


def test_shipped_base_matches_the_pocket_config():
    """`make main` loads data/pocket_base: its shape must be what configs/pocket.json and the tokenizer say."""
    from gistlib.data import pocket_tokenizer

    m = load_experiment("pocket").model
    path = m.resolved_path / "config.json"
    if not path.exists():
        pytest.skip("no shipped pocket base (make main would pretrain one)")
    c = json.loads(path.read_text())
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]) == (m.hidden, m.layers, m.heads)
    assert (c["num_key_value_heads"], c["intermediate_size"]) == (m.kv_heads, m.mlp)
    assert c["vocab_size"] == len(pocket_tokenizer(16))


def test_vocab_start_tokens_do_not_depend_on_the_process():
    """tokenizers' get_vocab() order changes between processes; the vocab prefix start must not."""
    import os
    import subprocess
    import sys

    code = "from gistlib.data import pocket_tokenizer; from gistlib.course.runner import word_ids_of; "
    code += "print(word_ids_of(pocket_tokenizer(16)))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONHASHSEED": s}
        ).stdout
        for s in ("1", "2", "3")
    }
    assert len(outs) == 1 and outs.pop().startswith("[")


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Every frozen tensor (quantised weights and their states, embeddings, norms) by its name outside PEFT."""
    name = lambda n: n.replace(".base_layer", "")
    out = {name(n): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return out | {f"buffer.{name(n)}": b.detach().clone() for n, b in model.named_buffers()}


@needs_data
@pytest.mark.parametrize("name", ["p3", "sni", "symbol"])
def test_every_method_runs_on_a_tiny_4bit_model(name, tmp_path):
    """`python -m gistlib run configs/NAME.json --tiny`: every method of the paper, scored on the same episodes."""
    exp = tiny_experiment(
        load_experiment(
            name, [f"run.out_dir={tmp_path / 'out'}", f"run.cache_dir={tmp_path / 'runs'}", "run.progress=false"]
        )
    )
    assert exp.model.quantization == "nf4" and exp.model.source == "tiny"
    summary = run_experiment(exp)
    for method in SCORED:
        entry = summary["methods"][method]
        assert math.isfinite(entry["accuracy"]) and entry["n_episodes"] == summary["data"]["test_episodes"] > 0
        assert entry["by_group"], method
        if name == "sni":
            assert 0.0 <= entry["rouge_l"] <= 1.0  # generation: ROUGE-L and exact match
    assert set(summary["prefix_tuning"]) == set(STARTS)
    for key in ("gisting_seed0", "multitask_icl", "hyperllama_seed0"):
        log = summary["logs"][key]
        assert log and all(math.isfinite(r["loss"]) for r in log), key
    assert json.loads((Path(exp.run.out_dir) / "summary.json").read_text())["methods"] == summary["methods"]


@needs_data
@pytest.mark.parametrize("name", ["smol-p3", "smol-symbol"])
def test_configs_trained_by_the_smol_tier_run_on_a_tiny_model(name, tmp_path):
    """The smol tier's models scored on P3 held-out sets and a symbol-tuning split (`run.trained_by`), on a tiny
    4-bit model: the trainer's SNI data trains, this config's data is scored (P3: the median over templates)."""
    sets = [f"run.out_dir={tmp_path / 'out'}", f"run.cache_dir={tmp_path / 'runs'}", "run.progress=false"]
    exp = tiny_experiment(load_experiment(name, sets))
    assert exp.run.trained_by == "configs/smol.json" and exp.model.source == "tiny"
    summary = run_experiment(exp)
    assert summary["data"]["train_tasks"] > 10  # the SNI training tasks, not this config's placeholder
    for method in ("zero_shot", "icl", "multitask_icl", "hyperllama", "wrong_task_prefix"):
        assert math.isfinite(summary["methods"][method]["accuracy"]), method
        assert bool(summary["methods"][method].get("median_over_templates")) == (name == "smol-p3")
    assert (tmp_path / "runs" / "tiny" / "hyper-k4-s0" / "final").exists()


@needs_data
def test_training_leaves_the_4bit_base_bit_identical(tmp_path):
    exp = tiny_experiment(load_experiment("symbol", [f"run.cache_dir={tmp_path}", "run.progress=false"]))
    b = load_bundle(exp)
    fresh = b.fresh_base()
    hyper, log = train_hyper(b, exp.hyper.num_gist_tokens, 0)
    assert log and any(p.requires_grad for p in hyper.parameters())
    before, after = _snapshot(fresh), _snapshot(hyper.base)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def _write_ag_news_layout(folder: Path, rows: list[tuple[int, str, str]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "classes.txt").write_text("World\nSports\nBusiness\n")
    lines = [f'{label},"{title}","{text}"' for label, title, text in rows]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return folder / "data.csv"


def test_a_classification_csv_runs_every_method(tmp_path):
    """The classification family reads any CSV in the AG News layout (`csv:PATH`) and feeds every method."""
    words = {1: "match election", 2: "goal team", 3: "market shares"}
    rows = [(lab, f"{w} {i}", f"news about {w} number {i}") for i in range(12) for lab, w in words.items()]
    train = _write_ag_news_layout(tmp_path / "train", rows)
    test = _write_ag_news_layout(tmp_path / "test", rows[:9])
    sets = [
        "data.family=classification", f"data.train_tasks=csv:{train}", f"data.eval_tasks=csv:{test}",
        f"run.out_dir={tmp_path / 'out'}", f"run.cache_dir={tmp_path / 'runs'}", "run.progress=false",
    ]  # fmt: skip
    exp = tiny_experiment(load_experiment("symbol", sets))
    summary = run_experiment(exp)
    assert summary["data"]["train_tasks"] == 1 and summary["data"]["test_tasks"] == 1
    for method in SCORED:
        if method == "wrong_task_prefix":  # one test task: no other task's prefix to read, said and recorded
            assert method not in summary["methods"] and "one task" in summary["skipped_methods"][method]
            continue
        assert 0.0 <= summary["methods"][method]["accuracy"] <= 1.0, method
    assert list(summary["methods"]["icl"]["by_group"]) == ["test_data"]


def test_wrong_task_rows_point_at_another_task():
    from gistlib.data import Episode

    eps = [Episode(t, [], []) for t in ["a", "a", "b", "c", "c", "a"]]
    rows = other_task_rows(eps)
    assert len(rows) == len(eps) and all(eps[r].task != ep.task for r, ep in zip(rows, eps))
    assert rows == [2, 2, 3, 5, 5, 2]  # the next episode of another task, cyclically
    with pytest.raises(ValueError, match="two tasks"):
        other_task_rows([Episode("a", [], []), Episode("a", [], [])])


def test_validation_tasks_are_held_out_of_training():
    from gistlib.data import Example, Task
    from gistlib.data.sources import _hold_out

    tasks = [Task(f"t{i}", [Example("x", "y")]) for i in range(10)]
    train, val = _hold_out(tasks, [], 3, seed=0)
    assert len(val) == 3 and len(train) == 7 and not {t.name for t in train} & {t.name for t in val}
    assert [t.name for t in _hold_out(tasks, [], 3, seed=0)[1]] == [t.name for t in val]  # seeded
    assert _hold_out(tasks, tasks[:1], 3, seed=0) == (tasks, tasks[:1])  # a real validation split is kept
    with pytest.raises(ValueError, match="no training task"):
        _hold_out(tasks, [], 10, seed=0)


def test_median_over_templates_is_t0s_protocol():
    """Per dataset, the median over templates of each template's mean accuracy; nothing for non-template tasks."""
    from types import SimpleNamespace

    from gistlib.course.runner import median_over_templates

    tasks = ["cb__t1", "cb__t1", "cb__t2", "cb__t3", "rte__a", "rte__b"]
    eps = [SimpleNamespace(task=t) for t in tasks]
    res = SimpleNamespace(per_episode=[1.0, 0.5, 0.25, 0.5, 0.0, 1.0])
    # cb: templates 0.75, 0.25, 0.5 -> median 0.5; rte: 0.0, 1.0 -> 0.5 (the mean of the middle two)
    assert median_over_templates(res, eps) == {"cb": 0.5, "rte": 0.5}
    assert median_over_templates(res, [SimpleNamespace(task="task1155")] * 6) == {}


def test_the_curriculum_feeds_its_levels_first_then_every_task(tmp_path):
    """train.curriculum_*: the first curriculum_steps x batch episodes come from the named levels only; the stream
    then draws from every training task; a level no training task has is refused by name."""
    from gistlib.course.runner import _training_episodes

    exp = _smoke(tmp_path, 'train.curriculum_levels=["C2"]', "train.curriculum_steps=3")
    b = load_bundle(exp)
    level = {t.name: t.meta["level"] for t in b.source.train}
    assert {"C2", "C4"} <= set(level.values())
    stream = _training_episodes(b, seed=0, num_queries=1, episodes_per_step=5)
    head = [next(stream) for _ in range(15)]
    assert {level[e.task] for e in head} == {"C2"}
    rest = [level[next(stream).task] for _ in range(200)]
    assert len(set(rest)) > 1
    bad = replace(exp, train=replace(exp.train, curriculum_levels=("C9",)))
    with pytest.raises(ValueError, match="curriculum_levels"):
        _training_episodes(replace(b, exp=bad), 0, 1, 5)


def test_training_side_by_side_gives_the_numbers_of_one_process(tmp_path):
    """run.workers=2 trains every model in two spawned processes at one thread each, and tunes the prefix ladder
    there too; the summary's trained numbers, ladder and training logs equal those of another run in one process
    at one thread (so two runs with the same settings give the same numbers), and the environment records how
    the models were trained."""
    methods = 'methods.enabled=["zero_shot","gisting","hyperllama","multitask_icl","prefix_tuning"]'
    one = run_experiment(_smoke(tmp_path / "one", methods, "run.threads=1", "run.workers=1"))
    base = f"model.path={tmp_path / 'one' / 'runs' / 'base'}"
    two = run_experiment(_smoke(tmp_path / "two", methods, base, "run.threads=2", "run.workers=2"))
    assert two["environment"]["training_processes"] == 2 and two["environment"]["training_threads"] == 1
    assert "training_side_by_side" in two["timings_s"]
    assert one["environment"]["training_processes"] == 1
    for name in ("gisting", "hyperllama", "multitask_icl"):
        assert two["methods"][name]["accuracy"] == one["methods"][name]["accuracy"], name
    assert list(two["prefix_tuning"]) == [f"prefix_tuning_{s}" for s in ("random", "vocab", "hyperllama")]
    assert two["prefix_tuning"] == one["prefix_tuning"]
    for log in one["logs"]:
        assert [r["loss"] for r in two["logs"][log]] == [r["loss"] for r in one["logs"][log]], log


def test_a_try_on_the_plateau_is_marked_and_another_sub_seed_trains(tmp_path):
    """train.plateau_*: a try below zero-shot validation + margin at plateau_step stops, is marked, and the next
    try (another sub-seed, in try1/) trains to the end and is kept; a second call loads it with its log."""
    from gistlib.course.report import _tries
    from gistlib.course.runner import PLATEAU_MARK, train_gisting, tries_used

    sets = ["train.plateau_tries=2", "train.plateau_step=2", "train.plateau_margin=2.0"]  # a margin nothing meets
    exp = _smoke(tmp_path, *sets)
    b = load_bundle(exp)
    for train_fn, name, stage in ((train_hyper, "hyper-k2-s0", "multitask"), (train_gisting, "gisting-k2-s0", "run")):
        _, records = train_fn(b, 2, 0)
        run = tmp_path / "runs" / name
        mark = json.loads((run / PLATEAU_MARK).read_text())  # try 0's folder is the run's own
        assert mark["step"] == 2 and mark["best"] < mark["level"]
        first = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert first[-1]["step"] == 2 and first[-1]["plateau"] is True  # stopped at the check
        kept = [json.loads(x) for x in (run / "try1" / stage / "metrics.jsonl").read_text().splitlines()]
        assert records == kept and records[-1]["step"] == exp.train.hyper_steps
        assert not records[-1].get("plateau")  # the last try trains to the end
        assert not (run / "try1" / PLATEAU_MARK).exists() and (run / "final").exists()
        _, again = train_fn(b, 2, 0)
        assert [r["loss"] for r in again] == [r["loss"] for r in records]
        assert tries_used(b, name) == 2 and _tries({"tries": 2}) == " (2 tries)"
    assert tries_used(b, "hyper-k2-s7") == 1 and _tries({}) == ""  # not cached: one try
