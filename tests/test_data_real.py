"""Loaders of real formats (SNI, P3/promptsource, symbol tuning) on ../shared/data, plus bad-input handling.

Tests on the real files skip with a clear reason where the folder is absent."""

import json
import random

import pytest

from gistlib.data import VERBOSE, DataError, Example, LoadReport, Task, render_icl, shared_data_dir
from gistlib.data.p3 import (
    P3_TRAINING,
    PromptTemplate,
    apply_template,
    build_p3_task,
    default_split,
    load_p3_tasks,
    load_templates,
    make_environment,
    read_raw_rows,
    to_hf_schema,
)
from gistlib.data.sni import load_sni_split, load_sni_task, load_sni_tasks, sni_episode, tk_instruct_prompt
from gistlib.data.symbol import (
    class_words,
    draw_symbols,
    read_cr,
    read_dbpedia,
    read_nli_jsonl,
    read_sst2,
    read_subj,
    read_trec,
    symbol_episode,
    symbol_episodes,
    unquote_csv_field,
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


# ----------------------------------------------------------------------------- P3 training datasets

needs_p3 = pytest.mark.skipif(
    not (DATA / "p3").is_dir(),
    reason=f"P3 training data {DATA / 'p3'} is absent (set GISTLIB_DATA to a copy of shared/data to run these tests)",
)
P3 = DATA / "p3"

# rows per split (MANIFEST.md, "P3 dataset notes"), templates (all, original task) in promptsource
P3_TRAINING_COUNTS = {
    "rotten_tomatoes": ({"train": 8530, "validation": 1066, "test": 1066}, (10, 10)),
    "dream": ({"validation": 2040, "test": 2041}, (5, 2)),
    "quail": ({"validation": 2164, "challenge": 556}, (13, 10)),
    "cos_e/v1.11": ({"validation": 1221}, (11, 6)),
    "cos_e/v1.0": ({"validation": 950}, (11, 5)),
    "commonsense_qa": ({"validation": 1221}, (5, 4)),
    "common_gen": ({"validation": 4018}, (9, 6)),
    "glue/mrpc": ({"test": 1725}, (7, 5)),
}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@needs_p3
@pytest.mark.parametrize("dataset", list(P3_TRAINING_COUNTS))
def test_p3_training_dataset_loads_every_split(dataset):
    """Every split has the documented number of rows, nothing dropped, every template renders every row (or is
    counted as not applying), and an answer-choice target is always one of the choices."""
    splits, (n_templates, n_original) = P3_TRAINING_COUNTS[dataset]
    assert list(P3_TRAINING[dataset]) == list(splits) and default_split(dataset) == next(iter(splits))
    for split, n in splits.items():
        report = LoadReport()
        assert len(read_raw_rows(dataset, split, report=report)) == n and report.num_skipped == 0, (split, report)
    report = LoadReport()
    tasks = load_p3_tasks(dataset, original_task_only=False, report=report)
    assert len(tasks) == n_templates and sum(t.meta["original_task"] for t in tasks) == n_original
    n = next(iter(splits.values()))
    for t in tasks:
        dropped = t.meta["not_applicable"] + t.meta["target_not_in_choices"]
        assert len(t.examples) == n - dropped and t.examples and t.name.startswith(dataset.replace("/", "_") + "__")
        for e in t.examples:
            assert e.input and e.output and "|||" not in e.input + e.output
            assert e.choices is None or e.output in e.choices
    assert report.loaded == sum(len(t.examples) for t in tasks)
    assert sum(report.by_reason.values()) == sum(
        t.meta["not_applicable"] + t.meta["target_not_in_choices"] for t in tasks
    )


@needs_p3
def test_rotten_tomatoes_labels_and_hf_splits():
    pos = (P3 / "rotten_tomatoes" / "rt-polarity.pos").read_bytes().decode("latin-1").split("\n")
    neg = (P3 / "rotten_tomatoes" / "rt-polarity.neg").read_bytes().decode("latin-1").split("\n")
    train = [r for _, _, r in read_raw_rows("rotten_tomatoes", "train")]
    assert sum(r["label"] for r in train) == 4265  # half positive: 80% of each file's 5,331 lines
    assert train[0] == {"text": pos[0].strip(), "label": 1} and train[4265] == {"text": neg[0].strip(), "label": 0}
    file, line, row = read_raw_rows("rotten_tomatoes", "validation")[0]
    assert file.endswith("rt-polarity.pos") and line == 4266 and row["text"] == pos[4265].strip()
    test = read_raw_rows("rotten_tomatoes", "test")
    assert test[-1][1] == 5331 and test[-1][2] == {"text": neg[5330].strip(), "label": 0}
    # cp1252's ellipsis (byte 0x85) stays inside its line, as HF reads it, instead of splitting it
    assert any("\x85" in r["text"] for r in train)
    t = next(t for t in load_p3_tasks("rotten_tomatoes", "test") if t.meta["template"] == "Movie Expressed Sentiment")
    assert t.examples[-1].input == f"{neg[5330].strip()} The sentiment expressed for the movie is"
    assert (t.examples[-1].output, t.examples[0].output, t.examples[0].choices) == (
        "negative",
        "positive",
        ["negative", "positive"],
    )


@needs_p3
def test_dream_rows_flatten_the_dialogues():
    raw = json.loads((P3 / "dream" / "dev.json").read_text(encoding="utf-8"))
    expected = [(turns, q) for turns, questions, _ in raw for q in questions]
    rows = read_raw_rows("dream", "validation")
    assert len(rows) == len(expected) == 2040
    for (_, _, row), (turns, q) in zip(rows, expected):
        assert row["dialogue"] == turns and row["choice"] == q["choice"] and row["answer"] == q["answer"]
    assert rows[0][1] == 2 and rows[-1][2]["dialogue_id"] == raw[-1][2]  # line of the item's "[" and its id
    t = next(t for t in load_p3_tasks("dream") if t.meta["template"] == "baseline")
    turns, q = expected[0]
    choices = "\n\n".join(f"- {c}" for c in q["choice"])
    assert t.examples[0].input == "Dialogue:\n\n" + "\n\n".join(turns) + f"\n\nQuestion: {q['question']} \n\n{choices}"
    assert t.examples[0].output == q["answer"] == "To change her job." and t.examples[0].choices == q["choice"]


@needs_p3
def test_quail_rows_from_the_xml():
    rows = read_raw_rows("quail", "validation")
    file, line, first = rows[0]
    assert line == 29 and '<q id="1"' in (P3 / "quail" / "quail_1.3_dev.xml").read_text().splitlines()[line - 1]
    assert first["question"] == "When Candy approached Larry:" and first["question_type"] == "Temporal_order"
    assert first["answers"] == [
        "As he got out of the car",
        "While he was still in the car",
        "While he was inside the store",
        "not enough information",
    ]
    assert first["correct_answer_id"] == 0 and first["context"].startswith("Candy watched the bearded man")
    assert first["id"] == "f141_1" and first["metadata"]["author"] == "Robert Burton Robinson"
    assert {len(r["answers"]) for _, _, r in rows} == {4} and len({r["context_id"] for _, _, r in rows}) == 120


@needs_p3
@pytest.mark.parametrize("version", ["v1.11", "v1.0"])
def test_cos_e_joins_explanations_with_their_questions(version):
    explanations = _jsonl(P3 / "cos_e" / version / f"cose_dev_{version}_processed.jsonl")
    rows = read_raw_rows(f"cos_e/{version}")
    assert [r["id"] for _, _, r in rows] == [e["id"] for e in explanations]
    assert rows[0][2]["abstractive_explanation"] == explanations[0]["explanation"]["open-ended"].strip()
    if version == "v1.11":  # partner: HF commonsense_qa, 5 choices
        cqa = {r["id"]: r for r in _jsonl(P3 / "commonsense_qa" / "validation.jsonl")}
        q = cqa[rows[0][2]["id"]]
        assert rows[0][2]["choices"] == q["choices"]["text"] and rows[0][2]["question"] == q["question"]
        answer = q["choices"]["text"][q["choices"]["label"].index(q["answerKey"])]
    else:  # partner: the original CQA v1.0 layout, 3 choices
        cqa = {r["id"]: r for r in _jsonl(P3 / "cos_e" / "v1.0" / "cqa_v1.0_dev_rand_split.jsonl")}
        q = cqa[rows[0][2]["id"]]
        assert rows[0][2]["choices"] == [c["text"] for c in q["question"]["choices"]]
        answer = next(c["text"] for c in q["question"]["choices"] if c["label"] == q["answerKey"])
    assert rows[0][2]["answer"] == answer and all(r["answer"] in r["choices"] for _, _, r in rows)
    assert {len(r["choices"]) for _, _, r in rows} == {5 if version == "v1.11" else 3}


@needs_p3
def test_commonsense_qa_drops_and_counts_targets_outside_the_choices():
    """promptsource's `question_to_answer_index` offers A-D for answers A-E: those rows cannot be ranked."""
    raw = _jsonl(P3 / "commonsense_qa" / "validation.jsonl")
    report = LoadReport()
    tasks = {t.meta["template"]: t for t in load_p3_tasks("commonsense_qa", report=report)}
    index = tasks["question_to_answer_index"]
    n_e = sum(r["answerKey"] == "E" for r in raw)
    assert n_e == 235 and index.meta["target_not_in_choices"] == n_e and len(index.examples) == len(raw) - n_e
    assert report.by_reason["target_not_in_choices"] == n_e and "validation.jsonl:" in report.skipped[0]
    assert index.examples[0].choices == ["A", "B", "C", "D"] and index.examples[0].output == raw[0]["answerKey"]
    qa = tasks["answer_given_question_without_options"]
    assert len(qa.examples) == len(raw) and qa.examples[0].output == "bank"
    assert qa.examples[0].input == f"Answer the following question:\n{raw[0]['question']}"


@needs_p3
def test_common_gen_one_row_per_scene_without_pos_tags():
    raw = _jsonl(P3 / "common_gen" / "commongen.dev.jsonl")
    rows = [r for _, _, r in read_raw_rows("common_gen")]
    assert len(raw) == 993 and len(rows) == sum(len(r["scene"]) for r in raw) == 4018
    assert rows[0] == {"concept_set_idx": 0, "concepts": ["field", "look", "stand"], "target": raw[0]["scene"][0]}
    assert rows[-1]["concept_set_idx"] == 992 and not any("_" in c for r in rows for c in r["concepts"])
    t = next(t for t in load_p3_tasks("common_gen") if t.meta["template"] == "Put together")
    assert t.examples[0].input.startswith("Put the concepts together to form a sentence: field, look, stand")
    assert t.examples[0].output == raw[0]["scene"][0] and t.examples[0].choices is None


@needs_p3
def test_mrpc_labels_and_paraphrase_templates():
    import csv

    with open(P3 / "mrpc" / "msr-para-test.tsv", encoding="utf-8-sig", newline="") as f:
        records = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for _, _, r in read_raw_rows("glue/mrpc")]
    assert [r["label"] for r in rows] == [int(q[0]) for q in records] and sum(r["label"] for r in rows) == 1147
    assert rows[0]["sentence1"] == records[0][3] and rows[0]["sentence2"] == records[0][4] and rows[0]["idx"] == 0
    report = LoadReport()
    tasks = {t.meta["template"]: t for t in load_p3_tasks("glue/mrpc", original_task_only=False, report=report)}
    eq = tasks["equivalent"]
    assert eq.examples[0].input == (
        f'Are the following two sentences "equivalent" or "not equivalent"?\n{records[0][3]}\n{records[0][4]}'
    )
    assert eq.examples[0].output == "equivalent" and eq.examples[0].choices == ["not equivalent", "equivalent"]
    # the paraphrase-generation templates apply to equivalent pairs only: the 578 others are counted, not lost
    assert tasks["generate_paraphrase"].meta["not_applicable"] == 578 == len(records) - 1147
    assert report.by_reason["not_applicable"] == 2 * 578


def _p3_root(tmp_path, files: dict[str, bytes]):
    """A data root at `tmp_path` holding only `files` (relative path -> bytes)."""
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return tmp_path


def test_p3_training_bad_rows_are_located_or_counted(tmp_path):
    dream_item = [["M: Hi.", "W: Hello."], [{"question": "Who?", "choice": ["a", "b", "c"], "answer": "a"}], "1-1"]
    bad_item = [["M: Hi."], [{"question": "Who?", "choice": ["a", "b", "c"], "answer": "d"}], "1-2"]
    cqa = {"id": "q1", "question": "Why?", "question_concept": "x", "answerKey": "A"}
    cqa["choices"] = {"label": ["A", "B"], "text": ["yes", "no"]}
    root = _p3_root(
        tmp_path,
        {
            "p3/dream/dev.json": f"[\n{json.dumps(dream_item)},\n{json.dumps(bad_item)}\n]\n".encode(),  # lines 2, 3
            "p3/quail/quail_1.3_dev.xml": b'<data>\n<text id="t1" domain="news"><metadata/><text_body>Story.'
            b'</text_body>\n<questions>\n<q id="1" type="x">Q?<a correct="True">a</a><a correct="True">b</a>'
            b'<a correct="False">c</a><a correct="False">d</a></q>\n<q id="2" type="x">R?<a correct="False">a</a>'
            b'<a correct="True">b</a><a correct="False">c</a><a correct="False">d</a></q>\n'
            b"</questions></text>\n</data>\n",
            "p3/commonsense_qa/validation.jsonl": (json.dumps(cqa) + "\n").encode(),
            "p3/cos_e/v1.11/cose_dev_v1.11_processed.jsonl": b'{"id": "q1", "explanation": {"open-ended": "o",'
            b' "selected": "s"}}\n{"id": "q9", "explanation": {"open-ended": "o", "selected": "s"}}\n',
            "p3/mrpc/msr-para-test.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
            '1\t1\t2\tA "quoted" one.\tB.\r\n0\t3\t4\tonly four fields\r\n'.encode(),
            "p3/rotten_tomatoes/rt-polarity.pos": b"good\n \nfine\n",
            "p3/rotten_tomatoes/rt-polarity.neg": b"bad\nworse\nawful\n",
        },
    )
    cases = [
        ("dream", r"dev.json:3, task 'dream': question 0: answer 'd' is not one of its choices", "bad_label"),
        (
            "quail",
            r"quail_1.3_dev.xml:4, task 'quail': question '1' needs exactly one correct answer, has 2",
            "bad_label",
        ),
        (
            "cos_e/v1.11",
            r"cose_dev_v1.11_processed.jsonl:2, task 'cos_e/v1.11': id 'q9' has no question",
            "unmatched_id",
        ),
        ("glue/mrpc", r"msr-para-test.tsv:3, task 'glue/mrpc': expected 5 tab-separated fields, got 4", "wrong_type"),
        ("rotten_tomatoes", r"rt-polarity.pos:2, task 'rotten_tomatoes': field 'text' is empty", "empty_input"),
    ]
    for dataset, message, reason in cases:
        split = "train" if dataset == "rotten_tomatoes" else None
        with pytest.raises(DataError, match=message):
            read_raw_rows(dataset, split, root)
        report = LoadReport()
        rows = read_raw_rows(dataset, split, root, report)
        assert report.num_skipped == 1 and report.by_reason[reason] == 1, (dataset, report)
        assert len(rows) >= 1  # the good rows stay
    assert read_raw_rows("glue/mrpc", None, root, LoadReport())[0][2]["sentence1"] == 'A "quoted" one.'  # no quoting
    (root / "p3/dream/dev.json").write_text('[\n  ["a",\n  ["b"\n]')
    with pytest.raises(DataError, match=r"dev.json:4, task 'dream': not valid JSON"):
        read_raw_rows("dream", "validation", root)
    with pytest.raises(ValueError, match=r"dream has no split 'train'; known: validation, test"):
        read_raw_rows("dream", "train", root)
    with pytest.raises(ValueError, match="name the round"):
        default_split("anli")


# ----------------------------------------------------------------------------- CR, SUBJ, DBpedia

needs_classification = pytest.mark.skipif(
    not (DATA / "classification" / "cr").is_dir(),
    reason=f"classification sets under {DATA / 'classification'} are absent (set GISTLIB_DATA to shared/data)",
)


@needs_classification
def test_cr_subj_dbpedia_readers():
    raw = {
        name: _jsonl(DATA / "classification" / name / f)
        for name, f in [("cr", "test.jsonl"), ("subj", "test.jsonl"), ("dbpedia", "dev_subsample.jsonl")]
    }
    report = LoadReport()
    cr, subj, dbpedia = read_cr(report=report), read_subj(report=report), read_dbpedia(report=report)
    assert report.loaded == 2000 + 2000 + 256 and report.num_skipped == 0
    for task, words in ((cr, ["negative", "positive"]), (subj, ["subjective", "objective"])):
        assert len(task.examples) == 2000 and task.family == "classification"
        assert [e.output for e in task.examples] == [words[int(r["label"])] for r in raw[task.name]]
        assert sum(e.output == words[0] for e in task.examples) == 1000
    # the sentences still wrapped in LM-BFF's CSV quotes are unquoted, their inner quotes undoubled
    assert (cr.meta["unquoted"], subj.meta["unquoted"], dbpedia.meta["unquoted"]) == (969, 1339, 0)
    quoted = next(i for i, r in enumerate(raw["cr"]) if '"" disposable ""' in r["sentence"])
    assert cr.examples[quoted].input == 'unfortunately it turns out to be the " disposable " type .'
    assert subj.examples[0].input == raw["subj"][0]["sentence"].strip()[1:-1]
    assert not any(e.input.startswith('"') and e.input.endswith('"') for e in cr.examples + subj.examples)
    classes = (DATA / "classification" / "dbpedia" / "classes.txt").read_text().split()
    assert len(classes) == 14 and len({e.output for e in dbpedia.examples}) == 14
    assert [e.output for e in dbpedia.examples[:2]] == ["Film", "Written Work"]  # labels 13, 14 (1-based)
    assert {e.output for e in dbpedia.examples} >= {"Educational Institution", "Mean Of Transportation"}
    assert dbpedia.examples[1].input == raw["dbpedia"][1]["sentence"].strip()  # the leading space goes


def test_sentence_jsonl_bad_rows(tmp_path):
    p = tmp_path / "cr" / "test.jsonl"
    p.parent.mkdir()
    p.write_text(
        '{"sentence": "good", "label": "1"}\n{"sentence": "meh", "label": "2"}\n{"sentence": " ", "label": "0"}\n'
        '{"label": "0"}\n{"sentence": "\\"a \\"\\"b\\"\\" c\\"", "label": "0"}\n'
    )
    with pytest.raises(DataError, match=r"test.jsonl:2, field 'label', task 'cr': unknown label '2' \(known: 0, 1\)"):
        read_cr(tmp_path)
    report = LoadReport()
    task = read_cr(tmp_path, report)
    assert [(e.input, e.output) for e in task.examples] == [("good", "positive"), ('a "b" c', "negative")]
    assert report.by_reason == {"bad_label": 1, "empty_input": 1, "missing_field": 1} and report.loaded == 2
    assert unquote_csv_field('"a" and "b"') == ('"a" and "b"', False)  # not one quoted field: left alone
    assert class_words("MeanOfTransportation") == "Mean Of Transportation" and class_words("Film") == "Film"


@needs_p3
@needs_classification
def test_load_tasks_reads_the_new_sets_by_name():
    """The experiment config's names reach the new readers: classification `cr`/`subj`/`dbpedia`, P3 training
    datasets with and without a split."""
    from gistlib.course.experiment import DataConfig
    from gistlib.data.sources import load_tasks

    report = LoadReport()
    data = DataConfig(family="symbol", train_tasks=("cr", "subj", "dbpedia"), max_rows=28)
    tasks = load_tasks(data, "train", report)
    assert [t.name for t in tasks] == ["cr", "subj", "dbpedia"]
    assert [len(t.examples) for t in tasks] == [28, 28, 28]  # 14 per class, 2 per class for DBpedia's 14
    data = DataConfig(family="p3", train_tasks=("dream", "rotten_tomatoes:validation", "cos_e/v1.11"), max_rows=20)
    tasks = load_tasks(data, "train", report)
    assert {t.meta["dataset"] for t in tasks} == {"dream", "rotten_tomatoes", "cos_e/v1.11"}
    assert len(tasks) == 2 + 10 + 6 and all(len(t.examples) == 20 for t in tasks)  # original-task templates
