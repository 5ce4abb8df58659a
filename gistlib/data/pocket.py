"""The pocket task suite: synthetic few-shot tasks that a model of a few million parameters can learn.

Every task is one rule drawn at random; the rule can only be read off the demos, so zero-shot is at
chance by construction. Three families share one small word-level vocabulary (< 120 words):

    classify   a task maps each of C latent categories (8 in the world, 6 made-up words each) to one of
               16 symbols, injectively; examples: `word -> symbol`, choices = the task's C symbols.
               levels: C = 2, 4, 8 (num_demos = 2 per category). DESIGN 5b's suite is the C = 4 level.
    transform  a task is a string rule, a composition of 1-3 primitive edits (reverse, rotate, swap,
               shift letters, sort, duplicate an end) over 5 letters from an 8-letter alphabet;
               examples `a c f h b -> b h f c a`.
               level: rule length (edits in the shortest composition giving that function).
    arith      a task is y = (a*x + c) mod 100 on two-digit numbers written as digits (`4 7 -> 5 3`).
               level: rule_length 1 (a = 1, just "+c"), 2 (a in 3, 7, 9, 11).

Splits hold disjoint rules: `test` rules never occur in `train`, and `validation` (for early stopping)
shares rules with neither. Regenerating with the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from .episodes import Example, Task, load_tasks_jsonl, save_tasks_jsonl
from .files import REPO_ROOT
from .render import COMPACT, VERBOSE, RenderFormat

SPLITS = ("train", "validation", "test")
DEFAULT_DIR = REPO_ROOT / "data" / "pocket"

NUM_CATEGORIES = 8  # latent categories in the world
WORDS_PER_CATEGORY = 6
NUM_SYMBOLS = 16
LETTERS = list("abcdefgh")  # transform alphabet
DIGITS = [str(d) for d in range(10)]
TRANSFORM_LENGTH = 5  # letters per transform input
EXAMPLES_PER_GENERATION_TASK = 32
GENERATION_DEMOS = 8

# tasks per (split, family, level); classify C=4 train matches DESIGN 5b (3,000 training maps, 400 held out)
CLASSIFY_SIZES = {
    "train": {2: 500, 4: 3000, 8: 500},
    "validation": {2: 50, 4: 100, 8: 50},
    "test": {2: 100, 4: 400, 8: 100},
}
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}  # of the finite rule sets (transform, arith)
ARITH_MULTIPLIERS = {1: [1], 2: [3, 7, 9, 11]}


# ----------------------------------------------------------------------------- the world


def _made_up_words(n: int, rng: random.Random, syllables: int, upper: bool = False) -> list[str]:
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables))
        w = w.upper() if upper else w
        if w not in out:
            out.append(w)
    return out


def pocket_world(seed: int = 0) -> dict:
    """The shared world: `categories` (8 lists of 6 made-up words) and `symbols` (16 labels)."""
    rng = random.Random(f"pocket-world-{seed}")
    words = _made_up_words(NUM_CATEGORIES * WORDS_PER_CATEGORY, rng, syllables=2)
    symbols = _made_up_words(NUM_SYMBOLS, rng, syllables=1, upper=True)
    cats = [words[i * WORDS_PER_CATEGORY : (i + 1) * WORDS_PER_CATEGORY] for i in range(NUM_CATEGORIES)]
    return {"categories": cats, "symbols": symbols}


# ----------------------------------------------------------------------------- classify


def _classify_tasks(world: dict, rng: random.Random) -> dict[str, list[Task]]:
    """Category -> symbol maps, distinct across all splits (so test maps never occur in train)."""
    seen: set[tuple] = set()
    out: dict[str, list[Task]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for C, n in CLASSIFY_SIZES[split].items():
            while sum(t.meta["num_categories"] == C for t in out[split]) < n:
                cats = sorted(rng.sample(range(NUM_CATEGORIES), C))
                syms = rng.sample(world["symbols"], C)
                rule = tuple(zip(cats, syms))
                if rule in seen:
                    continue
                seen.add(rule)
                choices = sorted(syms)
                examples = [Example(word, sym, choices) for cat, sym in rule for word in world["categories"][cat]]
                rng.shuffle(examples)
                idx = len(out[split])
                out[split].append(
                    Task(
                        name=f"pocket-classify-{split}-{idx:05d}",
                        examples=examples,
                        family="classify",
                        meta={
                            "level": f"C{C}",
                            "num_categories": C,
                            "num_demos": 2 * C,
                            "rule_length": C,
                            "rule": " ".join(f"cat{c}->{s}" for c, s in rule),
                        },
                    )
                )
    return out


# ----------------------------------------------------------------------------- transform


def _shift(seq: list[str], k: int) -> list[str]:
    return [LETTERS[(LETTERS.index(ch) + k) % len(LETTERS)] for ch in seq]


TRANSFORM_OPS: dict[str, Callable[[list[str]], list[str]]] = {
    "reverse": lambda s: s[::-1],
    "rotl": lambda s: s[1:] + s[:1],
    "rotr": lambda s: s[-1:] + s[:-1],
    "swap_first": lambda s: [s[1], s[0], *s[2:]],
    "swap_last": lambda s: [*s[:-2], s[-1], s[-2]],
    "shift_up": lambda s: _shift(s, 1),
    "shift_down": lambda s: _shift(s, -1),
    "sort": lambda s: sorted(s),
    "dup_first": lambda s: [s[0], *s[:-1]],  # shift right, the first letter doubled, the last dropped
    "dup_last": lambda s: [*s[1:], s[-1]],
}


def apply_transform(rule: tuple[str, ...], seq: list[str]) -> list[str]:
    """Apply the edits of `rule`, left to right."""
    for op in rule:
        seq = TRANSFORM_OPS[op](seq)
    return seq


def transform_rules(max_length: int = 3) -> list[tuple[tuple[str, ...], int]]:
    """Distinct transform functions as (shortest rule, rule length), identity excluded, in a fixed order."""
    probe_rng = random.Random("transform-probe")
    probes = [[probe_rng.choice(LETTERS) for _ in range(TRANSFORM_LENGTH)] for _ in range(64)]
    seen = {tuple(tuple(p) for p in probes)}  # the identity's signature
    rules = []
    frontier: list[tuple[str, ...]] = [()]
    for length in range(1, max_length + 1):
        frontier = [r + (op,) for r in frontier for op in TRANSFORM_OPS]
        for rule in frontier:
            sig = tuple(tuple(apply_transform(rule, p)) for p in probes)
            if sig not in seen:
                seen.add(sig)
                rules.append((rule, length))
    return rules


def _split_rules(rules: list, rng: random.Random) -> dict[str, list]:
    rules = list(rules)
    rng.shuffle(rules)
    n_train = round(len(rules) * SPLIT_FRACTIONS["train"])
    n_val = round(len(rules) * SPLIT_FRACTIONS["validation"])
    return {
        "train": rules[:n_train],
        "validation": rules[n_train : n_train + n_val],
        "test": rules[n_train + n_val :],
    }


def _add_generation_task(tasks: list[Task], family: str, split: str, examples, level: str, length: int, rule: str):
    """Append a generation task of the pocket suite, named by family, split and position."""
    meta = {"level": level, "num_demos": GENERATION_DEMOS, "rule_length": length, "rule": rule}
    tasks.append(Task(f"pocket-{family}-{split}-{len(tasks):05d}", examples, family=family, meta=meta))


def _transform_tasks(rng: random.Random) -> dict[str, list[Task]]:
    by_level: dict[int, list] = {}
    for rule, length in transform_rules():
        by_level.setdefault(length, []).append(rule)
    out: dict[str, list[Task]] = {s: [] for s in SPLITS}
    for length in sorted(by_level):
        for split, rules in _split_rules(by_level[length], rng).items():
            for rule in rules:
                inputs: set[tuple[str, ...]] = set()
                while len(inputs) < EXAMPLES_PER_GENERATION_TASK:
                    inputs.add(tuple(rng.choice(LETTERS) for _ in range(TRANSFORM_LENGTH)))
                examples = [Example(" ".join(x), " ".join(apply_transform(rule, list(x)))) for x in sorted(inputs)]
                rng.shuffle(examples)
                _add_generation_task(out[split], "transform", split, examples, f"L{length}", length, ",".join(rule))
    return out


# ----------------------------------------------------------------------------- arith


def number_words(n: int) -> str:
    """A number 0..99 as two digit tokens: 7 -> '0 7'."""
    return f"{n // 10} {n % 10}"


def _arith_tasks(rng: random.Random) -> dict[str, list[Task]]:
    out: dict[str, list[Task]] = {s: [] for s in SPLITS}
    for level, multipliers in ARITH_MULTIPLIERS.items():
        rules = [(a, c) for a in multipliers for c in range(100) if (a, c) != (1, 0)]
        for split, chosen in _split_rules(rules, rng).items():
            for a, c in chosen:
                xs = rng.sample(range(100), EXAMPLES_PER_GENERATION_TASK)
                examples = [Example(number_words(x), number_words((a * x + c) % 100)) for x in xs]
                _add_generation_task(out[split], "arith", split, examples, f"L{level}", level, f"y=({a}x+{c})%100")
    return out


# ----------------------------------------------------------------------------- the suite


def generate_pocket_suite(seed: int = 0) -> dict[str, list[Task]]:
    """All three families, split into train / validation / test with disjoint rules. Deterministic in `seed`."""
    world = pocket_world(seed)
    parts = [
        _classify_tasks(world, random.Random(f"pocket-classify-{seed}")),
        _transform_tasks(random.Random(f"pocket-transform-{seed}")),
        _arith_tasks(random.Random(f"pocket-arith-{seed}")),
    ]
    return {split: [t for p in parts for t in p[split]] for split in SPLITS}


def pocket_vocabulary(seed: int = 0) -> list[str]:
    """Every word the suite, its corpus and both render formats can produce, sorted."""
    world = pocket_world(seed)
    words = {w for cat in world["categories"] for w in cat} | set(world["symbols"]) | set(LETTERS) | set(DIGITS)
    for fmt in (COMPACT, VERBOSE):
        for field_text in fmt.__dict__.values():
            words |= set(field_text.split())
    return sorted(words) + ["\n"]


def pocket_tokenizer(num_gist_tokens: int = 16, seed: int = 0):
    """A word-level tokenizer over the full suite vocabulary (deterministic ids: specials, then sorted words)."""
    from gistlib.models.tiny import build_tokenizer

    vocab = pocket_vocabulary(seed)
    # one occurrence of each word: the trainer then orders them by its (deterministic) tie rule
    return build_tokenizer([" ".join(vocab[:-1]) + "\n"], num_gist_tokens=num_gist_tokens, kind="word", vocab_size=1000)


def pocket_words_by_id(seed: int = 0) -> list[str]:
    """The suite's words in `pocket_tokenizer` id order (after the special and gist tokens); `vocab.txt`."""
    tok = pocket_tokenizer(num_gist_tokens=0, seed=seed)
    vocab = tok.get_vocab()
    return [w for w in sorted(vocab, key=vocab.get) if w not in tok.all_special_tokens]


def hyperpretraining_corpus(
    tasks: list[Task],
    num_documents: int = 2000,
    examples_per_document: int = 12,
    seed: int = 0,
    fmt: RenderFormat = COMPACT,
) -> list[str]:
    """Plain-text documents for hyperpretraining: each is a run of one task's examples in `fmt`'s demo layout.

    Pass training tasks only, so held-out rules never leak. A context segment of a document predicts its
    continuation only through the rule, which is what hyperpretraining asks the hypernetwork to capture."""
    rng = random.Random(f"pocket-corpus-{seed}")
    docs = []
    for _ in range(num_documents):
        task = rng.choice(tasks)
        exs = rng.sample(task.examples, min(examples_per_document, len(task.examples)))
        docs.append(
            "".join(
                fmt.demo_input_prefix + e.input + fmt.demo_output_prefix + e.output + fmt.demo_suffix for e in exs
            ).strip()
        )
    return docs


def write_pocket_suite(
    out_dir: str | os.PathLike = DEFAULT_DIR, seed: int = 0, num_corpus_documents: int = 2000
) -> dict[str, int]:
    """Write `{train,validation,test}.jsonl`, `vocab.txt`, `corpus.txt` and `stats.json` into `out_dir`.

    Returns the number of tasks per split. Same seed, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = generate_pocket_suite(seed)
    for split, tasks in suite.items():
        save_tasks_jsonl(tasks, out / f"{split}.jsonl")
    (out / "vocab.txt").write_text(
        "".join(json.dumps(w) + "\n" for w in pocket_words_by_id(seed)), encoding="utf-8", newline="\n"
    )
    corpus = hyperpretraining_corpus(suite["train"], num_corpus_documents, seed=seed)
    (out / "corpus.txt").write_text("".join(d + "\n" for d in corpus), encoding="utf-8", newline="\n")
    (out / "stats.json").write_text(
        json.dumps(suite_stats(suite), indent=1, sort_keys=True) + "\n", encoding="utf-8", newline="\n"
    )
    return {s: len(t) for s, t in suite.items()}


def suite_stats(suite: dict[str, list[Task]]) -> dict:
    """Tasks and examples per split, family and level."""
    stats: dict = {}
    for split, tasks in suite.items():
        for t in tasks:
            d = (
                stats.setdefault(split, {})
                .setdefault(t.family, {})
                .setdefault(t.meta["level"], {"tasks": 0, "examples": 0})
            )
            d["tasks"] += 1
            d["examples"] += len(t.examples)
    return stats


def load_pocket_suite(dir: str | os.PathLike = DEFAULT_DIR) -> dict[str, list[Task]]:
    """Read the suite written by `write_pocket_suite`: {split: [Task, ...]}."""
    d = Path(dir)
    if not d.is_absolute() and not d.exists():
        d = REPO_ROOT / d
    return {split: load_tasks_jsonl(d / f"{split}.jsonl") for split in SPLITS}


def load_pocket_corpus(dir: str | os.PathLike = DEFAULT_DIR) -> list[str]:
    """The hyperpretraining documents written by `write_pocket_suite`, one per line."""
    return (Path(dir) / "corpus.txt").read_text(encoding="utf-8").splitlines()
