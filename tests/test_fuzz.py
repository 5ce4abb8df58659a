"""Property and fuzz tests: the gist mask and gist positions against brute force, and the JSONL / SNI
loaders on randomly damaged files (a located DataError or a report that accounts for every record)."""

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gistlib.core.masks import make_gist_mask
from gistlib.core.prefix import extract_prefix, gist_positions
from gistlib.data import DataError, Example, LoadReport, Task, load_tasks_jsonl, save_tasks_jsonl
from gistlib.data.sni import load_sni_task

GIST = [60, 61, 62]
PAD = 0
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------- masks and gist positions


@st.composite
def gist_batches(draw, faulty: bool = True):
    """(ids, attention_mask) lists: random lengths, padding side, gist span; with `faulty`, some rows
    hold a partial, reordered, split or padded gist span."""
    B, L = draw(st.integers(1, 4)), draw(st.integers(len(GIST), 10))
    left = draw(st.booleans())
    ids, am = [], []
    for _ in range(B):
        n = draw(st.integers(len(GIST), L))
        toks = [draw(st.integers(1, 50)) for _ in range(n)]
        start = draw(st.integers(0, n - len(GIST)))
        gists = list(GIST)
        fault = draw(st.sampled_from(["none", "partial", "reorder", "split", "none", "none"])) if faulty else "none"
        if fault == "partial":
            gists = gists[: draw(st.integers(0, len(GIST) - 1))]
        elif fault == "reorder":
            gists = draw(st.permutations(GIST))
        toks[start : start + len(gists)] = gists
        if fault == "split" and start + len(GIST) < n:
            toks[start + len(GIST)], toks[start + len(GIST) - 1] = toks[start + len(GIST) - 1], 7
        real = [1] * n
        if faulty and draw(st.integers(0, 5)) == 0:  # a gist position marked as padding
            real[draw(st.integers(0, n - 1))] = 0
        pad = L - n
        ids.append([PAD] * pad + toks if left else toks + [PAD] * pad)
        am.append([0] * pad + real if left else real + [0] * pad)
    return ids, am


def reference_mask(row, real):
    L = len(row)
    g = [j for j, t in enumerate(row) if t in GIST]
    out = [[False] * L for _ in range(L)]
    for i in range(L):
        for j in range(L):
            seen = j <= i and (not g or i <= g[-1] or j >= g[0])
            out[i][j] = (seen and bool(real[j])) or i == j
    return out


def reference_positions(ids, am):
    """('ok', positions) or (fault, rows) in the order gist_positions checks them."""
    spans = [[j for j, t in enumerate(row) if t in GIST] for row in ids]
    checks = [
        ("contiguous", lambda b, p: p and p != list(range(p[0], p[-1] + 1))),
        ("none", lambda b, p: not p),
        ("count", lambda b, p: len(p) != len(GIST)),
        ("order", lambda b, p: [ids[b][j] for j in p] != GIST),
        ("pad", lambda b, p: any(am[b][j] == 0 for j in p)),
    ]
    for name, bad in checks:
        rows = [b for b, p in enumerate(spans) if bad(b, p)]
        if rows:
            return name, rows
    return "ok", spans


@FAST
@given(gist_batches())
def test_gist_mask_and_positions_equal_brute_force(batch):
    ids, am = batch
    t, m = torch.tensor(ids), torch.tensor(am)
    verdict, detail = reference_positions(ids, am)
    if verdict == "contiguous":
        with pytest.raises(ValueError, match=rf"row\(s\) \[{detail[0]}\b"):
            make_gist_mask(t, GIST, attention_mask=m)
    else:
        mask = make_gist_mask(t, GIST, attention_mask=m)
        for b in range(len(ids)):
            assert mask[b, 0].tolist() == reference_mask(ids[b], am[b])
    if verdict == "ok":
        assert gist_positions(t, GIST, m).tolist() == detail
    else:
        with pytest.raises(ValueError) as e:
            gist_positions(t, GIST, m)
        assert re.search(rf"\b{detail[0]}\b", str(e.value)), (verdict, detail, str(e.value))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gist_batches(faulty=False))
def test_extract_prefix_of_a_padded_batch_equals_each_row_alone(tiny_models, batch):
    ids, am = batch
    model = tiny_models["sdpa"]
    prefix = extract_prefix(model, torch.tensor(ids), torch.tensor(am), GIST)
    for b, (row, real) in enumerate(zip(ids, am)):
        alone = torch.tensor([[t for t, r in zip(row, real) if r]])
        single = extract_prefix(model, alone, torch.ones_like(alone), GIST)
        torch.testing.assert_close(prefix.keys[:, b], single.keys[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(prefix.values[:, b], single.values[:, 0], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- damaged files


def damage(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "bytes", "type", "empty"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "bytes":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    if kind == "type":  # a string value becomes a number, a list or null
        values = [m.start() for m in re.finditer(rb'": "', data)]
        if not values:
            return data
        at = draw(st.sampled_from(values)) + 3
        end = data.index(b'"', at + 1)
        return data[:at] + draw(st.sampled_from([b"7", b"[1]", b"null", b"{}"])) + data[end + 1 :]
    return data.replace(b'"output": "b1"', b'"output": ""').replace(b'"input": "x1"', b'"input": " "')


def _tasks():
    return [Task(f"t{i}", [Example(f"x{j}", f"b{j}") for j in range(3)], "define", "fam", {"k": i}) for i in range(3)]


@FAST
@given(st.data())
def test_damaged_tasks_jsonl_is_located_or_fully_counted(tmp_path, data):
    path = tmp_path / "tasks.jsonl"
    save_tasks_jsonl(_tasks(), path)
    path.write_bytes(damage(path.read_bytes().replace(b'":"', b'": "'), data.draw))
    try:
        load_tasks_jsonl(path)
    except DataError as e:
        assert str(path) in str(e) and e.line is not None
    report = LoadReport()
    tasks = load_tasks_jsonl(path, report)  # with a report, a per-line fault never raises
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = sum(1 for line in f if line.strip())
    assert len(tasks) == report.loaded and report.loaded + report.num_skipped == lines
    assert sum(report.by_reason.values()) == report.num_skipped
    assert all(str(path) in s for s in report.skipped)
    assert all(e.input.strip() and e.output.strip() for t in tasks for e in t.examples)


@FAST
@given(st.data())
def test_damaged_sni_file_is_located_or_fully_counted(tmp_path, data):
    path = tmp_path / "task7_toy.json"
    raw = {
        "Definition": ["Say it."],
        "Positive Examples": [{"input": "p0", "output": "q0"}],
        "Instances": [{"id": str(j), "input": f"x{j}", "output": [f"b{j}"]} for j in range(4)],
    }
    path.write_bytes(damage(json.dumps(raw, indent=1).encode(), data.draw))
    report = LoadReport()
    try:
        task = load_sni_task(path, report=report)
    except DataError as e:  # the file as a whole is unreadable: located
        assert str(path) in str(e)
        return
    parsed = json.loads(path.read_bytes().decode("utf-8"))
    records = len(parsed["Instances"]) + len(parsed["Positive Examples"])
    kept = len(task.examples) + len(task.fixed_demos)
    assert report.loaded == len(task.examples) and kept + report.num_skipped == records
    assert report.by_reason["no_examples"] == (0 if task.examples else 1)
    assert all(str(path) in s for s in report.skipped)
    assert all(e.input and e.output for e in task.examples + task.fixed_demos)
