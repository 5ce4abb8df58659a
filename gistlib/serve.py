"""Serving with gist prefixes: make each task's prefix once, keep it, answer many tasks in one batch.

A canonical prefix (`gistlib.core.prefix`) puts every task's gist keys at positions `0 ... k-1` and every
query token at `k, k+1, ...`, whatever the demos looked like. So a batch can hold rows of *different*
tasks: each row just gets its own prefix (`Prefix.rows`), and one forward pass per step serves them
all. (Gisting's reference code serves batch size 1; canonical prefixes remove that limit.)

    store = PrefixStore.from_hyper(hyper)                  # or PrefixStore.from_gist_model(model, gist_ids)
    store.add(["sort", "upper"], [ids_sort, ids_upper])    # `[BOS] demos G_1..G_k` rows -> one prefix per task
    store.save("prefixes.safetensors")                     # one file; JSON metadata in its header
    store.score_choices(["sort", "upper"], prompts, choices)    # rank classification, batched
    store.generate(["upper", "sort"], prompts, max_new_tokens=8)

Shapes: the store holds one `Prefix` (n_layers, T, H_kv, k, hd) for its T tasks, row `i` being task
`names[i]`. A query batch of B rows gathers (n_layers, B, H_kv, k, hd) from it.

Memory per task is `k * n_layers * 2 * H_kv * hd * bytes`: 16 gist tokens instead of the demos' hundreds.

Serving copies each batch's K/V once: `get(names, room)` gathers the rows with one `index_select` per tensor
straight into buffers that leave `room` slots after the prefix (`LaidOutPrefix`), and the cache made from them
(`BufferLayer`) writes every new token in place, so no call concatenates K/V (transformers' `DynamicCache`
concatenates per layer and per step). On the CPU, sdpa runs grouped-query attention on the H_kv heads itself
(`sdpa_gqa`) instead of repeating K/V to the query heads. A prompt cache (the demos' n-token K/V, positions
0..n-1) is served by the very same path: a store of caches is a store of n-token prefixes.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from gistlib.core.prefix import Prefix, extract_prefix, forward_with_prefix
from gistlib.data.render import collate
from gistlib.train.evaluate import generate_ids, score_choice_ids

__all__ = [
    "BufferLayer",
    "LaidOutPrefix",
    "PrefixMaker",
    "PrefixStore",
    "UnknownTaskError",
    "read_store_metadata",
    "sdpa_gqa",
]

# (input_ids (T, L), attention_mask (T, L)) of `[BOS] demos G_1..G_k` rows -> Prefix (n, T, H_kv, k, hd)
PrefixMaker = Callable[[torch.Tensor, torch.Tensor], Prefix]

_META_KEY = "gistlib.prefix_store"  # safetensors header entry holding our JSON metadata
_FORMAT_VERSION = 1


class BufferLayer(DynamicLayer):
    """One layer's cache in a buffer with room after the prefix: new K/V are written in place, not concatenated.

    keys, values: (B, H_kv, capacity, hd) buffers whose first `length` slots hold the prefix. `update` writes the
    new (B, H_kv, L, hd) states after them and returns views of the filled part; a full buffer doubles (rare:
    give enough room).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._buffers = (keys, values)
        self.length = length
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        kb, vb = self._buffers
        if end > kb.shape[2]:  # grow: one copy, then room for as many again
            grown = [b.new_empty(*b.shape[:2], 2 * end, b.shape[-1]) for b in (kb, vb)]
            for new, old in zip(grown, (kb, vb)):
                new[:, :, : self.length] = old[:, :, : self.length]
            kb, vb = self._buffers = tuple(grown)
        kb[:, :, self.length : end] = key_states
        vb[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class LaidOutPrefix(Prefix):
    """A Prefix (n, B, H_kv, k, hd) that sits at the start of buffers (n, B, H_kv, k + room, hd).

    `to_cache` hands those buffers to `BufferLayer`s, so the downstream pass appends its tokens without copying
    the prefix again. A cache grows in place: a second `to_cache` lays out a fresh copy.
    """

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, k: int):
        super().__init__(key_buffer[:, :, :, :k], value_buffer[:, :, :, :k])
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = (key_buffer, value_buffer)

    def to_cache(self, config=None) -> Cache:
        kb, vb = self._buffers if self._buffers is not None else (self.keys.clone(), self.values.clone())
        self._buffers = None
        k = self.num_virtual_tokens
        return Cache(layers=[BufferLayer(kb[i], vb[i], k) for i in range(self.num_layers)])


@contextlib.contextmanager
def sdpa_gqa(device: torch.device):
    """On the CPU, let transformers' sdpa run grouped-query attention on the H_kv heads (`enable_gqa`).

    transformers repeats K/V to the query heads whenever a mask is given (CUDA's masked GQA falls back to the
    math kernel); torch's CPU kernels take a mask with `enable_gqa` (same result, no copy). It sets
    transformers' own switch `TRANSFORMERS_SDPA_FORCE_GQA` for the duration of the call; elsewhere a no-op.
    """
    if device.type != "cpu":
        yield
        return
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    old = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class UnknownTaskError(KeyError):
    """A query named a task the store holds no prefix for."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class PrefixStore:
    """Task name -> canonical prefix, plus batched multi-task scoring and generation over them.

    model: the downstream model the prefixes are for (frozen Llama; a HyperLlama's `base`).
    make_prefix: turns padded `[BOS] demos G_1..G_k` rows into prefixes (None: the store only loads/serves).
    downstream: a context-manager factory entered around every downstream call (HyperLlama: adapters off).
    pad_token_id: used to pad query batches (any id: padded positions are masked).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        make_prefix: PrefixMaker | None = None,
        downstream: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        pad_token_id: int = 0,
    ):
        self.model = model
        self.make_prefix = make_prefix
        self.downstream = downstream
        self.pad_token_id = pad_token_id
        self._row: dict[str, int] = {}  # task name -> row of the store
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values (n, capacity, H_kv, k, hd)

    @property
    def _all(self) -> Prefix | None:
        """Every held prefix, (n, T, H_kv, k, hd): views of the store, laid out once (capacity doubles as it fills)."""
        if self._kv is None:
            return None
        T = len(self._row)
        return Prefix(self._kv[0][:, :T], self._kv[1][:, :T])

    @classmethod
    def from_hyper(cls, hyper, pad_token_id: int = 0) -> PrefixStore:
        """Prefixes from a `HyperLlama`'s hypernetwork; served by its base with the adapters off."""
        return cls(hyper.base, hyper.make_prefix, hyper.downstream_mode, pad_token_id)

    @classmethod
    def from_gist_model(
        cls, model: PreTrainedModel, gist_token_ids: Sequence[int], pad_token_id: int = 0
    ) -> PrefixStore:
        """Prefixes read off a gisting (or plain base) model with `extract_prefix`; served by the same model."""
        ids = list(gist_token_ids)
        return cls(model, lambda input_ids, am: extract_prefix(model, input_ids, am, ids), pad_token_id=pad_token_id)

    # --- holding prefixes -----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Task names in row order."""
        return sorted(self._row, key=self._row.get)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, name: object) -> bool:
        return name in self._row

    def nbytes(self) -> int:
        """Bytes held by all stored keys and values."""
        return 0 if self._all is None else self._all.nbytes()

    @torch.no_grad()
    def add(self, names: Sequence[str], hyper_inputs: Sequence[Sequence[int]], batch_size: int = 16) -> None:
        """Make and keep one prefix per task from its hypernetwork input ids (`render_hyper_input`).

        Rows are left-padded and run `batch_size` at a time; a name already held is replaced.
        """
        if self.make_prefix is None:
            raise RuntimeError(
                "this store has no `make_prefix`: build it with PrefixStore.from_hyper / "
                "from_gist_model, or add ready prefixes with `put`"
            )
        names, hyper_inputs = list(names), list(hyper_inputs)
        if len(names) != len(hyper_inputs):
            raise ValueError(f"{len(names)} task names but {len(hyper_inputs)} hypernetwork inputs")
        device = self._device()
        for s in range(0, len(names), batch_size):
            batch = collate([list(r) for r in hyper_inputs[s : s + batch_size]], self.pad_token_id, "left")
            prefix = self.make_prefix(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            self.put(names[s : s + batch_size], prefix.detach())

    def put(self, names: str | Sequence[str], prefix: Prefix) -> None:
        """Keep ready prefixes: row `i` of `prefix` (n, T, H_kv, k, hd) under `names[i]`."""
        names = [names] if isinstance(names, str) else list(names)
        if prefix.batch_size != len(names):
            raise ValueError(f"{len(names)} names for a prefix batch of {prefix.batch_size} rows")
        if len(set(names)) != len(names):
            raise ValueError("task names in one call must be distinct")
        prefix = prefix.detach()
        if self._all is not None and _shape(self._all) != _shape(prefix) | {"dtype": _shape(self._all)["dtype"]}:
            raise ValueError(
                f"prefix shape {_shape(prefix)} does not match the store's {_shape(self._all)} "
                "(every task needs the same layers, kv heads, k and head dim)"
            )
        prefix = prefix.to(self._all.keys) if self._all is not None else prefix
        new = [n for n in names if n not in self._row]
        self._reserve(len(self._row) + len(new), prefix)
        start = len(self._row)
        self._row.update({n: start + j for j, n in enumerate(new)})
        rows = torch.tensor([self._row[n] for n in names], device=prefix.keys.device)
        self._kv[0].index_copy_(1, rows, prefix.keys)  # new rows and replaced ones, in place
        self._kv[1].index_copy_(1, rows, prefix.values)

    def _reserve(self, rows: int, like: Prefix) -> None:
        """Make room for `rows` tasks (capacity doubles, so adding tasks one by one copies O(T) in all)."""
        have = 0 if self._kv is None else self._kv[0].shape[1]
        if rows <= have:
            return
        n, _, h, k, hd = like.keys.shape
        grown = tuple(like.keys.new_zeros(n, max(rows, 2 * have), h, k, hd) for _ in range(2))
        if self._kv is not None:
            T = len(self._row)
            for new, old in zip(grown, self._kv):
                new[:, :T] = old[:, :T]
        self._kv = grown

    def get(self, names: str | Sequence[str], room: int = 0) -> LaidOutPrefix:
        """The prefixes of `names`, in that order (repeats allowed): (n, len(names), H_kv, k, hd).

        Gathered with one `index_select` per tensor into buffers with `room` free slots after the prefix, where
        a downstream pass of up to `room` tokens writes its K/V (`LaidOutPrefix.to_cache`).
        """
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self._row]
        if missing:
            raise UnknownTaskError(self._unknown_message(missing[0]))
        keys, values = self._kv
        rows = torch.tensor([self._row[n] for n in names], device=keys.device)
        n, _, h, k, hd = keys.shape
        buffers = [keys.new_empty(n, len(names), h, k + room, hd) for _ in range(2)]
        for src, buf in zip((keys, values), buffers):
            torch.index_select(src, 1, rows, out=buf[:, :, :, :k])
        return LaidOutPrefix(*buffers, k)

    @torch.no_grad()
    def forward(self, tasks: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        """The downstream model on (B, L) rows, row `i` after task `tasks[i]`'s prefix; returns its output.

        Tokens run at positions k, k+1, ... (`forward_with_prefix`) over K/V laid out once (`get`), with
        grouped-query attention on the kv heads where sdpa allows it (`sdpa_gqa`). `.logits`: (B, L, V).
        """
        prefix = self.get(list(tasks), room=input_ids.shape[1])
        with self.downstream(), sdpa_gqa(input_ids.device):
            return forward_with_prefix(self.model, prefix, input_ids, attention_mask, **kwargs)

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._row), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        if not self._row:
            return f"unknown task {name!r}: the store is empty (add prefixes with `add`, `put` or `load`)"
        return f"unknown task {name!r}: the store holds {len(self._row)} tasks{hint}"

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- disk --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> Path:
        """Write every prefix to one safetensors file, atomically (a temporary file, then a rename).

        Tensors `keys`, `values`: (n, T, H_kv, k, hd). The header's metadata holds JSON with the task
        names in row order, the shapes, and `meta` (anything JSON-serialisable, e.g. which checkpoint).
        """
        if self._all is None:
            raise ValueError("nothing to save: the store is empty")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"version": _FORMAT_VERSION, "tasks": self.names, **_shape(self._all), "meta": meta or {}}
        tensors = {
            "keys": self._all.keys.detach().cpu().contiguous(),
            "values": self._all.values.detach().cpu().contiguous(),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(info)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, path: str | os.PathLike) -> dict:
        """Add every prefix saved in `path` (same names are replaced); returns the file's metadata.

        Checks the prefixes fit this store's model (number of layers, kv heads, head dim).
        """
        info = read_store_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            prefix = Prefix(f.get_tensor("keys"), f.get_tensor("values"))
        if prefix.batch_size != len(info["tasks"]):
            raise ValueError(f"{path}: {len(info['tasks'])} task names for {prefix.batch_size} prefixes")
        self._check_fits_model(prefix, path)
        self.put(info["tasks"], prefix.to(self._device()))
        return info

    def _check_fits_model(self, prefix: Prefix, where) -> None:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        want = {"num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads, "head_dim": head_dim}
        got = {key: _shape(prefix)[key] for key in want}
        if got != want:
            raise ValueError(f"{where}: prefixes shaped {got} do not fit this model {want}")

    # --- serving -----------------------------------------------------------------------------

    @torch.no_grad()
    def score_choices(
        self,
        tasks: Sequence[str],
        prompts: Sequence[Sequence[int]],
        choices: Sequence[Sequence[Sequence[int]]],
        batch_size: int = 64,
    ) -> list[torch.Tensor]:
        """Rank classification: log-likelihood of every answer choice of every query.

        tasks[i] names query i's task; prompts[i] is its `[BOS] query-part` ids (`render_downstream_prompt`);
        choices[i] its candidate answers' ids (`choice_ids`, EOS included). All (query, choice) pairs of
        all tasks are flattened into rows `prompt + choice`, sorted by length and run `batch_size` rows
        per forward, each row after its own task's prefix. Returns, per query, a (C_i,) float tensor of
        summed log-probabilities of the choice tokens (argmax = the prediction).
        """
        tasks, prompts, choices = list(tasks), list(prompts), list(choices)
        if not len(tasks) == len(prompts) == len(choices):
            raise ValueError(f"got {len(tasks)} tasks, {len(prompts)} prompts, {len(choices)} choice lists")
        if not tasks:
            return []
        self.get(list(dict.fromkeys(tasks)))  # fail early, naming the unknown task

        def run(owners: torch.Tensor, batch: dict, keep: int) -> torch.Tensor:
            names = [tasks[int(q)] for q in owners]
            return self.forward(names, batch["input_ids"], batch["attention_mask"], logits_to_keep=keep).logits

        owners = list(range(len(tasks)))
        return score_choice_ids(run, owners, prompts, choices, self.pad_token_id, batch_size, self._device())

    @torch.no_grad()
    def generate(
        self,
        tasks: Sequence[str],
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_token_id: int | None = None,
        batch_size: int = 64,
    ) -> list[list[int]]:
        """Greedy answers, each query after its own task's prefix, `batch_size` queries per batch.

        Returns the new token ids of each query (cut after EOS), in the order given.
        """
        tasks, prompts = list(tasks), list(prompts)
        if len(tasks) != len(prompts):
            raise ValueError(f"got {len(tasks)} tasks but {len(prompts)} prompts")
        if not tasks:
            return []
        self.get(list(dict.fromkeys(tasks)))
        room = max(len(p) for p in prompts) + max_new_tokens  # every token of a call fits after the prefix
        with self.downstream(), sdpa_gqa(self._device()):
            return generate_ids(
                self.model, lambda owners: self.get([tasks[i] for i in owners], room), list(range(len(tasks))),
                prompts, max_new_tokens, eos_token_id, self.pad_token_id, batch_size, self._device(),
            )  # fmt: skip


def _shape(prefix: Prefix) -> dict:
    n, _, h, k, hd = prefix.keys.shape
    return {
        "num_layers": n,
        "num_kv_heads": h,
        "num_virtual_tokens": k,
        "head_dim": hd,
        "dtype": str(prefix.keys.dtype).removeprefix("torch."),
    }


def read_store_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a file written by `PrefixStore.save` (task names, shapes, user `meta`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no prefix store at {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a gistlib prefix store (no {_META_KEY!r} metadata)")
    info = json.loads(raw)
    if info.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path}: prefix store format version {info.get('version')}, this gistlib reads {_FORMAT_VERSION}"
        )
    return info
