"""The pocket course in smoke tier: every method gives a number, every file exists, the cache is reused."""

import json

import pytest

from gistlib.course.pipeline import PocketConfig, run_pocket, tier_config

METHODS = ("zero_shot", "icl", "gisting", "hyperllama")
STARTS = ("prefix_tuning_random", "prefix_tuning_vocab", "prefix_tuning_hyperllama")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    cfg = tier_config("smoke", out_dir=str(root / "results"), cache_dir=str(root / "runs"), progress=False)
    return cfg, run_pocket(cfg)


def test_every_method_produced_a_number(smoke):
    cfg, summary = smoke
    for name in METHODS:
        entry = summary["methods"][name]
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["ci95"][0] <= entry["accuracy"] <= entry["ci95"][1]
        assert entry["n_episodes"] == cfg.test_episodes
    assert set(summary["methods"]["hyperllama"]["per_seed"]) == {str(s) for s in cfg.seeds}
    for start in STARTS:
        assert set(summary["prefix_tuning"][start]) == {str(b) for b in cfg.prefix_budgets}
        assert all(0 <= v["accuracy"] <= 1 for v in summary["prefix_tuning"][start].values())
    assert set(summary["gist_sweep"]) == {str(k) for k in cfg.gist_counts}
    comp = {c["k"]: c for c in summary["compression"]}
    assert comp[cfg.num_gist_tokens]["kv_ratio"] == pytest.approx(
        comp[cfg.num_gist_tokens]["prefix_kv_bytes"] / comp[cfg.num_gist_tokens]["demo_kv_bytes"]
    )


def test_files_exist(smoke):
    cfg, _ = smoke
    out = cfg.out_dir
    from pathlib import Path

    for name in ("summary.json", "results.md", "methods.png", "prefix_tuning.png", "losses.png", "tradeoff.png"):
        assert (Path(out) / name).stat().st_size > 0, name
    table = (Path(out) / "results.md").read_text()
    assert all(m in table for m in METHODS)
    assert json.loads((Path(out) / "summary.json").read_text())["tier"] == "smoke"


def test_second_run_reuses_the_cache(smoke):
    cfg, first = smoke
    again = run_pocket(cfg)
    assert again["methods"]["hyperllama"]["per_seed"] == first["methods"]["hyperllama"]["per_seed"]
    assert again["methods"]["gisting"]["accuracy"] == first["methods"]["gisting"]["accuracy"]
    assert again["timings_s"]["hyperllama"] < first["timings_s"]["hyperllama"] + 5


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="PocketConfig.num_gist_tokens"):
        PocketConfig(num_gist_tokens=0)
    with pytest.raises(ValueError, match="unknown PocketConfig field"):
        tier_config("smoke", hyper_stepz=3)
    with pytest.raises(ValueError, match="unknown tier"):
        tier_config("huge")


def test_shipped_base_matches_the_pocket_config():
    """`make main` loads data/pocket_base: its shape must be what PocketConfig and the tokenizer say."""
    from pathlib import Path

    from gistlib.data import pocket_tokenizer

    cfg = tier_config("pocket")
    path = Path(cfg.base_dir) / "config.json"
    if not path.exists():
        pytest.skip("no shipped pocket base (make main would pretrain one)")
    c = json.loads(path.read_text())
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]) == (cfg.hidden, cfg.layers, cfg.heads)
    assert (c["num_key_value_heads"], c["intermediate_size"]) == (cfg.kv_heads, cfg.mlp)
    assert c["vocab_size"] == len(pocket_tokenizer(16))
    assert (Path(cfg.base_dir) / "model.safetensors").stat().st_size < 25 * 2**20


def test_the_smoke_base_was_pretrained_in_two_stages(smoke):
    cfg, _ = smoke
    from pathlib import Path

    log = json.loads((Path(cfg.cache_dir) / "base" / "train_log.json").read_text())
    assert [r["stage"] for r in log] == [1] * cfg.base_warmup_steps + [2] * cfg.base_steps


def test_cached_models_of_another_base_are_refused(smoke, tmp_path):
    """Models cached over one base must not be evaluated over another (e.g. after rebuilding data/pocket_base)."""
    import shutil
    from pathlib import Path

    from gistlib.course.pipeline import check_cache_base

    cfg, _ = smoke
    cache = Path(cfg.cache_dir)
    check_cache_base(cache, cache / "base")  # same base: fine
    other = tmp_path / "other_base"
    shutil.copytree(cache / "base", other)
    with (other / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(RuntimeError, match="another base"):
        check_cache_base(cache, other)


def test_vocab_start_tokens_do_not_depend_on_the_process():
    """tokenizers' get_vocab() order changes between processes; the vocab prefix start must not."""
    import os
    import subprocess
    import sys

    code = "from gistlib.data import pocket_tokenizer; from gistlib.course.pipeline import word_ids_of; "
    code += "print(word_ids_of(pocket_tokenizer(16)))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1 and outs.pop().startswith("[")


def test_cached_hyperllama_of_other_settings_is_refused(smoke, tmp_path):
    """A cached HyperLlama trained with other settings (say, without distillation) is not silently reused."""
    import shutil
    from dataclasses import replace
    from pathlib import Path

    from gistlib.course.pipeline import HYPER_SETTINGS, check_run_settings

    cfg, _ = smoke
    run = Path(cfg.cache_dir) / f"hyper-k{cfg.num_gist_tokens}-s{cfg.seeds[0]}"
    assert json.loads((run / "settings.json").read_text())["distill_weight"] == cfg.distill_weight
    check_run_settings(run, cfg, HYPER_SETTINGS)  # same settings: fine
    with pytest.raises(RuntimeError, match=r"distill_weight: 3\.0 -> 0\.0.*delete"):
        check_run_settings(run, replace(cfg, distill_weight=0.0), HYPER_SETTINGS)
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    (old / "settings.json").unlink()  # a run cached before settings were recorded
    with pytest.raises(RuntimeError, match="before its settings were recorded"):
        check_run_settings(old, cfg, HYPER_SETTINGS)
