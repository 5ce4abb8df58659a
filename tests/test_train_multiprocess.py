"""`python -m gistlib train` from a JSON config, one process and two (accelerate + gloo on this CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gistlib.train.entry import load_run_config

CONFIG = {
    "model": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
        "initializer_range": 0.1,
    },
    "hyper": {"num_gist_tokens": 4},
    "train": {"steps": 5, "lr": 0.003, "warmup_steps": 1, "progress": False, "log_every": 1},
    "data": {"tasks_per_batch": 4, "queries_per_task": 2},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _final_loss(stdout: str) -> float:
    line = [x for x in stdout.splitlines() if x.startswith('{"final_step"')][-1]
    return json.loads(line)["final_loss"]


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    """2 ranks x 1 micro-batch == 1 rank x 2 micro-batches: same global batches, same mean gradient."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(CONFIG))
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "gistlib",
            "train",
            "--config",
            str(cfg),
            "--set",
            f'train.out_dir="{tmp_path / "one"}"',
            "train.grad_accum=2",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    accelerate = Path(sys.executable).parent / "accelerate"
    two = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "gistlib",
            "train",
            "--config",
            str(cfg),
            "--set",
            f'train.out_dir="{tmp_path / "two"}"',
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert '"processes": 2' in two.stdout
    loss_one, loss_two = _final_loss(one.stdout), _final_loss(two.stdout)
    print(f"final loss: 1 process {loss_one:.7f}, 2 processes {loss_two:.7f}")
    assert abs(loss_one - loss_two) < 1e-5
    r0, r1 = (load_file(tmp_path / "two" / f"final-rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # ranks bit-identical
    single = load_file(tmp_path / "one" / "final-rank0.safetensors")
    assert max((single[k] - r0[k]).abs().max().item() for k in r0) < 1e-4


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"train\.stepz"):
        load_run_config(None, ["train.stepz=3"])
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        load_run_config(None, ["train.lr=-1"])
    with pytest.raises(ValueError, match="data.stage"):
        load_run_config(None, ["data.stage=pretrain"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {}}))
    with pytest.raises(ValueError, match="unknown section"):
        load_run_config(str(bad))
    assert load_run_config(None, ["hyper.num_gist_tokens=8"])["hyper"].num_gist_tokens == 8
