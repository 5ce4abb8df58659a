"""ICL distillation: teacher rows pair with the right tokens, the loss equals a brute-force loop, the
teacher's hidden states are transformers' own, and HyperLlama routes the extra term like the LM loss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PAD
from test_hyper import make_hyper, perturb_lora, toy_batch, toy_teacher

from gistlib.core.distill import hidden_cosine_loss, suffix_alignment, teacher_hidden_states
from gistlib.data import load_pocket_suite, pocket_tokenizer
from gistlib.data.batches import hyper_batches, sample_episodes
from gistlib.models.tiny import build_tiny_llama, gist_token_ids

TOK = pocket_tokenizer(4)


def pocket_batch(tasks=5, queries=3, teacher_queries=2):
    suite = [t for t in load_pocket_suite()["train"] if t.meta.get("level") in ("C2", "C8")][:40]
    episodes = sample_episodes(suite, 3, queries)
    stream = hyper_batches(episodes, TOK, gist_token_ids(TOK), tasks, teacher_queries=teacher_queries)
    return next(stream)


def test_teacher_rows_pair_each_query_token_with_itself():
    b = pocket_batch()
    assert b["icl_rows"].tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13]  # the first 2 queries of each task
    student_mask = b["attention_mask"][b["icl_rows"]]
    s_idx, t_idx, valid = suffix_alignment(student_mask, b["icl_attention_mask"])
    for r, row in enumerate(b["icl_rows"].tolist()):
        student = b["input_ids"][row][s_idx[r][valid[r]]].tolist()
        teacher = b["icl_input_ids"][r][t_idx[r][valid[r]]].tolist()
        assert student == teacher
        assert TOK.convert_ids_to_tokens(student)[1] == "->" and student[-1] == TOK.eos_token_id
        # the teacher row holds the task's demos: every demo word of the hypernetwork input
        hyper_words = set(b["hyper_input_ids"][b["task_index"][row]].tolist()) - {PAD, TOK.bos_token_id}
        assert hyper_words - set(gist_token_ids(TOK)) <= set(b["icl_input_ids"][r].tolist())
    assert "icl_input_ids" not in pocket_batch(teacher_queries=0)


def test_suffix_alignment_refuses_a_short_teacher():
    with pytest.raises(ValueError, match="teacher row is shorter"):
        suffix_alignment(torch.ones(1, 5), torch.ones(1, 3))


def test_cosine_loss_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    n, m = torch.tensor([4, 2, 5]), torch.tensor([9, 7, 12])
    s_mask = (torch.arange(6)[None] < n[:, None]).long()
    t_mask = (torch.arange(12)[None] < m[:, None]).long()
    student = [torch.randn(3, 6, 8, generator=g) for _ in range(2)]
    teacher = [torch.randn(3, 12, 8, generator=g) for _ in range(2)]
    per_layer = []
    for hs, ht in zip(student, teacher):
        terms = []
        for r in range(3):
            for j in range(1, int(n[r])):  # every real token after BOS ...
                tj = int(m[r]) - int(n[r]) + j  # ... against the same token at the end of the teacher row
                terms.append(1 - F.cosine_similarity(hs[r, j], ht[r, tj], dim=0))
        per_layer.append(torch.stack(terms).mean())
    ours = hidden_cosine_loss(student, teacher, s_mask, t_mask)
    torch.testing.assert_close(ours, torch.stack(per_layer).mean())
    assert hidden_cosine_loss(teacher, teacher, t_mask, t_mask).abs() < 1e-6


def test_teacher_hidden_states_are_the_models_own():
    model = build_tiny_llama(vocab_size=64, seed=0)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, PAD, PAD]])
    mask = (ids != PAD).long()
    ours = teacher_hidden_states(model, ids, mask)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
    assert len(ours) == model.config.num_hidden_layers
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-4)


def test_distillation_changes_the_gradient_and_weight_zero_switches_it_off():
    def grads(**teacher):
        hyper = make_hyper()
        perturb_lora(hyper)
        hyper.train()
        hyper.loss_and_backward(*toy_batch(), **teacher)
        return hyper.gist_embeddings.grad.clone()

    teacher = toy_teacher(toy_batch())
    plain = grads()
    assert not torch.allclose(grads(**teacher), plain)
    torch.testing.assert_close(grads(**teacher, distill_weight=0.0), plain)


def test_the_training_loop_feeds_teacher_rows_with_the_configured_weight(tmp_path):
    """`train` hands teacher rows to the trainee, weighted by `HyperConfig.distill_weight`; weight 0 = no teacher."""
    from gistlib.train.loop import TrainConfig, train

    def stream(teacher: bool):
        while True:
            batch = toy_batch()
            extra = toy_teacher(batch) if teacher else {}
            names = ("hyper_input_ids", "hyper_attention_mask", "input_ids", "attention_mask", "labels", "task_index")
            yield dict(zip(names, batch)) | extra

    def weights(teacher: bool, weight: float, out: str):
        hyper = make_hyper(distill_weight=weight)
        cfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=0, out_dir=str(tmp_path / out), progress=False)
        train(hyper, stream(teacher), cfg)
        return hyper.gist_embeddings.detach().clone()

    plain = weights(False, 1.0, "plain")
    torch.testing.assert_close(weights(True, 0.0, "off"), plain)
    assert not torch.allclose(weights(True, 1.0, "on"), plain)


# ---------------------------------------------------------------------------------------------- Gisting


def gisting_batch(teacher: bool = True, batch_size: int = 4):
    from gistlib.data.batches import gisting_batches

    suite = [t for t in load_pocket_suite()["train"] if t.meta.get("level") in ("C2", "C8")][:40]
    stream = gisting_batches(sample_episodes(suite, 5, 1), TOK, gist_token_ids(TOK)[:3], batch_size, teacher=teacher)
    return next(stream)


def gisting_trainee(weight: float, seed: int = 1):
    from conftest import small_pocket_model

    from gistlib.core.lm import LMTrainee

    teacher = small_pocket_model(TOK, seed=0)
    student = small_pocket_model(TOK, seed=seed)  # seed 0 too: the student starts as the teacher
    return LMTrainee(student, "gist", gist_token_ids(TOK)[:3], distill_weight=weight, teacher=teacher), teacher


def test_gisting_teacher_rows_are_the_rows_without_their_gists():
    b = gisting_batch()
    gist = set(gist_token_ids(TOK)[:3])
    for ids, m, t_ids, t_m in zip(b["input_ids"], b["attention_mask"], b["icl_input_ids"], b["icl_attention_mask"]):
        row = ids[m.bool()].tolist()
        assert sum(t in gist for t in row) == 3
        assert t_ids[t_m.bool()].tolist() == [t for t in row if t not in gist]
    assert "icl_input_ids" not in gisting_batch(teacher=False)


def test_gisting_distillation_equals_a_per_row_loop_over_plain_forwards():
    """The distillation term = a loop over unpadded rows: the student under the gist mask, the teacher a plain
    HF forward of the row without gists, 1 - cos on every token after the last gist, every layer."""
    from gistlib.core.masks import make_gist_mask

    b = gisting_batch()
    trainee, teacher = gisting_trainee(weight=2.0)
    with torch.no_grad():
        total, lm = trainee.objective(
            **{n: b[n] for n in ("input_ids", "attention_mask", "labels")},
            icl_input_ids=b["icl_input_ids"],
            icl_attention_mask=b["icl_attention_mask"],
        )
        per_layer = []
        for r in range(len(b["input_ids"])):
            ids = b["input_ids"][r][b["attention_mask"][r].bool()][None]
            t_ids = b["icl_input_ids"][r][b["icl_attention_mask"][r].bool()][None]
            additive = torch.where(make_gist_mask(ids, gist_token_ids(TOK)[:3]), 0.0, torch.finfo(torch.float32).min)
            s_h = trainee.model(input_ids=ids, attention_mask=additive, output_hidden_states=True).hidden_states[1:]
            t_h = teacher(input_ids=t_ids, output_hidden_states=True).hidden_states[1:]
            last_gist = max(i for i, t in enumerate(ids[0].tolist()) if t in gist_token_ids(TOK)[:3])
            after = ids.shape[1] - 1 - last_gist
            assert ids[0, -after:].tolist() == t_ids[0, -after:].tolist()
            per_layer.append([1 - F.cosine_similarity(s[0, -after:], t[0, -after:], dim=-1) for s, t in zip(s_h, t_h)])
        layers = len(per_layer[0])
        loop = torch.stack([torch.cat([row[i] for row in per_layer]).mean() for i in range(layers)]).mean()
    torch.testing.assert_close(total - lm, 2.0 * loop, atol=1e-5, rtol=1e-4)
    assert loop > 0.01  # the gist mask hides the demos: the student does not yet match the teacher


def test_gisting_distillation_trains_the_student_only_and_weight_zero_is_plain_gisting():
    b = gisting_batch()

    def grads(weight: float, teacher: bool = True):
        trainee, frozen = gisting_trainee(weight)
        batch = b if teacher else {n: b[n] for n in ("input_ids", "attention_mask", "labels")}
        loss = trainee.loss_and_backward(**batch)
        assert all(p.grad is None for p in frozen.parameters())
        return loss, trainee.model.model.embed_tokens.weight.grad.clone()

    lm0, plain = grads(0.0)
    lm1, taught = grads(1.0)
    torch.testing.assert_close(lm1, lm0)  # the returned loss is the LM loss alone
    assert not torch.allclose(taught, plain)
    torch.testing.assert_close(grads(1.0, teacher=False)[1], plain)


def test_gisting_distillation_needs_a_teacher():
    from conftest import small_pocket_model

    from gistlib.core.lm import LMTrainee

    with pytest.raises(ValueError, match="teacher"):
        LMTrainee(small_pocket_model(TOK, seed=0), "gist", gist_token_ids(TOK)[:3], distill_weight=1.0)


def test_a_lora_trainees_teacher_is_the_base_with_its_adapter_off():
    """With lora_rank > 0 (no teacher copy) the teacher is the trainee's own base with every LoRA branch off:
    its hidden states equal a never-wrapped copy of the base even after the LoRA has moved, and the LoRA is on
    again afterwards."""
    from conftest import small_pocket_model

    from gistlib.core.lm import LMTrainee

    b = gisting_batch()
    gists = gist_token_ids(TOK)[:3]
    trainee = LMTrainee(small_pocket_model(TOK, seed=0), "gist", gists, lora_rank=4, distill_weight=1.0)
    with torch.no_grad():
        for name, p in trainee.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # PEFT starts B at zero: make the adapter change the model
        ids, mask = b["icl_input_ids"], b["icl_attention_mask"]
        taught = trainee._teacher_hidden(ids, mask)
        plain = small_pocket_model(TOK, seed=0)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        adapted = trainee.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    for t, p in zip(taught, plain.hidden_states[1:]):
        torch.testing.assert_close(t[real], p[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted.hidden_states[-1][real], plain.hidden_states[-1][real], atol=1e-3)
