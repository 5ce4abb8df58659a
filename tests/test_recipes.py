"""Real-data recipes: configs, task loading, and each recipe end to end on a tiny 4-bit model on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gistlib.course.recipes import (
    RECIPES,
    Recipe,
    build_tiny_checkpoint,
    get_recipe,
    load_recipe,
    load_recipe_tasks,
    main_recipe,
    run_recipe,
    set_field,
    task_texts,
    tiny_recipe,
)
from gistlib.data import LoadReport, shared_data_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA = shared_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "superglue").is_dir(), reason=f"shared data folder {DATA} is absent (set GISTLIB_DATA to the real data)"
)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_config_files_are_the_builtin_recipes(name):
    path = CONFIGS / f"{name}.json"
    assert json.loads(path.read_text()) == get_recipe(name).to_dict(), f"regenerate {path} with --dump"
    recipe = load_recipe(path)
    assert recipe == get_recipe(name)
    assert recipe.quantization == "nf4" and recipe.max_hyper_tokens == 1024 and recipe.max_tokens == 384
    assert recipe.hyper.num_gist_tokens == 16 and recipe.hyper.lora_rank == 8


def test_recipe_errors_name_the_field():
    with pytest.raises(ValueError, match="Recipe.kind"):
        Recipe(kind="glue")
    with pytest.raises(ValueError, match="unknown Recipe field"):
        Recipe.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="no field 'stepz'"):
        set_field(get_recipe("p3"), "train.stepz=3")
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        set_field(get_recipe("p3"), "train.steps=0")
    r = set_field(set_field(get_recipe("sni"), "train.steps=7"), "model=/models/llama")
    assert r.train.steps == 7 and r.model == "/models/llama"
    with pytest.raises(ValueError, match="no recipe"):
        get_recipe("t0")


@needs_data
def test_tasks_load_from_the_shared_folder():
    p3 = get_recipe("p3")
    p3.max_rows, p3.max_templates = 8, 1
    ev = load_recipe_tasks(p3, "eval")
    datasets = {t.name.split("__")[0] for t in ev}
    assert datasets == {
        "super_glue_cb",
        "super_glue_rte",
        "super_glue_copa",
        "super_glue_wic",
        "super_glue_wsc.fixed",
        "anli_r1",
        "anli_r2",
    }
    assert all(ex.choices and ex.output in ex.choices for t in ev for ex in t.examples)
    assert {t.meta["dataset"] for t in load_recipe_tasks(p3, "train")} == {"super_glue/boolq", "super_glue/multirc"}
    sym = load_recipe_tasks(get_recipe("symbol"), "eval")
    assert [t.name for t in sym] == ["cb", "rte"]
    # the shared copy holds some of the official SNI tasks: the missing ones are counted in the report
    report = LoadReport()
    train = load_recipe_tasks(get_recipe("sni"), "train", report)
    assert train and f"{756 - len(train)} task files missing" in report.skipped[0]
    test = load_recipe_tasks(get_recipe("sni"), "eval")
    assert len(test) >= 2 and all(t.definition and len(t.fixed_demos) >= 2 for t in test)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """One tiny random Llama + BPE tokenizer trained on the texts of all three tiny recipes."""
    path = tmp_path_factory.mktemp("tiny_llama")
    texts = []
    for name in RECIPES:
        r = tiny_recipe(get_recipe(name), str(path), "unused")
        texts += list(task_texts(load_recipe_tasks(r, "train") + load_recipe_tasks(r, "eval")))
    return build_tiny_checkpoint(texts, path, num_gist_tokens=4, vocab_size=1024)


@needs_data
@pytest.mark.parametrize("name", ["p3", "sni", "symbol"])
def test_recipe_runs_on_a_tiny_4bit_model(name, tiny_model, tmp_path):
    recipe = tiny_recipe(get_recipe(name), str(tiny_model), str(tmp_path))
    assert recipe.quantization == "nf4"
    result = run_recipe(recipe, tmp_path, check_frozen=True)
    assert result["base_frozen"] is True
    assert len(result["train"]) == recipe.train.steps and all(math.isfinite(r["loss"]) for r in result["train"])
    ev = result["eval"]
    assert ev["metric"] == ("rougeL" if name == "sni" else "accuracy")
    assert ev["per_task"] and all(0 <= v <= 100 for v in ev["per_task"].values()) and math.isfinite(ev["mean"])
    assert json.loads((tmp_path / "results.json").read_text())["eval"] == ev
    print(name, {k: round(v, 1) for k, v in ev["per_dataset_median"].items()}, f"loss {result['final_loss']:.3f}")


@needs_data
def test_cli_dump_and_set(capsys):
    assert main_recipe(["symbol", "--set", "num_demos=8", "--dump"]) == 0
    assert json.loads(capsys.readouterr().out)["num_demos"] == 8
