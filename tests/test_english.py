"""gistlib.course.english: your task in English, answered by every method (lesson 8), on the tiny smol experiment.

The tiny experiment (`tiny_experiment(load_experiment("smol"))`: a random 4-bit Llama, a BPE tokenizer trained on
the SNI texts, 2 training steps) reads the SNI files of the shared data folder: those tests skip without it.
"""

from __future__ import annotations

import pytest
import torch

from gistlib.course.english import (
    EXAMPLE_TASKS,
    LABELS,
    METHODS,
    compare,
    describe_episode,
    describe_prefix,
    english_episode,
    english_widget,
    find_task,
    format_comparison,
    parse_examples,
    parse_queries,
)
from gistlib.data import Example, Task, shared_data_dir

SNI_TASK = "task1159_bard_analogical_reasoning_containers"
needs_sni = pytest.mark.skipif(
    not (shared_data_dir() / "sni" / "tasks" / f"{SNI_TASK}.json").exists(),
    reason=f"the SNI files are absent from {shared_data_dir()} (set GISTLIB_DATA to the real data)",
)


# --- parsing: no model -------------------------------------------------------------------------------


def test_examples_are_lines_split_at_the_last_arrow():
    demos = parse_examples("France => Paris\n\n  if a => b then =>  c  \n")
    assert [(d.input, d.output) for d in demos] == [("France", "Paris"), ("if a => b then", "c")]
    assert all(d.choices is None for d in demos)  # generation, not rank classification


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("France => Paris\nJapan Tokyo", "line 2 'Japan Tokyo'"),
        ("=> Paris", "line 1"),
        ("France =>", "line 1"),
        ("\n  \n", "no examples"),
    ],
)
def test_a_bad_example_names_its_line(text, match):
    with pytest.raises(ValueError, match=match):
        parse_examples(text)


def test_queries_may_carry_the_expected_answer():
    queries = parse_queries("Italy => Rome\n\nEgypt\n")
    assert [(q.input, q.output) for q in queries] == [("Italy", "Rome"), ("Egypt", "")]
    with pytest.raises(ValueError, match="no queries"):
        parse_queries(" \n")
    with pytest.raises(ValueError, match="query line 2"):
        parse_queries("Italy\nSpain =>")


def test_an_episode_has_the_sni_layout():
    ep = english_episode("  Write the capital.  ", "France => Paris\nJapan => Tokyo", "Italy")
    assert ep.definition == "Write the capital." and len(ep.demos) == 2 and ep.queries[0].input == "Italy"
    assert english_episode("   ", "a => b", "c").definition is None  # a blank definition is none
    text = describe_episode(ep)
    assert "Write the capital." in text and "example 2: Japan  =>  Tokyo" in text


@pytest.mark.parametrize("name", list(EXAMPLE_TASKS))
def test_every_example_task_parses_and_can_be_scored(name):
    ep = english_episode(*EXAMPLE_TASKS[name])
    assert ep.definition and len(ep.demos) >= 2 and len(ep.queries) >= 3
    assert all(q.output for q in ep.queries)  # every query has an expected answer: the table shows ROUGE-L


def test_find_task_names_the_tasks_there():
    tasks = [Task("a", [Example("x", "y")]), Task("b", [Example("x", "y")])]
    assert find_task(tasks, "b") is tasks[1]
    with pytest.raises(KeyError, match="the tasks are: a, b"):
        find_task(tasks, "c")


# --- on the tiny smol experiment -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bundle, HyperLlama, multitask-ICL model): the tiny smol experiment, trained 2 steps each, one test task."""
    from gistlib.course.experiment import load_experiment, tiny_experiment
    from gistlib.course.runner import load_bundle, train_hyper, train_multitask_icl

    torch.manual_seed(0)
    sets = [f"run.cache_dir={tmp_path_factory.mktemp('english')}", "run.progress=false",
            f'data.eval_tasks=["{SNI_TASK}"]']  # fmt: skip
    exp = tiny_experiment(load_experiment("smol", sets))
    b = load_bundle(exp)
    hyper, _ = train_hyper(b, exp.hyper.num_gist_tokens, exp.run.seeds[0])
    mt, _ = train_multitask_icl(b)
    return b, hyper, mt.model


@pytest.fixture(scope="module")
def capitals(tiny):
    b, hyper, mt = tiny
    return compare(b, hyper, english_episode(*EXAMPLE_TASKS["capital cities"]), mt)


@pytest.fixture(scope="module")
def held_out(tiny, capitals):
    from gistlib.data.sni import sni_episode

    b, hyper, mt = tiny
    task = find_task(b.source.test, SNI_TASK)
    return compare(b, hyper, sni_episode(task, task.examples[:3]), mt, {"wrong_task_prefix": capitals.prefix})


@needs_sni
def test_every_method_answers_every_query(tiny, capitals, held_out):
    b, hyper, _ = tiny
    assert list(capitals.answers) == list(METHODS)
    assert list(held_out.answers) == [*METHODS, "wrong_task_prefix"]
    for c in (capitals, held_out):
        assert all(len(a) == len(c.episode.queries) and all(isinstance(x, str) for x in a) for a in c.answers.values())
    assert not hyper.adapters_off  # compare leaves the hypernetwork's adapters on, as it found them
    cfg = hyper.base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k = b.exp.hyper.num_gist_tokens
    assert tuple(capitals.prefix.keys.shape) == (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, k, head_dim)


@needs_sni
def test_the_answers_are_those_the_course_scores(tiny, held_out):
    """`evaluate` (the runner's scorer), given each method's answers as the references, finds every one exact; and
    its ROUGE-L against the real references is the comparison's."""
    from dataclasses import replace

    from gistlib.course.runner import hyper_prefix_method
    from gistlib.train.evaluate import definition_only, evaluate, icl, zero_shot

    b, hyper, mt = tiny
    ep, ev, d, tok, fmt = held_out.episode, b.exp.eval, b.exp.data, b.tokenizer, b.fmt
    budget = d.max_hyper_tokens + d.max_tokens
    rouge = held_out.mean_rouge()
    with torch.no_grad():
        hyper_method = hyper_prefix_method(hyper, [ep], b)[0]
        with hyper.downstream_mode():
            methods = {
                "hyperllama": hyper_method,
                "icl": icl(hyper.base, tok, fmt, budget),
                "multitask_icl": icl(mt, tok, fmt, budget, name="multitask_icl"),
                "definition_only": definition_only(hyper.base, tok, fmt, budget),
                "zero_shot": zero_shot(hyper.base, tok, fmt),
            }
            for name, method in methods.items():
                answers = held_out.answers[name]
                own = replace(ep, queries=[Example(q.input, a) for q, a in zip(ep.queries, answers)])
                assert evaluate(method, [own], tok, fmt, ev.batch_size, ev.max_new_tokens).accuracy == 1.0, name
                res = evaluate(method, [ep], tok, fmt, ev.batch_size, ev.max_new_tokens)
                assert res.rouge_l == pytest.approx(rouge[name], abs=1e-9), name
    assert len({tuple(a) for a in held_out.answers.values()}) > 1  # the methods do not all answer alike


@needs_sni
def test_the_prefix_is_the_tasks_own(tiny, capitals):
    """Another task's demos give another prefix, and a prefix passed as an extra method reads like HyperLlama's."""
    b, hyper, mt = tiny
    antonyms = compare(b, hyper, english_episode(*EXAMPLE_TASKS["antonyms"]), methods=["hyperllama"])
    assert list(antonyms.answers) == ["hyperllama"]
    assert not torch.allclose(antonyms.prefix.values, capitals.prefix.values)
    again = compare(b, hyper, capitals.episode, methods=["hyperllama"], other_prefixes={"same": capitals.prefix})
    assert again.answers["same"] == again.answers["hyperllama"] == capitals.answers["hyperllama"]
    assert torch.equal(again.prefix.keys, capitals.prefix.keys)  # made the same way twice


@needs_sni
def test_compression_is_the_runners_arithmetic(tiny, capitals):
    from gistlib.course.runner import compression

    b, hyper, _ = tiny
    p, k = capitals.prefix, capitals.k
    assert capitals.prefix_bytes == 2 * p.keys.numel() * p.keys.element_size()
    ref = compression(b, hyper.base, [capitals.episode], k)
    assert capitals.demo_tokens == ref["mean_demo_tokens"] > k
    assert capitals.demo_kv_bytes / capitals.prefix_bytes == pytest.approx(1 / ref["kv_ratio"])
    if p.keys.dtype == torch.float32:  # the runner counts float32 bytes
        assert capitals.prefix_bytes == ref["prefix_kv_bytes"] and capitals.demo_kv_bytes == ref["demo_kv_bytes"]
    s = capitals.summary()
    assert s["demo_tokens_per_gist_token"] == pytest.approx(ref["demo_tokens_per_gist_token"])
    assert s["prefix_shape"] == list(p.keys.shape) and set(s["rouge_l"]) == set(METHODS)
    text = describe_prefix(capitals)
    assert f"k = {k} gist tokens" in text and f"{capitals.prefix_bytes:,} bytes" in text


@needs_sni
def test_the_table_shows_each_query_its_expected_answer_and_every_method(capitals):
    text = format_comparison(capitals)
    for q in capitals.episode.queries:
        assert q.input in text and f"(expected: {q.output})" in text
    assert all(LABELS[m] in text for m in METHODS) and "mean ROUGE-L" in text
    scores = capitals.rouge()
    assert all(0.0 <= s <= 1.0 for per in scores.values() for s in per)


@needs_sni
def test_queries_without_expected_answers_are_not_scored(tiny):
    b, hyper, _ = tiny
    c = compare(b, hyper, english_episode("Write the opposite.", "hot => cold", "big\nfast"), methods=["zero_shot"])
    assert c.references() == [None, None] and c.mean_rouge() == {"zero_shot": None}
    assert "ROUGE-L" not in format_comparison(c) and "expected" not in format_comparison(c)


@needs_sni
def test_what_cannot_run_says_why(tiny):
    b, hyper, _ = tiny
    ep = english_episode(*EXAMPLE_TASKS["plurals"])
    with pytest.raises(ValueError, match="multitask_icl needs the multitask model"):
        compare(b, hyper, ep, methods=["multitask_icl"])
    with pytest.raises(ValueError, match="unknown methods"):
        compare(b, hyper, ep, methods=["hyperllama", "telepathy"])
    too_long = english_episode("word " * (2 * b.exp.data.max_hyper_tokens), "a => b", "c")
    with pytest.raises(ValueError, match="max_tokens"):  # over the hypernetwork's budget: the widget shows this
        compare(b, hyper, too_long, methods=["hyperllama"])


@needs_sni
def test_the_widget_fills_asks_and_reports_typing_errors(tiny, capitals):
    pytest.importorskip("ipywidgets")
    b, hyper, _ = tiny
    box = english_widget(b, hyper, None, *EXAMPLE_TASKS["capital cities"], first=capitals)
    menu, definition, examples, queries, button, out = box.children
    assert "HyperLlama prefix" in out.value and "multitask ICL" in out.value  # the given comparison, shown as is
    menu.value = "plurals"
    assert (definition.value, examples.value, queries.value) == EXAMPLE_TASKS["plurals"]
    examples.value = "cat => cats\ndog dogs"
    button.click()
    assert out.value.startswith("<pre>error:") and "line 2" in out.value
    examples.value = "cat => cats"
    button.click()
    assert "HyperLlama prefix" in out.value and "multitask ICL" not in out.value  # asked without that model
    assert "1 example (" in out.value and "(expected: mice)" in out.value and "error" not in out.value
