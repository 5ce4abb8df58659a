"""The one config parser: typed values, repeated overrides, tuples from one string, unknown names, file errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from gistlib.cli import main
from gistlib.config import ConfigError, apply_overrides, build, read_json
from gistlib.course.experiment import CONFIG_DIR, SECTIONS, Experiment, load_experiment


@dataclass
class Toy:
    steps: int = 1
    lr: float = 0.1
    flag: bool = False
    name: str = "x"
    families: tuple[str, ...] = ("classify",)
    budgets: tuple[int, ...] = (0,)
    path: str | None = None


def test_values_are_type_checked_before_anything_runs():
    assert build(Toy, {"steps": 3, "lr": 1, "flag": True}).lr == 1.0
    for field, bad in [("steps", 2.5), ("steps", True), ("steps", "3"), ("lr", "abc"), ("lr", False), ("flag", 1)]:
        with pytest.raises(ConfigError, match=rf"toy\.{field} = "):
            build(Toy, {field: bad}, "toy")
    assert build(Toy, {"path": None}).path is None and build(Toy, {"path": "/m"}).path == "/m"


def test_a_tuple_field_given_one_value_gets_a_one_element_tuple():
    assert build(Toy, {"families": "classify"}).families == ("classify",)  # never ('c', 'l', 'a', ...)
    assert build(Toy, {"families": ["classify", "arith"]}).families == ("classify", "arith")
    assert build(Toy, {"budgets": 5}).budgets == (5,)
    with pytest.raises(ConfigError, match=r"toy\.budgets\[1\]"):
        build(Toy, {"budgets": [1, "x"]}, "toy")


def test_unknown_fields_and_sections_are_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"toy\.stepz.*known: steps, lr"):
        build(Toy, {"stepz": 3}, "toy")
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*known: run, model"):
        apply_overrides({}, ["trian.steps=3"], SECTIONS)
    with pytest.raises(ConfigError, match=r"unknown field 'stepz' of train.*hyper_steps"):
        apply_overrides({}, ["train.stepz=3"], SECTIONS)
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["steps=3"], SECTIONS)


def test_every_repeated_set_applies_in_order():
    exp = load_experiment("smoke", ["train.hyper_steps=7", "train.gisting_lr=0.5", "train.hyper_steps=9"])
    assert exp.train.hyper_steps == 9 and exp.train.gisting_lr == 0.5
    exp = load_experiment("smoke", ["data.train_tasks=classify", "run.seeds=[3,4]", "model.path=/somewhere"])
    assert exp.data.train_tasks == ("classify",) and exp.run.seeds == (3, 4) and exp.model.path == "/somewhere"
    with pytest.raises(ConfigError, match=r"train\.hyper_steps = 2\.5: expected int"):
        load_experiment("smoke", ["train.hyper_steps=2.5"])
    with pytest.raises(ConfigError, match=r"train\.hyper_lr = 'abc': expected float"):
        load_experiment("smoke", ["train.hyper_lr=abc"])


def test_range_errors_name_the_field_and_where_it_is_documented():
    with pytest.raises(
        ConfigError, match=r"StagesConfig\.hyper_steps = 0 is out of range.*gistlib/course/experiment.py"
    ):
        load_experiment("smoke", ["train.hyper_steps=0"])
    with pytest.raises(ConfigError, match=r"MethodsConfig\.enabled"):
        load_experiment("smoke", ["methods.enabled=[zero_shot,oracle]"])


def test_a_json_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {\n  "hyper_steps": 3,,\n}}')
    with pytest.raises(ConfigError, match=rf"{bad}:2:\d+: invalid JSON"):
        read_json(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_experiment(tmp_path / "missing.json")
    other = tmp_path / "sections.json"
    other.write_text(json.dumps({"optimizer": {}}))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) optimizer"):
        load_experiment(other)


@pytest.mark.parametrize("name", ["smoke", "pocket", "p3", "sni", "symbol", "smol"])
def test_every_tier_config_loads_and_round_trips(name):
    exp = load_experiment(CONFIG_DIR / f"{name}.json")
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert set(raw) <= set(SECTIONS)
    again = load_experiment(
        name, [f"{s}.{f}={json.dumps(v)}" for s, sec in exp.to_dict().items() for f, v in sec.items()]
    )
    assert again == exp and isinstance(exp, Experiment)


def test_the_real_data_configs_keep_the_llama2_setting():
    for name in ("p3", "sni", "symbol"):
        exp = load_experiment(name)
        assert exp.model.quantization == "nf4" and exp.data.max_hyper_tokens == 1024 and exp.data.max_tokens == 384
        assert exp.hyper.num_gist_tokens == 16 and exp.hyper.lora_rank == 8 and exp.train.adapter == "lora"


def test_cli_dump_prints_the_resolved_config(capsys):
    assert main(["run", "symbol", "--set", "data.num_demos=8", "--set", "run.seeds=[1]", "--dump"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["data"]["num_demos"] == 8 and dumped["run"]["seeds"] == [1]
    assert main(["run", "symbol", "--set", "data.num_demos=8.5", "--dump"]) == 2
    assert "data.num_demos = 8.5: expected int" in capsys.readouterr().err
