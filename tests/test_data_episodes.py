"""Episodes: seeded sampling, proportional task choice, disjointness, files and HF datasets interop, bad input."""

import json
import random
from collections import Counter

import pytest

from gistlib.data import (
    DataError,
    EpisodeSampler,
    Example,
    LoadReport,
    Task,
    load_tasks_jsonl,
    sample_episode,
    save_rows_jsonl,
    save_tasks_jsonl,
    tasks_from_dataset,
    tasks_to_dataset,
)


def make_tasks():
    return [
        Task("small", [Example(f"s{i}", str(i % 2)) for i in range(10)]),
        Task(
            "big",
            [Example(f"b{i}", str(i % 4), ["0", "1", "2", "3"]) for i in range(200)],
            "Do it.",
            "fam",
            {"level": 2},
        ),
        Task("tiny", [Example("t0", "x")]),  # too small for an episode
    ]


def as_tuples(ep):
    return (ep.task, [(d.input, d.output) for d in ep.demos], [(q.input, q.output) for q in ep.queries])


def test_sampler_reproducible_and_disjoint():
    s = EpisodeSampler(make_tasks(), num_demos=4, num_queries=3, cap=50, seed=7)
    a, b = s.take(50), s.take(50)
    assert [as_tuples(e) for e in a] == [as_tuples(e) for e in b]
    other = EpisodeSampler(make_tasks(), num_demos=4, num_queries=3, cap=50, seed=8).take(50)
    assert [as_tuples(e) for e in a] != [as_tuples(e) for e in other]
    for ep in a:
        assert len(ep.demos) == 4 and len(ep.queries) == 3
        assert not {d.input for d in ep.demos} & {q.input for q in ep.queries}
    assert s.report.num_skipped == 1 and "tiny" in s.report.skipped[0]


def test_task_sampling_proportional_to_capped_size():
    s = EpisodeSampler(make_tasks(), num_demos=2, num_queries=1, cap=40, seed=0)
    counts = Counter(e.task for e in s.take(3000))
    # weights 10 : min(200, 40) = 40 -> P(small) = 0.2
    assert abs(counts["small"] / 3000 - 0.2) < 0.03


def test_balanced_demos_and_repeat_curriculum():
    task = make_tasks()[1]
    ep = sample_episode(task, 8, 4, random.Random(0), balanced=True)
    assert Counter(d.output for d in ep.demos) == {"0": 2, "1": 2, "2": 2, "3": 2}
    rng = random.Random(1)
    eps = [sample_episode(task, 8, 4, rng, repeat_demo_prob=0.5) for _ in range(200)]
    repeats = sum(q in ep.demos for ep in eps for q in ep.queries) / 800
    assert 0.4 < repeats < 0.6


def test_num_demos_from_task_meta():
    t = Task("m", [Example(str(i), "a") for i in range(20)], meta={"num_demos": 5})
    assert len(EpisodeSampler([t], None, 2, seed=0).take(1)[0].demos) == 5


def test_jsonl_round_trip(tmp_path):
    tasks = make_tasks()
    tasks[0].fixed_demos = [Example("d", "1")]
    tasks[0].examples[0].references = ["0", "zero"]
    save_tasks_jsonl(tasks, tmp_path / "t.jsonl")
    assert load_tasks_jsonl(tmp_path / "t.jsonl") == tasks
    line = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[1])
    assert line["choices"] == ["0", "1", "2", "3"] and "choices" not in line["examples"][0]  # stored once


def test_bad_jsonl_is_located_or_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"name": "ok", "examples": [{"input": "a", "output": "b"}]})
    p.write_text(good + "\n{not json\n" + json.dumps({"name": "t2", "examples": [{"input": "a"}]}) + "\n" + good + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_tasks_jsonl(p)
    report = LoadReport()
    tasks = load_tasks_jsonl(p, report=report)
    assert len(tasks) == 2 and report.loaded == 2 and report.num_skipped == 2
    assert (
        "bad.jsonl:3" in report.skipped[1] and "examples[0].output" in report.skipped[1] and "t2" in report.skipped[1]
    )


def test_hf_datasets_round_trip(tmp_path):
    import datasets

    tasks = make_tasks()
    ds = tasks_to_dataset(tasks)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 211
    back = tasks_from_dataset(ds)
    assert [t.name for t in back] == ["small", "big", "tiny"]
    assert back[1].examples == tasks[1].examples and back[1].meta == {"level": 2} and back[1].definition == "Do it."
    save_rows_jsonl(tasks, tmp_path / "rows.jsonl")
    local = datasets.load_dataset("json", data_files=str(tmp_path / "rows.jsonl"), cache_dir=str(tmp_path / "cache"))
    assert [len(t.examples) for t in tasks_from_dataset(local["train"])] == [10, 200, 1]


def test_rows_missing_a_field_are_counted():
    from gistlib.data import tasks_from_rows

    rows = [{"task": "a", "input": "x", "output": "y"}, {"task": "a", "input": "x"}]
    with pytest.raises(DataError, match="output"):
        tasks_from_rows(rows)
    report = LoadReport()
    assert len(tasks_from_rows(rows, report)[0].examples) == 1 and report.num_skipped == 1
