"""Every lesson notebook runs top to bottom in the smoke tier (papermill), and reports numbers we assert.

Executed copies and their JSON results go to a temporary folder; trained smoke models are shared
between the notebooks through one temporary RUN_DIR, as a learner's runs/ folder would be.
The committed notebooks must carry no outputs and no widget state, and each must have the same cells as
its jupytext pair `notebooks/0N_*.py` (edit the .py, then `jupytext --sync notebooks/0*.py`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("0*.ipynb"))
SCRIPTS = sorted(NB_DIR.glob("0*.py"))  # the jupytext pairs of NOTEBOOKS
# 07: its config (configs/symbol.json) reads SST-2/TREC/CB/RTE; 08: configs/smol.json reads the SNI tasks
NEEDS_SHARED_DATA = {"07_llama2_4bit", "08_real_language"}
# a lesson's own knobs (not in configs/) set smaller for the smoke run; tier values come from configs/smoke.json
SMOKE_PARAMETERS = {"05_inspecting_prefixes": {"TASKS_PER_LEVEL": 2}}
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def test_the_lessons_are_numbered_in_order():
    """01 to 07 at least (the course), then any later lesson, with no number missing."""
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert len(numbers) >= 7 and numbers == [f"{i:02d}" for i in range(1, len(numbers) + 1)], numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_or_widget_state(path):
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata, "widget state is saved in the notebook metadata: clear it"
    assert nb.metadata["kernelspec"]["name"] == "python3" and nb.metadata["language_info"]["name"] == "python"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: a code cell has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells.index(tagged[0]) == 1, "the parameters cell comes right after the title"


def out_of_sync(script: Path, notebook: Path) -> list[str]:
    """How the committed notebook's cells (type, source, tags) differ from its jupytext .py; [] when in sync."""
    import jupytext

    want, have = jupytext.read(script).cells, nbformat.read(notebook, as_version=4).cells
    problems = [f"{script.name} has {len(want)} cells, {notebook.name} {len(have)}"] if len(want) != len(have) else []
    for i, (w, h) in enumerate(zip(want, have)):
        w, h = _cell_fields(w), _cell_fields(h)
        problems += [f"cell {i}: the {what} differs" for what in w if w[what] != h[what]]
    return problems


def _cell_fields(cell) -> dict:
    return {"type": cell.cell_type, "source": cell.source, "tags": cell.metadata.get("tags", [])}


def test_every_notebook_has_its_pair():
    assert [p.stem for p in SCRIPTS] == [p.stem for p in NOTEBOOKS], "each 0N_*.ipynb needs its 0N_*.py and vice versa"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_is_in_sync_with_its_script(script):
    pytest.importorskip("jupytext")
    problems = out_of_sync(script, script.with_suffix(".ipynb"))
    assert not problems, f"{script.name} and its .ipynb differ ({'; '.join(problems)}): jupytext --sync notebooks/0*.py"


def test_out_of_sync_is_detected(tmp_path):
    pytest.importorskip("jupytext")
    script, notebook = tmp_path / SCRIPTS[0].name, tmp_path / NOTEBOOKS[0].name
    notebook.write_text(NOTEBOOKS[0].read_text())
    script.write_text(SCRIPTS[0].read_text())
    assert out_of_sync(script, notebook) == []
    text = SCRIPTS[0].read_text()
    line = "ROOT, DEVICE, T0, RESULTS = begin(TIER, SEED, THREADS)"
    assert line in text
    script.write_text(text.replace(line, line.replace("SEED", "SEED + 1"), 1))  # a code cell
    assert out_of_sync(script, notebook) == ["cell 2: the source differs"]


def parameter_names(path: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(path)))


def run_notebook(path: Path, out_dir: Path, **parameters) -> dict:
    """Execute `path` with papermill (smoke tier); return the JSON results it wrote."""
    import papermill

    known = parameter_names(path)
    unknown = set(parameters) - known
    if unknown:  # papermill itself only warns
        raise ValueError(f"{path.name} has no parameter(s) {sorted(unknown)}; it has {sorted(known)}")
    results = out_dir / f"{path.stem}.json"
    papermill.execute_notebook(
        str(path),
        str(out_dir / path.name),
        parameters={**parameters, "RESULTS_PATH": str(results)},
        kernel_name="python3",
        cwd=str(NB_DIR),
        progress_bar=False,
        execution_timeout=600,  # a cell that hangs fails the test instead of the whole CI run
    )
    return json.loads(results.read_text())


@pytest.mark.parametrize("path", NOTEBOOKS[1:], ids=lambda p: p.stem)
def test_tier_values_come_from_the_config(path):
    """Lessons 2-7 take the tier's values from configs/ (changed through OVERRIDES), not from 0 placeholders."""
    names = parameter_names(path)
    assert {"TIER", "SEED", "THREADS", "OVERRIDES", "RESULTS_PATH"} <= names
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assert "0: the tier" not in cell.source and "[]: the tier" not in cell.source


def smoke_parameters(path: Path, run_dir: Path) -> dict:
    """The parameters that run lesson `path` in the smoke tier on one thread, its models under `run_dir` (shared
    by all lessons, as a learner's runs/); tests/test_browser.py runs the lessons in JupyterLab with them too."""
    params = {"TIER": "smoke", "THREADS": 1, **SMOKE_PARAMETERS.get(path.stem, {})}
    if "RUN_DIR" in parameter_names(path):
        params["RUN_DIR"] = str(run_dir)
    return params


def test_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="NO_SUCH_PARAMETER"):
        run_notebook(NOTEBOOKS[0], tmp_path, TIER="smoke", NO_SUCH_PARAMETER=1)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """All notebooks executed once in the smoke tier, in order; {stem: results}."""
    for key, value in THREAD_ENV.items():
        os.environ[key] = value  # the kernel inherits these: one thread each on a shared CI machine
    out = tmp_path_factory.mktemp("notebooks")
    from gistlib.data import shared_data_dir

    results = {}
    for path in NOTEBOOKS:
        if path.stem in NEEDS_SHARED_DATA and not shared_data_dir().exists():
            results[path.stem] = pytest.skip.Exception(f"{shared_data_dir()} is absent (real datasets for the recipe)")
            continue
        params = smoke_parameters(path, out / "runs")
        try:
            results[path.stem] = run_notebook(path, out, **params)
        except Exception as err:  # reported by that notebook's own test, not by every test of the module
            results[path.stem] = err
    return results


def results_of(smoke_runs, stem: str) -> dict:
    """The notebook's JSON results; re-raises its failure (or skip) inside the test that asks for it."""
    r = smoke_runs[stem]
    if isinstance(r, pytest.skip.Exception):
        pytest.skip(str(r))
    if isinstance(r, BaseException):
        raise r
    return r


def test_01_gist_masks(smoke_runs):
    r = results_of(smoke_runs, "01_gist_masks")
    assert r["tier"] == "smoke" and r["naive_equals_library"] is True
    assert r["mask_shape"][:2] == [1, 1] and r["mask_shape"][2] == r["mask_shape"][3]
    assert r["pad_keys_seen_left"] == r["pad_keys_seen_right"] == 0
    assert r["hidden_mass_additive"] == 0.0 and r["hidden_mass_boolean"] > 0.01
    assert r["future_mass_boolean"] > 0.01
    assert r["negative_control_logit_change"]["additive"] == 0.0
    assert r["negative_control_logit_change"]["boolean"] > 0


def test_02_gisting(smoke_runs):
    r = results_of(smoke_runs, "02_gisting")
    assert r["caching_max_abs_diff"] < 1e-4
    n, B, H, k, hd = r["prefix_shape"]
    assert B == 1 and k == 2
    assert set(r["accuracy"]) == {"zero_shot", "icl", "gisting k=1", "gisting k=2"}
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    for first, last in r["gisting_loss_first_last"].values():
        assert math.isfinite(first) and math.isfinite(last) and last < first  # the loss fell


def test_03_attention_maps(smoke_runs):
    r = results_of(smoke_runs, "03_attention_maps")
    layers, B, heads, L, L2 = r["attention_shape"]
    assert B == 1 and L == L2 and layers == 2 and heads == 2
    assert r["hidden_attention_max"] == 0.0
    assert 0.0 < r["gist_attention_mean"] <= 1.0
    assert 0.0 < r["icl_attention_on_demos_mean"] < 1.0


def test_04_training_hyperllama(smoke_runs):
    r = results_of(smoke_runs, "04_training_hyperllama")
    assert r["base_frozen"] is True and r["trainable_moved"] > 0
    assert r["trainable_parameters"] < r["total_parameters"]
    assert r["loss_end"] < r["loss_start"]  # the loss fell
    assert len(r["validation"]) == 3  # 30 steps, validated every 10
    assert set(r["accuracy"]) == {"zero_shot", "icl", "hyperllama"}


def test_05_inspecting_prefixes(smoke_runs):
    r = results_of(smoke_runs, "05_inspecting_prefixes")
    n, B, H, k, hd = r["prefix_shape"]
    assert (n, H, k) == (2, 1, 2) and B == 3 * 2 * 3  # 3 levels x 2 tasks x 3 demo sets
    assert len(r["key_norm_per_layer"]) == n and all(v > 0 for v in r["key_norm_per_layer"])
    assert r["projection_shape"] == [B, 2]
    assert -1.0 <= r["similarity_other_task"] <= 1.0 and -1.0 <= r["similarity_same_task"] <= 1.0
    assert r["change_all_demos"] == 0.0 and r["change_no_demos"] > 0
    assert r["playground_rows"] == 2


def test_06_prefix_initialisation(smoke_runs):
    r = results_of(smoke_runs, "06_prefix_initialisation")
    assert set(r["ladder"]) == {"random", "vocab", "hyperllama"}
    for per in r["ladder"].values():
        assert list(per) == ["0", "2", "4"] and all(0.0 <= a <= 1.0 for a in per.values())
    assert r["hyperllama_better_start"] in (True, False, None)


def test_07_llama2_4bit(smoke_runs):
    r = results_of(smoke_runs, "07_llama2_4bit")
    assert r["linear4bit_layers"] == 2 * 7 and r["quant_type"] == "nf4"
    assert r["base_frozen"] is True and math.isfinite(r["final_loss"]) and r["steps"] >= 1
    assert 5 < r["llama2_7b_nf4_estimate_gib"] < 24
    assert 0.0 <= r["eval_mean"] <= 100.0
    assert {"zero_shot", "icl", "multitask_icl", "gisting", "hyperllama"} <= set(r["accuracy"])  # every method
    assert set(r["prefix_tuning"]) == {f"prefix_tuning_{s}" for s in ("random", "vocab", "hyperllama")}
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())


def test_08_real_language(smoke_runs):
    """The English task and the held-out SNI task: one prefix each, every method's answers, the compression."""
    r = results_of(smoke_runs, "08_real_language")
    for part in ("english", "sni"):
        s = r[part]
        n, B, H, k, hd = s["prefix_shape"]
        assert B == 1 and k == 4 and s["demo_kv_bytes"] > s["prefix_bytes"] > 0
        assert {"hyperllama", "icl", "multitask_icl", "definition_only", "zero_shot"} <= set(s["answers"])
        assert all(len(a) == len(s["queries"]) for a in s["answers"].values())
        assert all(v is None or 0.0 <= v <= 1.0 for v in s["rouge_l"].values())
    assert "wrong_task_prefix" in r["sni"]["answers"] and r["sni"]["task"].startswith("task1159")
