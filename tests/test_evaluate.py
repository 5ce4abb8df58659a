"""Evaluation: rank classification against a plain per-choice loop, gisting via gist caching, intervals."""

import torch
from conftest import small_pocket_model

from gistlib.core.lm import LMTrainee
from gistlib.data import COMPACT, Episode, Example, answer_ids, pocket_tokenizer, render_icl_prompt
from gistlib.models.tiny import build_tiny_llama, gist_token_ids
from gistlib.train.evaluate import (
    bootstrap_interval,
    definition_only,
    evaluate,
    gist_prefixes,
    icl,
    two_level_interval,
    with_prefixes,
    zero_shot,
)

TOK = pocket_tokenizer(4)
WORDS = ["fama", "muso", "lufu", "bado", "kepi", "rasu"]


def episodes():
    symbols = ["GO", "DA", "KI"]
    out = []
    for e in range(5):
        demos = [Example(w, symbols[(i + e) % 3], symbols) for i, w in enumerate(WORDS[:3])]
        queries = [Example(w, symbols[(i + e) % 3], symbols) for i, w in enumerate(WORDS[3:])]
        out.append(Episode(f"t{e}", demos, queries))
    return out


def test_rank_classification_matches_a_plain_loop():
    model = small_pocket_model(TOK, seed=3)
    eps = episodes()
    res = evaluate(icl(model, TOK, COMPACT), eps, TOK, COMPACT, batch_size=7)
    expected = []
    for ep in eps:
        hits = []
        for q in ep.queries:
            prompt = render_icl_prompt(ep, q, TOK, COMPACT, 1024, reserve=8)
            scores = []
            for c in q.choices:
                ids = torch.tensor([prompt + answer_ids(c, TOK, COMPACT)])
                logp = model(ids).logits[0, :-1].log_softmax(-1)  # HF's own causal mask
                tgt = ids[0, len(prompt) :]
                scores.append(logp[len(prompt) - 1 :].gather(1, tgt[:, None]).sum().item())
            hits.append(q.choices[max(range(len(scores)), key=scores.__getitem__)] == q.output)
        expected.append(sum(hits) / len(hits))
    assert res.per_episode == expected
    assert res.n == 5 and res.low <= res.accuracy <= res.high
    assert 0 <= evaluate(zero_shot(model, TOK, COMPACT), eps, TOK, COMPACT).accuracy <= 1


def test_gisting_by_gist_caching_equals_the_single_sequence():
    model = small_pocket_model(TOK, seed=4)
    gist = gist_token_ids(TOK)[:2]
    eps = episodes()
    prefixes = gist_prefixes(model, eps, TOK, gist, COMPACT)
    method = with_prefixes("gisting", model, prefixes, TOK, COMPACT, bos=False)
    from gistlib.data import collate, render_gisting

    trainee = LMTrainee(model, mask="gist", gist_token_ids=gist)
    for e, ep in enumerate(eps):
        rows = [render_gisting(ep, q, TOK, gist, COMPACT) for q in ep.queries]
        b = collate(rows, TOK.pad_token_id)
        single, _ = trainee.score(b["input_ids"], b["attention_mask"], b["labels"])
        from gistlib.data.render import query_ids

        q_rows = [
            (
                query_ids(q, TOK, COMPACT) + answer_ids(q.output, TOK, COMPACT),
                [-100] * len(query_ids(q, TOK, COMPACT)) + answer_ids(q.output, TOK, COMPACT),
            )
            for q in ep.queries
        ]
        qb = collate(q_rows, TOK.pad_token_id)
        from gistlib.core.scoring import sequence_logprobs

        cached = sequence_logprobs(method.logits(torch.tensor([e] * len(q_rows)), qb), qb["labels"])[0]
        torch.testing.assert_close(cached, single, atol=1e-4, rtol=1e-4)


def test_generation_scores_exact_match():
    """A model that always answers the same token: exact match counts the queries whose answer it is."""
    model = build_tiny_llama(
        tokenizer=TOK, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
    )
    target = TOK.convert_tokens_to_ids("GO")

    class AlwaysGo(torch.nn.Module):
        def forward(self, x):  # (B, L, d) -> logits (B, L, V) with GO on top
            out = torch.zeros(*x.shape[:-1], len(TOK))
            out[..., target] = 1.0
            return out

    model.lm_head = AlwaysGo()
    eps = [Episode("g", [Example("fama", "GO")], [Example("muso", "GO"), Example("lufu", "DA")])]
    res = evaluate(icl(model, TOK, COMPACT), eps, TOK, COMPACT, max_new_tokens=1)
    assert res.per_episode == [0.5] and res.rouge_l is not None
    assert res.answers == [["GO", "GO"]]  # the answer texts that were scored
    (task,) = res.extra["per_task"]
    assert task["task"] == "g" and task["exact_match"] == 0.5 and task["rouge_l"] == res.rouge_l
    lo, hi = res.extra["rouge_l_ci95"]
    assert lo <= res.rouge_l <= hi


def test_generation_stops_at_the_answer_end_like_a_plain_greedy_loop():
    """With `answer_end` set, an answer ends at the first token holding it (not only EOS) and is cut there:
    the same tokens as a plain greedy loop over HF's own forward that stops at those ids."""
    from dataclasses import replace

    from gistlib.core.prefix import generate_with_prefix
    from gistlib.data.render import answer_text, stop_token_ids

    fmt = replace(COMPACT, answer_end=";")
    stops = stop_token_ids(TOK, fmt)
    semi = TOK.convert_tokens_to_ids(";")
    assert TOK.eos_token_id in stops and semi in stops
    assert answer_ids("GO", TOK, fmt)[-1] == semi  # the labelled answer ends with the same text
    model = small_pocket_model(TOK, seed=5)
    prompt = [TOK.bos_token_id, *TOK.convert_tokens_to_ids(["fama", "GO", ";", "muso", "->"])]

    def greedy(stop_ids: set[int]) -> list[int]:  # the reference: HF's forward, one token at a time
        seq, out = list(prompt), []
        for _ in range(12):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
            if token in stop_ids:
                break
        return out

    with torch.no_grad():
        free = greedy(set())
        stop_set = [TOK.eos_token_id, free[2]]  # a non-EOS stop the model reaches by its third token
        ids = torch.tensor([prompt, [TOK.pad_token_id] * 2 + prompt[2:]])
        mask = torch.tensor([[1] * len(prompt), [0, 0] + [1] * (len(prompt) - 2)])
        got = generate_with_prefix(model, None, ids, mask, 12, stop_set, TOK.pad_token_id)
        assert got[0] == greedy(set(stop_set)) and len(got[0]) <= 3 and got[0][-1] == free[2]
    text = answer_text(got[0], TOK, fmt)
    assert text == TOK.decode(got[0]).split(";")[0].replace(TOK.eos_token, "").strip() and ";" not in text


def test_definition_only_reads_the_definition_and_the_query_without_demos():
    model = small_pocket_model(TOK, seed=6)
    ep = Episode("d", [Example("fama", "GO")], [Example("muso", "DA", ["GO", "DA"])], definition="rasu kepi")
    method = definition_only(model, TOK, COMPACT)
    from gistlib.data.render import definition_ids, query_ids

    expected = [TOK.bos_token_id] + definition_ids("rasu kepi", TOK, COMPACT) + query_ids(ep.queries[0], TOK, COMPACT)
    assert method.prompt(0, ep, ep.queries[0]) == expected


def test_two_level_interval_resamples_tasks_and_instances():
    """Constant tasks: the tasks are the only error (the one-level interval over task means); noisy instances
    inside one task: a one-level interval over tasks would be 0 wide, the two-level one is not."""
    flat = [[v] * 10 for v in [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] * 3]
    one, two = bootstrap_interval([g[0] for g in flat]), two_level_interval(flat)
    assert abs(one[0] - two[0]) < 0.04 and abs(one[1] - two[1]) < 0.04
    noisy = [[0.0, 1.0] * 10 for _ in range(6)]  # every task's mean is 0.5
    assert bootstrap_interval([0.5] * 6) == (0.5, 0.5)
    lo, hi = two_level_interval(noisy)
    assert lo < 0.5 < hi and 0.05 < hi - lo < 0.3
    assert two_level_interval([[1.0] * 4] * 3) == (1.0, 1.0)


def test_bootstrap_interval():
    lo, hi = bootstrap_interval([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)
