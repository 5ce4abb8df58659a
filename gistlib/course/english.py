"""A task written in English, answered by every method on a real Llama: lesson 8's playground and answer table.

    parse_examples(text)                      lines `input => output` -> [Example]
    parse_queries(text)                       lines `input` or `input => expected` -> [Example]
    english_episode(definition, ex, q)        -> Episode (the SNI layout: definition + demos, then queries)
    greedy_answers(method, episode, ...)      its greedy answers, as `evaluate` scores them
    compare(b, hyper, episode, multitask)     -> Comparison: HyperLlama's prefix and every method's answers
    describe_prefix(c) / format_comparison(c) what the prefix holds and saved / the answers, query by query
    describe_episode(episode)                 the definition and demos a method reads
    english_widget(b, hyper, multitask)       text boxes for a definition, examples and queries, and a button

Every method is the course's own (`gistlib.train.evaluate`): HyperLlama's prefix is made with the adapters on
(`hyper_prefix_method`) and read by the frozen base inside `hyper.downstream_mode()`, as in `run_experiment`;
answers are greedy and end at `stop_token_ids`, ROUGE-L is `gistlib.data.metrics.rouge_l` (best over references).
"""

from __future__ import annotations

import html
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gistlib.core.prefix import Prefix
from gistlib.course.runner import compression, hyper_prefix_method
from gistlib.data import Episode, Example, RenderFormat
from gistlib.data.metrics import rouge_l
from gistlib.train.evaluate import Method, definition_only, evaluate, icl, with_prefixes, zero_shot

__all__ = [
    "EXAMPLE_TASKS",
    "METHODS",
    "LABELS",
    "parse_examples",
    "parse_queries",
    "english_episode",
    "find_task",
    "greedy_answers",
    "Comparison",
    "compare",
    "describe_prefix",
    "describe_episode",
    "format_comparison",
    "english_widget",
]

# a few tasks to start from: (definition, examples, queries); the queries carry the answer expected, for ROUGE-L
EXAMPLE_TASKS: dict[str, tuple[str, str, str]] = {
    "capital cities": (
        "Given the name of a country, write the name of its capital city.",
        "France => Paris\nJapan => Tokyo\nKenya => Nairobi",
        "Italy => Rome\nEgypt => Cairo\nSpain => Madrid\nCanada => Ottawa",
    ),
    "antonyms": (
        "Write a word that means the opposite of the given word.",
        "hot => cold\nbig => small\nhappy => sad",
        "fast => slow\nearly => late\nopen => closed\nstrong => weak",
    ),
    "plurals": (
        "Write the plural form of the given English noun.",
        "cat => cats\nbox => boxes\nchild => children",
        "dog => dogs\ncity => cities\nmouse => mice\nknife => knives",
    ),
    "movie reviews": (
        "Decide whether the movie review is positive or negative. Answer with one word: positive or negative.",
        "A wonderful, moving film with a great cast. => positive\nBoring, and far too long. => negative",
        "I loved every minute of it. => positive\nThe acting was terrible and the plot made no sense. => negative\n"
        "A delight from start to finish. => positive",
    ),
}

# the methods a comparison runs, in the order shown (multitask_icl only with its model)
METHODS = ("hyperllama", "icl", "multitask_icl", "definition_only", "zero_shot")
LABELS = {
    "hyperllama": "HyperLlama prefix",
    "icl": "ICL (frozen base)",
    "multitask_icl": "multitask ICL",
    "definition_only": "definition only",
    "zero_shot": "zero-shot",
    "wrong_task_prefix": "wrong-task prefix",
}
SEPARATOR = "=>"


def _split_line(line: str, no: int, what: str) -> tuple[str, str]:
    """`input => output`, split at the last `=>`: both sides stripped and non-empty, else ValueError naming the line."""
    if SEPARATOR not in line:
        raise ValueError(f"{what} line {no} {line!r}: write `input {SEPARATOR} output`, e.g. `France => Paris`")
    x, y = (s.strip() for s in line.rsplit(SEPARATOR, 1))
    if not x or not y:
        raise ValueError(f"{what} line {no} {line!r}: both the input and the output need some text")
    return x, y


def parse_examples(text: str) -> list[Example]:
    """Lines `input => output` (blank lines skipped) -> demos. A line without `=>`, or with an empty side, raises
    ValueError naming the line; so does a text without any example."""
    demos = [Example(*_split_line(line.strip(), no, "example"))
             for no, line in enumerate(text.splitlines(), 1) if line.strip()]  # fmt: skip
    if not demos:
        raise ValueError(f"no examples: write at least one line `input {SEPARATOR} output`")
    return demos


def parse_queries(text: str) -> list[Example]:
    """Lines `input`, or `input => expected answer` (then scored with ROUGE-L), blank lines skipped -> queries.

    A query without an expected answer has output "" (nothing to score). No query at all raises ValueError."""
    queries = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        x, y = _split_line(line, no, "query") if SEPARATOR in line else (line, "")
        queries.append(Example(x, y))
    if not queries:
        raise ValueError("no queries: write at least one input, one per line")
    return queries


def english_episode(
    definition: str, examples: str | Sequence[Example], queries: str | Sequence[Example], task: str = "your_task"
) -> Episode:
    """Your task as an episode: the definition (None when blank) and the demos, as in the Tk-Instruct episodes
    of SNI (`gistlib.data.sni.sni_episode`), then the queries. Strings are parsed by `parse_examples` and
    `parse_queries`."""
    demos = parse_examples(examples) if isinstance(examples, str) else list(examples)
    asked = parse_queries(queries) if isinstance(queries, str) else list(queries)
    return Episode(task, demos, asked, definition.strip() or None)


def find_task(tasks, name: str):
    """The task called `name` among `tasks`; a KeyError listing the names there when it is absent."""
    for t in tasks:
        if t.name == name:
            return t
    raise KeyError(f"no task {name!r} here; the tasks are: {', '.join(t.name for t in tasks)}")


@torch.no_grad()
def greedy_answers(
    method: Method, episode: Episode, tokenizer, fmt: RenderFormat, max_new_tokens: int = 32, batch_size: int = 8
) -> list[str]:
    """`method`'s greedy answer to every query of `episode` (the method's prefix row 0, if it has prefixes): the
    answers `gistlib.train.evaluate.evaluate` scores (ended at `stop_token_ids`, cut by `answer_text`)."""
    return evaluate(method, [episode], tokenizer, fmt, batch_size, max_new_tokens).answers[0]


@dataclass
class Comparison:
    """Every method's answers to one episode, and the HyperLlama prefix made from its definition and demos.

    answers: method -> one answer per query (in `episode.queries` order); prefix: one row (n, 1, H_kv, k, hd);
    demo_tokens: the hypernetwork's input without the gist tokens (BOS, definition, demos), what ICL keeps in
    context instead of the prefix."""

    episode: Episode
    answers: dict[str, list[str]]
    prefix: Prefix
    prefix_seconds: float
    demo_tokens: int

    @property
    def k(self) -> int:
        return self.prefix.num_virtual_tokens

    @property
    def prefix_bytes(self) -> int:
        return self.prefix.nbytes()

    @property
    def demo_kv_bytes(self) -> int:
        """Bytes of the keys and values ICL holds for the definition and demos (same dtype as the prefix)."""
        return self.prefix_bytes // self.k * self.demo_tokens

    def references(self) -> list[list[str] | None]:
        """Per query, its references (None where the query came without an expected answer)."""
        return [q.all_references if q.output else None for q in self.episode.queries]

    def rouge(self) -> dict[str, list[float | None]]:
        """Per method, per query, ROUGE-L (0..1, best over the references; None without references)."""
        refs = self.references()
        return {m: [rouge_l(a, r) if r else None for a, r in zip(ans, refs)] for m, ans in self.answers.items()}

    def mean_rouge(self) -> dict[str, float | None]:
        """Per method, ROUGE-L averaged over the queries that have references (None if none has)."""
        out = {}
        for m, scores in self.rouge().items():
            got = [s for s in scores if s is not None]
            out[m] = sum(got) / len(got) if got else None
        return out

    def summary(self) -> dict:
        """JSON-ready: answers, ROUGE-L, the prefix's shape and bytes, and what it replaced."""
        return {
            "task": self.episode.task,
            "queries": [q.input for q in self.episode.queries],
            "answers": self.answers,
            "rouge_l": self.mean_rouge(),
            "prefix_shape": list(self.prefix.keys.shape),
            "prefix_bytes": self.prefix_bytes,
            "prefix_seconds": round(self.prefix_seconds, 3),
            "demo_tokens": self.demo_tokens,
            "demo_kv_bytes": self.demo_kv_bytes,
            "demo_tokens_per_gist_token": self.demo_tokens / self.k,
        }


@torch.no_grad()
def compare(
    b,
    hyper,
    episode: Episode,
    multitask=None,
    other_prefixes: Mapping[str, Prefix] | None = None,
    methods: Sequence[str] | None = None,
) -> Comparison:
    """HyperLlama's prefix of `episode` (one pass, adapters on), then every method's greedy answers to its queries.

    b: the course's `Bundle` (tokenizer, format, budgets, `exp.eval.max_new_tokens` and `batch_size`); hyper: a
    HyperLlama over the frozen base, which also serves icl, definition_only and zero_shot (adapters off);
    multitask: the multitask-ICL model (`train_multitask_icl(b)[0].model`), or None to leave that method out;
    other_prefixes: more prefixes (one row each) read by the frozen base, e.g. {"wrong_task_prefix": another
    task's prefix}; methods: a subset of `METHODS` (default: all that can run)."""
    tok, fmt, d, ev = b.tokenizer, b.fmt, b.exp.data, b.exp.eval
    wanted = list(methods) if methods is not None else [m for m in METHODS if m != "multitask_icl" or multitask]
    unknown = set(wanted) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: choose from {METHODS}")
    if "multitask_icl" in wanted and multitask is None:
        raise ValueError("multitask_icl needs the multitask model: pass multitask=train_multitask_icl(b)[0].model")
    hyper.eval()
    t = time.perf_counter()
    hyper_method, prefix = hyper_prefix_method(hyper, [episode], b)  # adapters on: the hypernetwork's one pass
    seconds = time.perf_counter() - t
    k = prefix.num_virtual_tokens
    demo_tokens = round(compression(b, hyper.base, [episode], k)["mean_demo_tokens"])
    budget = d.max_hyper_tokens + d.max_tokens  # the runner's ICL budget: demos and query in one sequence
    answers: dict[str, list[str]] = {}
    with hyper.downstream_mode():  # the frozen base reads the prefixes and serves the baselines
        base = hyper.base
        build = {
            "hyperllama": lambda: hyper_method,
            "icl": lambda: icl(base, tok, fmt, budget),
            "multitask_icl": lambda: icl(multitask, tok, fmt, budget, name="multitask_icl"),
            "definition_only": lambda: definition_only(base, tok, fmt, budget),
            "zero_shot": lambda: zero_shot(base, tok, fmt),
        }
        chosen = [(m, build[m]) for m in wanted]
        chosen += [(name, lambda p=p, name=name: with_prefixes(name, base, p, tok, fmt))
                   for name, p in (other_prefixes or {}).items()]  # fmt: skip
        for name, make in chosen:
            answers[name] = greedy_answers(make(), episode, tok, fmt, ev.max_new_tokens, ev.batch_size)
    return Comparison(episode, answers, prefix, seconds, demo_tokens)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def describe_prefix(c: Comparison) -> str:
    """What the hypernetwork wrote and what it saved: the prefix's shape and bytes against the demos' K/V."""
    n, _, heads, k, hd = c.prefix.keys.shape
    dtype = str(c.prefix.keys.dtype).replace("torch.", "")
    demos = len(c.episode.demos)
    return "\n".join([
        f"HyperLlama read the definition and {demos} example{'s' * (demos != 1)} ({c.demo_tokens} tokens) in one "
        f"pass ({c.prefix_seconds:.2f} s) and wrote a prefix of k = {k} gist tokens:",
        f"  keys and values, each (layers, KV heads, gist tokens, head dim) = ({n}, {heads}, {k}, {hd}): "
        f"{c.prefix_bytes:,} bytes ({_mib(c.prefix_bytes)}, {dtype})",
        f"  compression: {c.demo_tokens / k:.1f} tokens of definition + demos per gist token; ICL keeps their keys "
        f"and values, {c.demo_kv_bytes:,} bytes ({_mib(c.demo_kv_bytes)}): the prefix is "
        f"{c.prefix_bytes / c.demo_kv_bytes:.2f}x of that",
    ])  # fmt: skip


def _short(text: str, width: int) -> str:
    return textwrap.shorten(text, width, placeholder=" ...") if text.strip() else "(empty)"


def describe_episode(episode: Episode, width: int = 100) -> str:
    """The definition and demos every method but zero-shot reads (HyperLlama: through its prefix)."""
    lines = [f"task {episode.task}"]
    if episode.definition:
        lines += ["definition:", *textwrap.wrap(episode.definition, width, initial_indent="  ", subsequent_indent="  ")]
    for i, d in enumerate(episode.demos, 1):
        lines.append(f"example {i}: {_short(d.input, width)}  {SEPARATOR}  {_short(d.output, width // 2)}")
    return "\n".join(lines)


def format_comparison(c: Comparison, width: int = 90) -> str:
    """The answers query by query (with the expected answer and ROUGE-L where there is one), then mean ROUGE-L."""
    rouge, refs = c.rouge(), c.references()
    label_width = max(len(LABELS.get(m, m)) for m in c.answers)
    lines = ["(the number before an answer: its ROUGE-L against the expected answer, 0 to 1)"] if any(refs) else []
    for i, q in enumerate(c.episode.queries):
        expected = f"   (expected: {_short(' | '.join(refs[i]), width // 2)})" if refs[i] else ""
        lines.append(f"{i + 1}. {_short(q.input, width)}{expected}")
        for m, ans in c.answers.items():
            score = f"{rouge[m][i]:.2f}  " if rouge[m][i] is not None else ""
            lines.append(f"   {LABELS.get(m, m):<{label_width}}  {score}{_short(ans[i], width)}")
    means = {m: v for m, v in c.mean_rouge().items() if v is not None}
    if means:
        lines.append("mean ROUGE-L: " + " | ".join(f"{LABELS.get(m, m)} {v:.2f}" for m, v in means.items()))
    return "\n".join(lines)


def english_widget(
    b,
    hyper,
    multitask=None,
    definition: str = "",
    examples: str = "",
    queries: str = "",
    first: Comparison | None = None,
):
    """Text boxes for a definition, examples (`input => output` per line) and queries, a menu of `EXAMPLE_TASKS`
    that fills them, and a button that prints `describe_prefix` and `format_comparison` of `compare(...)`.

    first: a comparison already computed for the initial text (shown instead of computing it again)."""
    import ipywidgets
    from IPython.display import display

    wide = ipywidgets.Layout(width="95%")
    menu = ipywidgets.Dropdown(options=["(your own)", *EXAMPLE_TASKS], value="(your own)", description="start from")
    definition_box = ipywidgets.Textarea(value=definition, description="definition", layout=wide)
    tall = ipywidgets.Layout(width="95%", height="110px")
    examples_box = ipywidgets.Textarea(value=examples, description="examples", layout=tall)
    queries_box = ipywidgets.Textarea(value=queries, description="queries", layout=tall)
    button = ipywidgets.Button(description="ask every method")
    out = ipywidgets.HTML()  # not an Output widget: see gistlib.course.widgets._interact

    def show(text: str) -> None:
        out.value = "<pre>" + html.escape(text) + "</pre>"

    def fill(change) -> None:
        if change["new"] in EXAMPLE_TASKS:
            definition_box.value, examples_box.value, queries_box.value = EXAMPLE_TASKS[change["new"]]

    def run(_=None) -> None:
        button.disabled = True  # one question at a time; enabled again once the answer is shown
        show("making the prefix and asking every method ...")
        try:
            episode = english_episode(definition_box.value, examples_box.value, queries_box.value)
            c = compare(b, hyper, episode, multitask)
            show(describe_prefix(c) + "\n\n" + format_comparison(c))
        except ValueError as e:  # the learner's typing (or a text over the token budget), not a bug: say what
            show(f"error: {e}")
        finally:
            button.disabled = False

    menu.observe(fill, names="value")
    button.on_click(run)
    box = ipywidgets.VBox([menu, definition_box, examples_box, queries_box, button, out])
    display(box)
    if first is not None:
        show(describe_prefix(first) + "\n\n" + format_comparison(first))
    else:
        run()
    return box
