"""What is on disk always matches what was asked: run locks, damaged checkpoints, resume with changed
settings, located data errors, the CSV classification reader, checked gist positions."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import GIST_IDS, PAD
from test_train import config, fresh_hyper, signal_batches

from gistlib.core.prefix import extract_prefix, gist_positions
from gistlib.data import DataError, LoadReport, read_csv_classification
from gistlib.data.episodes import load_tasks_jsonl, tasks_from_rows
from gistlib.data.p3 import read_raw_rows
from gistlib.data.sni import load_sni_task, load_sni_tasks
from gistlib.data.symbol import read_nli_jsonl, read_sst2
from gistlib.train.loop import ResumeMismatchError, RunLockedError, check_checkpoint, train

# ----------------------------------------------------------------------------- 1. one run per folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_lock_refuses_a_second_run(tmp_path):
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}
    (tmp_path / "train.lock").write_text(json.dumps(holder))
    with pytest.raises(RunLockedError, match=rf"{tmp_path}.*pid {os.getppid()} on host {socket.gethostname()}"):
        train(fresh_hyper(), signal_batches(), config(tmp_path, steps=2))
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "metrics.jsonl").exists()
    (tmp_path / "train.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # cannot check: refused
    with pytest.raises(RunLockedError, match="pid 1 on host elsewhere"):
        train(fresh_hyper(), signal_batches(), config(tmp_path, steps=2))


def test_a_stale_lock_is_taken_over_and_locks_are_released(tmp_path):
    (tmp_path / "train.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match="stale lock"):
        records = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=2))
    assert len(records) == 2 and not (tmp_path / "train.lock").exists()
    from itertools import islice

    with pytest.raises(ValueError, match="batch stream ended"):  # released on an exception too
        train(fresh_hyper(), islice(signal_batches(), 1), config(tmp_path / "b", steps=3))
    assert not (tmp_path / "b" / "train.lock").exists()


# ----------------------------------------------------------------------------- 2. damaged checkpoints


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    full = train(fresh_hyper(), signal_batches(), config(tmp_path / "full", steps=6))
    train(fresh_hyper(), signal_batches(), config(tmp_path / "run", steps=6, save_every=2), stop_after=4)
    opt = tmp_path / "run" / "checkpoint-4" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-7])  # truncated
    assert "optimizer.safetensors" in check_checkpoint(opt.parent)
    with pytest.warns(UserWarning, match=r"checkpoint-4 is damaged.*optimizer.safetensors.*truncated"):
        resumed = train(fresh_hyper(), signal_batches(), config(tmp_path / "run", steps=6, save_every=2))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # resumed exactly from step 2


def test_no_intact_checkpoint_starts_afresh_and_says_so(tmp_path):
    train(fresh_hyper(), signal_batches(), config(tmp_path, steps=2))
    state = tmp_path / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    with pytest.warns(UserWarning) as caught:
        records = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=2))
    messages = [str(w.message) for w in caught]
    assert any("trainer_state.json" in m and "not valid JSON" in m for m in messages)
    assert any("no intact checkpoint" in m and "step 0" in m for m in messages)
    assert [r["step"] for r in records] == [1, 2]


def test_a_torn_metrics_line_is_dropped_and_deleted_metrics_do_not_crash(tmp_path):
    train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4), stop_after=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropping a damaged metrics line"):
        records = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    (tmp_path / "metrics.jsonl").unlink()  # a finished run without its metrics
    with pytest.warns(UserWarning, match="lacks the records"):
        again = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4))
    assert again[-1]["step"] == 4 and again[-1]["loss"] == records[-1]["loss"]


# ----------------------------------------------------------------------------- 3. resume with changed settings


def test_resume_with_changed_trajectory_settings_is_refused(tmp_path):
    train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4), stop_after=2)
    with pytest.raises(ResumeMismatchError, match=r"lr: 0.01 -> 0.02; seed: 0 -> 1.*allow_changed_resume") as e:
        train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4, lr=2e-2, seed=1))
    assert str(tmp_path) in str(e.value) and "grad_accum" not in str(e.value)
    with pytest.warns(UserWarning, match="allowed: allow_changed_resume"):
        records = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=3, lr=2e-2, allow_changed_resume=True))
    assert records[-1]["step"] == 3
    # extending the run and changing bookkeeping is fine
    records = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=5, lr=2e-2, log_every=1, save_every=1))
    assert records[-1]["step"] == 5


def test_checkpoints_of_older_code_resume_with_a_warning(tmp_path):
    train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4), stop_after=2)
    path = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["train_config"], state["mixed_precision_effective"]
    path.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="records no TrainConfig"):
        records = train(fresh_hyper(), signal_batches(), config(tmp_path, steps=4, lr=5e-3))
    assert records[-1]["step"] == 4


# ----------------------------------------------------------------------------- 4. data errors, located


def _sni(tmp_path, instances, name="task1_toy"):
    task = {"Definition": ["Do it"], "Positive Examples": [{"input": "a", "output": "b"}], "Instances": instances}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(task, indent=1))
    return p


def test_non_utf8_bytes_are_located(tmp_path):
    p = tmp_path / "tasks.jsonl"
    good = json.dumps({"name": "t", "examples": [{"input": "a", "output": "b"}]}).encode()
    p.write_bytes(good + b"\n" + good[:-3] + b"\xff\xfe" + good[-3:] + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=r"tasks.jsonl:2: not valid UTF-8 \(byte\(s\) ff at column"):
        load_tasks_jsonl(p)
    report = LoadReport()
    assert len(load_tasks_jsonl(p, report)) == 2 and report.by_reason["not_utf8"] == 1
    s = _sni(tmp_path, [{"input": "x", "output": ["y"]}])
    s.write_bytes(s.read_bytes().replace(b'"x"', b'"\xe9"'))
    with pytest.raises(DataError, match=r"task1_toy.json:13, task 'task1_toy': not valid UTF-8"):
        load_sni_task(s)
    sst = tmp_path / "sst2" / "stsa.binary.train"
    sst.parent.mkdir()
    sst.write_bytes(b"1 fine\n0 caf\xe9 bad\n")
    with pytest.raises(DataError, match=r"stsa.binary.train:2, task 'sst2': not valid UTF-8"):
        read_sst2("train", tmp_path)
    csv_path = tmp_path / "anli" / "ANLI_analysis_r1_dev.csv"
    csv_path.parent.mkdir()
    csv_path.write_bytes(b'uid,context\n1,"two\nlines"\n2,b\xff\n')
    with pytest.raises(DataError, match=r"ANLI_analysis_r1_dev.csv:4, task 'anli': not valid UTF-8"):
        read_raw_rows("anli", "r1", tmp_path)


def test_wrong_types_and_empty_fields_are_located_or_counted(tmp_path):
    p = _sni(tmp_path, [{"input": "x", "output": ["y"]}, {"input": 7, "output": ["z"]}, {"input": "q", "output": [""]}])
    with pytest.raises(DataError, match=r"task1_toy.json:\d+, field 'Instances\[1\].input'.*must be a string, got int"):
        load_sni_task(p)
    with pytest.raises(DataError) as e:
        load_sni_task(p)
    assert e.value.line == p.read_text().splitlines().index('   "input": 7,')  # the line of its "{" (1-based)
    report = LoadReport()
    task = load_sni_task(p, report=report)
    assert len(task.examples) == 1 and report.by_reason == {"wrong_type": 1, "empty_output": 1}
    assert report.loaded + sum(report.by_reason.values()) == 3
    rows = [{"task": "t", "input": "", "output": "b"}, {"task": "t", "input": "a", "output": 3}]
    report = LoadReport()
    assert tasks_from_rows(rows, report) == [] and report.by_reason == {"empty_input": 1, "wrong_type": 1}
    nli = tmp_path / "cb.jsonl"
    nli.write_text(json.dumps({"premise": 5, "hypothesis": "h", "label": "e"}) + "\n")
    with pytest.raises(DataError, match=r"cb.jsonl:1, field 'premise'.*got int"):
        read_nli_jsonl(nli, "cb")
    tj = tmp_path / "t.jsonl"
    tj.write_text(json.dumps({"name": "t", "examples": [{"input": " ", "output": "b"}]}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1, field 'examples\[0\].input'.*empty"):
        load_tasks_jsonl(tj)


def test_a_task_with_no_instance_left_is_counted(tmp_path):
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("task1_toy\ntask2_ok\n")
    (tmp_path / "tasks").mkdir()
    _sni(tmp_path / "tasks", [{"input": "", "output": ["y"]}], "task1_toy")
    _sni(tmp_path / "tasks", [{"input": "x", "output": ["y"]}], "task2_ok")
    with pytest.raises(DataError, match="task1_toy.*empty"):
        load_sni_tasks("test", tmp_path)
    report = LoadReport()
    tasks, missing = load_sni_tasks("test", tmp_path, report=report)
    assert [t.name for t in tasks] == ["task2_ok"] and missing == []
    assert report.by_reason == {"empty_input": 1, "no_examples": 1} and "task1_toy" in report.empty_tasks[0]


# ----------------------------------------------------------------------------- 5. CSV classification reader


def test_csv_classification_reader(tmp_path):
    (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('"3","Wall St. Bears","Short-sellers are back."\n"2","Goal!","A ""quoted""\nline"\n')
    task = read_csv_classification(csv_path, tmp_path / "classes.txt", "ag_news")
    assert task.name == "ag_news" and task.family == "classification"
    assert [(e.input, e.output) for e in task.examples] == [
        ("Wall St. Bears Short-sellers are back.", "Business"),
        ('Goal! A "quoted"\nline', "Sports"),
    ]
    only_title = read_csv_classification(csv_path, ["a", "b", "c"], "x", text_columns=[1])
    assert only_title.examples[0].input == "Wall St. Bears" and only_title.examples[0].output == "c"
    with csv_path.open("a") as f:
        f.write('"5","Bad","label"\n"0","also","bad"\n')
    with pytest.raises(DataError, match=r"train.csv:4, field 'column 0'.*label index '5'.*1..4"):
        read_csv_classification(csv_path, tmp_path / "classes.txt")
    report = LoadReport()
    task = read_csv_classification(csv_path, tmp_path / "classes.txt", report=report)
    assert len(task.examples) == 2 and report.loaded == 2 and report.by_reason == {"bad_label": 2}
    assert "train.csv:5" in report.skipped[1]


# ----------------------------------------------------------------------------- 6. gist positions


@pytest.mark.parametrize(
    "row,am,match",
    [
        ([5, 6, 60, 0], [1, 1, 1, 0], r"k=2 gist tokens \[60, 61\]: row 1 holds 1"),
        ([5, 6, 61, 60], [1, 1, 1, 1], r"out of order, expected \[60, 61\]: row 1 has \[61, 60\]"),
        ([5, 60, 6, 61], [1, 1, 1, 1], r"not one contiguous span in row\(s\) \[1\]"),
        ([5, 6, 60, 61], [1, 1, 1, 0], r"fall on padding .* row\(s\) \[1\]"),
    ],
)
def test_bad_gist_rows_are_named(tiny_models, row, am, match):
    ids = torch.tensor([[5, 6, 60, 61], row])
    mask = torch.tensor([[1, 1, 1, 1], am])
    with pytest.raises(ValueError, match=match):
        gist_positions(ids, [60, 61], mask)
    with pytest.raises(ValueError, match=match):
        extract_prefix(tiny_models["sdpa"], ids, mask, [60, 61])


def test_a_repeated_single_gist_id_still_works():
    ids = torch.tensor([[5, 9, 9, PAD], [5, 6, 9, 9]])
    got = gist_positions(ids, 9, (ids != PAD).long())
    assert got.tolist() == [[1, 2], [2, 3]]
    assert gist_positions(torch.tensor([[1] + GIST_IDS]), GIST_IDS, torch.ones(1, 5)).tolist() == [[1, 2, 3, 4]]
