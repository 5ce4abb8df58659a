"""The training loop: loss falls, exact resume, atomic checkpoints, config errors, early stopping."""

import json

import pytest
import torch
from conftest import GIST_IDS

from gistlib.core.hyper import HyperConfig, HyperLlama
from gistlib.models.tiny import build_tiny_llama
from gistlib.train.loop import TrainConfig, latest_checkpoint, lr_factor, train


def signal_batches(seed=0, batch=8):
    """Endless stream of the 'copy the signal token from the demos' task, seeded."""
    g = torch.Generator().manual_seed(seed)
    while True:
        signal = torch.randint(3, 7, (batch, 1), generator=g)
        demos = torch.cat([torch.randint(10, 56, (batch, 3), generator=g), signal], 1)
        h_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), demos, torch.tensor([GIST_IDS] * batch)], 1)
        ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), 8), signal], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        yield {
            "hyper_input_ids": h_ids,
            "hyper_attention_mask": torch.ones_like(h_ids),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
        }


def fresh_hyper():
    base = build_tiny_llama(vocab_size=64, initializer_range=0.1)
    return HyperLlama(base, GIST_IDS, HyperConfig(num_gist_tokens=len(GIST_IDS)))


def config(tmp_path, **kw):
    return TrainConfig(
        **{
            "steps": 12,
            "lr": 1e-2,
            "warmup_steps": 2,
            "log_every": 4,
            "out_dir": str(tmp_path),
            "progress": False,
            **kw,
        }
    )


def test_loss_falls_and_metrics_are_logged(tmp_path):
    records = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=30))
    assert [r["step"] for r in records] == list(range(1, 31))
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == records
    assert all({"step", "loss", "lr"} <= r.keys() for r in logged)
    assert "tokens_per_s" in logged[3] and logged[3]["tokens_per_s"] > 0
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    print(f"train loop loss: first 5 {first:.3f}, last 5 {last:.3f}")
    assert last < 0.6 * first
    assert latest_checkpoint(tmp_path).name == "checkpoint-30"


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path):
    cfg = dict(steps=10, grad_accum=2, weight_decay=0.01)
    full = train(fresh_hyper(), signal_batches(), config(tmp_path / "a", **cfg))
    first = train(fresh_hyper(), signal_batches(), config(tmp_path / "b", **cfg), stop_after=4)
    assert len(first) == 4 and latest_checkpoint(tmp_path / "b").name == "checkpoint-4"
    resumed_model = fresh_hyper()
    resumed = train(resumed_model, signal_batches(), config(tmp_path / "b", **cfg))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full]


def test_checkpoints_are_atomic_and_safetensors_only(tmp_path):
    train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4, save_every=2))
    (tmp_path / "checkpoint-6.tmp").mkdir()  # a crash mid-write leaves only a .tmp folder
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    files = {p.suffix for p in (tmp_path / "checkpoint-4").rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json", ".md"}, files


def test_early_stopping_keeps_the_best(tmp_path):
    scores = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.1])
    records = train(
        fresh_hyper(),
        signal_batches(),
        config(tmp_path, steps=12, eval_every=2, patience=2),
        evaluate=lambda hyper, step: next(scores),
    )
    assert records[-1]["step"] == 8  # evals at 2, 4 (best), 6, 8: two without improvement
    state = json.loads((tmp_path / "best" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["best"] == 0.5


def test_short_stream_is_a_clear_error(tmp_path):
    from itertools import islice

    with pytest.raises(ValueError, match="batch stream ended at step 3"):
        train(fresh_hyper(), islice(signal_batches(), 3), config(tmp_path, steps=5))


@pytest.mark.parametrize("field,value", [("steps", 0), ("lr", -1.0), ("mixed_precision", "fp8"), ("grad_accum", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"stepz": 3})


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=10, warmup_steps=2)
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0 and factors[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
