"""Loaders of real formats (SNI, P3/promptsource, symbol tuning) on ../shared/data, plus bad-input handling.

Tests on the real files skip with a clear reason where the folder is absent."""

import json
import random

import pytest

from gistlib.data import VERBOSE, DataError, Example, LoadReport, Task, render_icl, shared_data_dir
from gistlib.data.p3 import (
    PromptTemplate,
    apply_template,
    build_p3_task,
    load_p3_tasks,
    load_templates,
    make_environment,
    to_hf_schema,
)
from gistlib.data.sni import load_sni_split, load_sni_task, load_sni_tasks, sni_episode, tk_instruct_prompt
from gistlib.data.symbol import (
    draw_symbols,
    read_nli_jsonl,
    read_sst2,
    read_trec,
    symbol_episode,
    symbol_episodes,
)

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "sni").is_dir(),
    reason=f"real data folder {DATA} is absent (set GISTLIB_DATA to a copy of shared/data to run these tests)",
)

# ----------------------------------------------------------------------------- SNI


@needs_data
def test_sni_splits_and_tasks():
    train, test = load_sni_split("train"), load_sni_split("test")
    assert len(train) == 756 and len(test) == 119 and not set(train) & set(test)
    tasks, missing = load_sni_tasks("test")
    on_disk = {f.stem for f in (DATA / "sni" / "tasks").glob("*.json")}
    assert {t.name for t in tasks} == on_disk & set(test) and len(tasks) >= 2
    assert len(missing) == 119 - len(tasks)
    for t in tasks:
        assert len(t.examples) == 100 and len(t.fixed_demos) >= 2 and t.definition
    copa = next(t for t in tasks if t.name.startswith("task1393"))
    raw = json.loads((DATA / "sni" / "tasks" / f"{copa.name}.json").read_text())
    assert [e.input for e in copa.examples] == [i["input"].strip() for i in raw["Instances"][:100]]  # first 100
    assert copa.definition == raw["Definition"][0].strip()


@needs_data
def test_sni_keeps_every_reference_and_tk_prompt():
    t = load_sni_task(DATA / "sni" / "tasks" / "task648_answer_generation.json", max_instances=None)
    raw = json.loads((DATA / "sni" / "tasks" / "task648_answer_generation.json").read_text())
    assert len(t.examples) == len(raw["Instances"])
    assert [e.references for e in t.examples] == [[r.strip() for r in i["output"]] for i in raw["Instances"]]
    prompt = tk_instruct_prompt(t, t.examples[0])
    assert prompt.startswith("Definition: You will see a sentence")
    assert prompt.count("Positive Example") == 2 and prompt.endswith("Output: ")
    ep = sni_episode(t, t.examples[:1])
    assert len(ep.demos) == 2 and ep.definition == t.definition


def test_sni_definition_as_string_and_bad_instances(tmp_path):
    task = {
        "Definition": "Answer it",
        "Positive Examples": [{"input": "a", "output": "b", "explanation": ""}],
        "Instances": [{"id": "1", "input": "x", "output": ["y", "Y!"]}, {"id": "2", "output": ["z"]}],
    }
    p = tmp_path / "task9_toy.json"
    p.write_text(json.dumps(task))
    with pytest.raises(DataError, match=r"Instances\[1\]\.input.*task9_toy"):
        load_sni_task(p)
    report = LoadReport()
    t = load_sni_task(p, report=report)
    assert t.definition == "Answer it" and t.examples[0].references == ["y", "Y!"] and report.num_skipped == 1
    p.write_text("{broken")
    with pytest.raises(DataError, match="task9_toy.json:1"):
        load_sni_task(p)


# ----------------------------------------------------------------------------- P3


@needs_data
def test_promptsource_yaml_loads_safely():
    templates = load_templates("super_glue/cb", DATA / "promptsource" / "templates")
    assert len(templates) == 15 and all(isinstance(t.metadata, dict) for t in templates)
    assert any(t.name == "can we infer" and t.answer_choices == "Yes ||| No ||| Maybe" for t in templates)


@needs_data
def test_p3_cb_examples_match_labels():
    tasks = load_p3_tasks("super_glue/cb", "val")
    raw = [json.loads(line) for line in (DATA / "superglue" / "CB" / "val.jsonl").read_text().splitlines()]
    t = next(t for t in tasks if t.meta["template"] == "can we infer")
    assert len(t.examples) == len(raw) == 56
    words = {"entailment": "Yes", "contradiction": "No", "neutral": "Maybe"}
    for ex, row in zip(t.examples, raw):
        assert ex.input == f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, no, or maybe?'
        assert ex.output == words[row["label"]] and ex.choices == ["Yes", "No", "Maybe"]


@needs_data
@pytest.mark.parametrize(
    "dataset,split",
    [
        ("super_glue/copa", "val"),
        ("super_glue/rte", "train"),
        ("super_glue/wic", "train"),
        ("super_glue/wsc.fixed", "train"),
        ("super_glue/multirc", "train"),
        ("anli", "r2"),
    ],
)
def test_p3_every_dataset_renders(dataset, split):
    report = LoadReport()
    tasks = load_p3_tasks(dataset, split, report=report)
    assert tasks and all(t.examples for t in tasks)
    for t in tasks:
        for e in t.examples[:5]:
            assert e.input and e.output and "|||" not in e.input
            if e.choices is not None:
                assert e.output in e.choices
    na = sum(t.meta["not_applicable"] for t in tasks)
    assert (na > 0) == (dataset == "super_glue/copa")  # COPA templates are per question type
    assert len(report.skipped) == sum(t.meta["not_applicable"] > 0 for t in tasks)


def test_p3_label_mapping():
    assert to_hf_schema("super_glue/cb", {"premise": "p", "hypothesis": "h", "label": "neutral"})[0]["label"] == 2
    assert to_hf_schema("super_glue/rte", {"label": "not_entailment"})[0]["label"] == 1
    assert to_hf_schema("super_glue/boolq", {"label": True})[0]["label"] == 1
    wsc = to_hf_schema(
        "super_glue/wsc.fixed",
        {
            "text": "t",
            "label": False,
            "target": {"span1_index": 0, "span1_text": "a", "span2_index": 3, "span2_text": "b"},
        },
    )[0]
    assert wsc["span2_text"] == "b" and wsc["label"] == 0 and "target" not in wsc
    assert to_hf_schema("anli", {"context": "c", "statement": "s", "gold_label": "c"})[0] == {
        "premise": "c",
        "hypothesis": "s",
        "label": 2,
        "uid": None,
    }


def test_p3_custom_filters_and_errors():
    env = make_environment(random.Random(0))
    t = PromptTemplate(
        "x",
        "toy",
        "{{ words | most_frequent | join(',') }} {{ ['a'] | choice }} {{ premise | highlight }}"
        "{% for a, b in zip(words, words) %}{{a}}{% endfor %} ||| {{ answer_choices[label] }}",
        "no ||| yes",
    )
    assert apply_template(t, {"words": ["b", "c", "c"], "premise": "p|||q", "label": 1}, env) == (
        "c a p|||qbcc",
        "yes",
        ["no", "yes"],
    )
    # a missing field is an error that names the file, line, template and task
    report = LoadReport()
    task = build_p3_task(
        "super_glue/cb",
        t,
        [("cb.jsonl", 3, {"premise": "p", "hypothesis": "h", "label": "neutral"})],
        report=report,
    )
    assert task.examples == [] and report.num_skipped == 1
    assert (
        "cb.jsonl:3" in report.skipped[0] and "toy" in report.skipped[0] and "super_glue_cb__toy" in report.skipped[0]
    )
    with pytest.raises(DataError, match=r"cb.jsonl:4.*super_glue_cb__toy.*unknown label 'maybe'"):
        build_p3_task("super_glue/cb", t, [("cb.jsonl", 4, {"premise": "p", "hypothesis": "h", "label": "maybe"})])
    with pytest.raises(DataError, match=r"cb.jsonl:5, field 'label'"):
        build_p3_task("super_glue/cb", t, [("cb.jsonl", 5, {"premise": "p", "hypothesis": "h"})])


def test_yaml_with_python_tags_is_refused(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "templates.yaml").write_text("templates: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(DataError, match="templates.yaml"):
        load_templates("evil", tmp_path)


# ----------------------------------------------------------------------------- symbol tuning


@needs_data
def test_readers():
    sst = read_sst2("dev")
    trec = read_trec("test")
    cb = read_nli_jsonl(DATA / "classification" / "cb" / "train.jsonl", "cb")
    assert len(sst.examples) == 872 and {e.output for e in sst.examples} == {"negative", "positive"}
    assert len(trec.examples) == 500 and len({e.output for e in trec.examples}) == 6
    assert len(cb.examples) == 250 and {e.output for e in cb.examples} == {
        "entailment",
        "contradiction",
        "neutral",
    }


def test_symbol_episode_properties():
    labels = ["positive", "negative", "neutral"]
    task = Task("toy", [Example(f"text {i}", labels[i % 3]) for i in range(60)])
    eps = list(symbol_episodes([task], k_per_class=4, num_queries=2, seed=3, num_episodes=30))
    maps = set()
    for ep in eps:
        assert len(ep.demos) == 12 and ep.definition is None
        outs = {d.output for d in ep.demos}
        assert len(outs) == 3 and not outs & {"positive", "negative", "neutral"}
        assert all(sum(d.output == o for d in ep.demos) == 4 for o in outs)
        assert not {d.input for d in ep.demos} & {q.input for q in ep.queries}
        # the map is consistent: the same true label always gets the same symbol inside an episode
        true = {e.input: e.output for e in task.examples}
        pairs = {(true[e.input], e.output) for e in ep.demos + ep.queries}
        assert len(pairs) == 3 and all(q.output in q.choices for q in ep.queries)
        maps.add(tuple(sorted(pairs)))
    assert len(maps) > 20  # fresh map per episode
    again = list(symbol_episodes([task], 4, 2, seed=3, num_episodes=30))
    assert [(e.demos, e.queries) for e in again] == [(e.demos, e.queries) for e in eps]


def test_symbols_never_equal_label_words():
    rng = random.Random(0)
    for _ in range(300):
        m = draw_symbols(["apple", "river", "1", "2"], rng)
        assert len(set(m.values())) == 4 and not {v.lower() for v in m.values()} & {
            "apple",
            "river",
            "1",
            "2",
        }


@needs_data
def test_symbol_episode_renders_from_real_data():
    from gistlib.models.tiny import build_tokenizer

    trec = read_trec("test")
    ep = symbol_episode(trec, 1, 1, random.Random(0))
    tok = build_tokenizer([e.input for e in trec.examples[:50]], num_gist_tokens=2, vocab_size=300)
    ids, labels = render_icl(ep, ep.queries[0], tok, VERBOSE, 512)
    assert (
        tok.decode([i for i, lab in zip(ids, labels) if lab != -100], skip_special_tokens=True) == ep.queries[0].output
    )
