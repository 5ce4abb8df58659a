"""environment.yml must name the same packages as pyproject.toml (the single source of truth)."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def _spec(req: str) -> str:
    return req.strip()[len(_name(req)) :].replace(" ", "")


def test_environment_yml_names_the_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_reqs = list(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        pip_reqs += reqs
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = [], []
    for dep in env["dependencies"]:
        (pip.extend(dep["pip"]) if isinstance(dep, dict) else conda.append(dep))
    listed = {_name(d): _spec(d) for d in conda + [p for p in pip if not p.startswith("-e")]}
    for req in pip_reqs:
        name = CONDA_NAMES.get(_name(req), _name(req))
        assert name in listed, f"environment.yml lacks {name} (pyproject.toml: {req})"
        assert listed[name] == _spec(req), f"{name}: environment.yml says {listed[name]!r}, pyproject {_spec(req)!r}"
    extra_names = set(listed) - {CONDA_NAMES.get(_name(r), _name(r)) for r in pip_reqs} - {"python", "pip"}
    assert not extra_names, f"environment.yml names packages pyproject.toml does not: {extra_names}"
    assert any(p.startswith("-e .[") for p in pip), "environment.yml must install the package itself via pip"


def test_the_readme_commands_are_the_makefile_targets():
    """README's first command (`make main`) runs the pocket config; `.ci/run` runs `make test`."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make main", "make test"]
    make = (ROOT / "Makefile").read_text()
    main_recipe = make.split("\nmain:", 1)[1].split("\n\n", 1)[0]
    assert "-m gistlib run configs/pocket.json" in main_recipe, "make main must run the pocket config"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
