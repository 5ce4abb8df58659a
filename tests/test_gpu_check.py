"""benchmarks/gpu_check.py --tiny: the full-size GPU script, on a tiny shape on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    gpu_check = load_script()
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--tiny", "--steps", "1", "--timeout", "120", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    tiny = report["sizes"]["tiny"]
    assert tiny["base_frozen"] and tiny["base_unchanged"]
    assert all(math.isfinite(x) for x in tiny["losses"]) and tiny["tokens_per_s"] > 0
    assert tiny["peak_bytes"] > 0 and tiny["estimate_bytes"]["total"] > 0
    print(
        "gpu_check --tiny:",
        {k: tiny[k] for k in ("peak_bytes", "tokens_per_s", "estimate_without_overhead_over_measured")},
    )


def test_the_full_shapes_are_llama2():
    shapes = load_script().SHAPES
    assert shapes["7b"] == dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    )
    assert shapes["13b"]["hidden_size"] == 5120 and shapes["13b"]["num_hidden_layers"] == 40
