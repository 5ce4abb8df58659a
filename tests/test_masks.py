"""Gist masks: docstring matrices, a brute-force reference (hypothesis), errors, additive form."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gistlib.core import masks
from gistlib.core.masks import (
    make_causal_mask,
    make_gist_mask,
    mask_to_string,
    negative_control_mask,
    positive_control_mask,
    to_additive,
)

PAD, G = 0, 9


def reference_gist_mask(ids: list[int], gist_ids: set[int], real: list[bool], mode: str = "gist") -> list[list[bool]]:
    """The rule of DESIGN.md section 4 written as a plain double loop over (i, j)."""
    L = len(ids)
    gpos = [i for i, t in enumerate(ids) if t in gist_ids]
    f, last = (gpos[0], gpos[-1]) if gpos else (None, None)
    out = []
    for i in range(L):
        row = []
        for j in range(L):
            if i == j:
                row.append(True)
                continue
            ok = j <= i and real[j]
            if ok and gpos and i > last:
                if mode == "gist":
                    ok = j >= f
                elif mode == "negative":
                    ok = j > last
            row.append(ok)
        out.append(row)
    return out


def docstring_matrices(func) -> list[tuple[list[str], torch.Tensor]]:
    """Parse the `key ...` ASCII matrices of a docstring into (labels, (L, L) bool)."""
    lines = func.__doc__.splitlines()
    found = []
    for n, line in enumerate(lines):
        if line.strip().startswith("key"):
            labels = line.split()[1:]
            rows = []
            for row in lines[n + 1 : n + 1 + len(labels)]:
                cells = row.split()[1:][: len(labels)]
                rows.append([c == "x" for c in cells])
            found.append((labels, torch.tensor(rows)))
    assert found, f"{func.__name__} has no matrix in its docstring"
    return found


def ids_for(labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Letters -> token ids, `G` -> gist id, `_` -> pad."""
    table = {"G": G, "_": PAD}
    ids = [table.get(s, 1 + (ord(s[0]) % 7)) for s in labels]
    t = torch.tensor([ids])
    return t, (t != PAD).long()


def test_gist_mask_matches_its_docstring():
    ((labels, expected),) = docstring_matrices(make_gist_mask)
    ids, am = ids_for(labels)
    assert torch.equal(make_gist_mask(ids, G, attention_mask=am)[0, 0], expected)


def test_negative_control_matches_its_docstring():
    ((labels, expected),) = docstring_matrices(negative_control_mask)
    ids, am = ids_for(labels)
    assert torch.equal(negative_control_mask(ids, G, attention_mask=am)[0, 0], expected)


def test_causal_mask_matches_its_docstring():
    ((labels, expected),) = docstring_matrices(make_causal_mask)
    ids = torch.tensor([[PAD, 3, 4, 5]])
    assert len(labels) == 4
    assert torch.equal(make_causal_mask(ids, pad_token_id=PAD)[0, 0], expected)


def test_mask_to_string_round_trips_through_the_parser():
    ids = torch.tensor([[3, 4, G, G, 5, 6]])
    text = mask_to_string(make_gist_mask(ids, G)[0], ["a", "b", "G", "G", "c", "d"])
    body = [line.split()[1:] for line in text.splitlines()[1:]]
    assert torch.equal(torch.tensor([[c == "x" for c in r] for r in body]), make_gist_mask(ids, G)[0, 0])


@st.composite
def batches(draw):
    """Random batches: 1-4 rows, lengths 1-12, 0/1/many gist tokens (one id or distinct ids), left or right pad."""
    B = draw(st.integers(1, 4))
    L = draw(st.integers(1, 12))
    distinct = draw(st.booleans())
    gist_ids = [20, 21, 22, 23, 24, 25] if distinct else [20]
    left = draw(st.booleans())
    ids, real = [], []
    for _ in range(B):
        n = draw(st.integers(1, L))
        k = draw(st.integers(0, n))
        start = draw(st.integers(0, n - k))
        toks = [draw(st.integers(1, 19)) for _ in range(n)]
        for t in range(k):
            toks[start + t] = gist_ids[t % len(gist_ids)]
        pad = [PAD] * (L - n)
        row = pad + toks if left else toks + pad
        ids.append(row)
        real.append([t != PAD for t in row])
    return ids, real, gist_ids


@settings(max_examples=150, deadline=None)
@given(batches())
def test_gist_mask_equals_brute_force(batch):
    ids, real, gist_ids = batch
    t = torch.tensor(ids)
    got = make_gist_mask(t, gist_ids, pad_token_id=PAD)
    assert got.shape == (len(ids), 1, len(ids[0]), len(ids[0])) and got.dtype == torch.bool
    for b in range(len(ids)):
        assert got[b, 0].tolist() == reference_gist_mask(ids[b], set(gist_ids), real[b])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_controls_equal_brute_force(batch):
    ids, real, gist_ids = batch
    t = torch.tensor(ids)
    neg = negative_control_mask(t, gist_ids, pad_token_id=PAD)
    pos = positive_control_mask(t, pad_token_id=PAD)
    for b in range(len(ids)):
        assert neg[b, 0].tolist() == reference_gist_mask(ids[b], set(gist_ids), real[b], "negative")
        assert pos[b, 0].tolist() == reference_gist_mask(ids[b], set(), real[b])


def test_every_row_keeps_its_own_position_and_never_sees_pads():
    ids = torch.tensor([[PAD, PAD, 3, G, G, 4], [3, G, 4, 5, PAD, PAD]])
    m = make_gist_mask(ids, G, pad_token_id=PAD)[:, 0]
    assert m.diagonal(dim1=-2, dim2=-1).all()
    pad_cols = (ids == PAD)[:, None, :] & ~torch.eye(6, dtype=torch.bool)
    assert not (m & pad_cols).any()


def test_row_without_gists_is_plain_causal():
    ids = torch.tensor([[3, 4, 5, 6], [3, G, 4, 5]])
    m = make_gist_mask(ids, G)
    assert torch.equal(m[0], make_causal_mask(ids[:1])[0])
    assert not torch.equal(m[1], make_causal_mask(ids[1:])[0])


def test_attention_mask_wins_over_pad_token():
    ids = torch.tensor([[0, 3, G, 4]])  # token 0 is real here
    am = torch.ones_like(ids)
    assert make_gist_mask(ids, G, pad_token_id=0, attention_mask=am)[0, 0, 1, 0]
    assert not make_gist_mask(ids, G, pad_token_id=0)[0, 0, 1, 0]


def test_non_contiguous_gists_raise_naming_the_row():
    ids = torch.tensor([[3, G, G, 4], [3, G, 4, G]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        make_gist_mask(ids, G)


def test_vectorised_no_python_loop_over_rows():
    """The mask functions must not iterate rows/positions in Python (checked on the source)."""
    import inspect

    for fn in (masks.make_gist_mask, masks.negative_control_mask, masks.make_causal_mask, masks.gist_span):
        assert not re.search(r"\bfor\b", inspect.getsource(fn).split('"""')[-1]), fn.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_additive(dtype):
    m = torch.tensor([[[[True, False], [True, True]]]])
    a = to_additive(m, dtype)
    assert a.dtype == dtype and a.shape == m.shape
    assert a[0, 0, 0, 0] == 0 and a[0, 0, 0, 1] == torch.finfo(dtype).min
    with pytest.raises(TypeError):
        to_additive(a)
