"""HyperLlama: a gisting-based hypernetwork over a shared, frozen Llama.

One base model plays two roles (Phang 2024, DESIGN.md section 3):

    hypernetwork = base + LoRA (all 7 linear maps, r=8, alpha=16) + k trainable gist embeddings
                   reads   [BOS] demo_1 ... demo_n G_1 ... G_k
                   emits   keys/values of G_1..G_k in every layer  -> prefix head -> canonical Prefix
    downstream   = the same base with the adapters switched off
                   reads   [Prefix] [BOS] \\nInput:\\n x \\nOutput:\\n y [EOS], loss on y and EOS

Gradients flow from the downstream loss through the frozen base into the prefix, and from there
into the LoRA weights, the gist embeddings and the prefix head. Nothing else changes.

The gist embeddings live in their own small table (k, d): the vocabulary embedding stays frozen and
need not even contain the gist ids. Training passes prefix and gist capture through attention kwargs
(`gistlib.core.attention`), so it works with gradient checkpointing (which turns the KV cache off);
inference can use the cache path of `gistlib.core.prefix` as well, and tests show both agree.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from gistlib.config import check_fields
from gistlib.core.attention import use_gistlib_attention
from gistlib.core.distill import hidden_cosine_loss, teacher_hidden_states
from gistlib.core.prefix import (
    Prefix,
    canonical_prefix,
    forward_with_mask,
    generate_with_prefix,
    gist_positions,
    lora_layers,
    lora_switched_off,
    peft_wrap,
    positions_from_mask,
    prefix_pass,
    prefixed_causal_mask,
    rows_in_order,
    trimmed_groups,
)
from gistlib.core.scoring import sequence_logprobs, token_loss

__all__ = ["HyperConfig", "PrefixHead", "HyperLlama"]

LINEAR_MAPS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class HyperConfig:
    """What makes a base model a HyperLlama. Defaults follow the paper."""

    num_gist_tokens: int = 16  # k: prefix length
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LINEAR_MAPS  # LoRA on every linear map of every layer
    prefix_head: str = "identity"  # identity (paper) | linear | mlp, both residual and zero-initialised
    gist_init: str = (
        "random_tokens"  # random_tokens: copies of k real token embeddings | gist_tokens: rows of the gist ids
    )
    distill_weight: float = 1.0  # weight of ICL distillation where batches carry teacher rows (gistlib.core.distill)
    seed: int = 0

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        checks = {
            "num_gist_tokens": self.num_gist_tokens >= 1,
            "lora_rank": self.lora_rank >= 1,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0.0 <= self.lora_dropout < 1.0,
            "prefix_head": self.prefix_head in ("identity", "linear", "mlp"),
            "gist_init": self.gist_init in ("random_tokens", "gist_tokens"),
            "target_modules": len(self.target_modules) > 0,
            "distill_weight": self.distill_weight >= 0,
        }
        check_fields(self, checks)


class PrefixHead(nn.Module):
    """Maps each gist token's key (and value) vector, per layer, to the prefix's.

    identity: no parameters (the paper's choice). linear: x + W x + b. mlp: x + W2 gelu(W1 x).
    W, W2 start at zero, so every head starts as the identity. One map for keys and one for values,
    shared across layers, over the flattened (H_kv * hd) vector. keys, values: (n, B, H, k, hd).
    """

    def __init__(self, kind: str, num_kv_heads: int, head_dim: int, hidden: int | None = None):
        super().__init__()
        self.kind = kind
        dim = num_kv_heads * head_dim
        if kind == "identity":
            self.key_map = self.value_map = None
            return
        if kind == "linear":
            make = lambda: nn.Linear(dim, dim)  # noqa: E731
        else:
            hid = hidden or max(16, dim // 4)
            make = lambda: nn.Sequential(nn.Linear(dim, hid), nn.GELU(), nn.Linear(hid, dim))  # noqa: E731
        self.key_map, self.value_map = make(), make()
        for m in (self.key_map, self.value_map):
            last = m if isinstance(m, nn.Linear) else m[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _map(self, x: torch.Tensor, fn: nn.Module) -> torch.Tensor:
        n, B, H, k, hd = x.shape
        flat = x.permute(0, 1, 3, 2, 4).reshape(n, B, k, H * hd)  # (n, B, k, H*hd)
        w_dtype = next(fn.parameters()).dtype
        flat = flat + fn(flat.to(w_dtype)).to(flat.dtype)
        return flat.reshape(n, B, k, H, hd).permute(0, 1, 3, 2, 4)

    def forward(self, prefix: Prefix) -> Prefix:
        if self.kind == "identity":
            return prefix
        return Prefix(self._map(prefix.keys, self.key_map), self._map(prefix.values, self.value_map))


class HyperLlama(nn.Module):
    """The hypernetwork and the downstream model over one frozen base.

    base: any Llama-architecture causal LM (float or 4-bit); it is frozen and wrapped by PEFT in place.
    gist_token_ids: the k token ids that mark gist positions in hypernetwork inputs (`<GIST_0>`...);
    they are looked up in `self.gist_embeddings`, never in the vocabulary.
    """

    def __init__(self, base: PreTrainedModel, gist_token_ids: list[int], config: HyperConfig | None = None):
        super().__init__()
        self.config = config or HyperConfig(num_gist_tokens=len(gist_token_ids))
        if len(gist_token_ids) != self.config.num_gist_tokens:
            raise ValueError(
                f"got {len(gist_token_ids)} gist token ids for HyperConfig.num_gist_tokens = "
                f"{self.config.num_gist_tokens}: pass exactly one id per gist token"
            )
        for p in base.parameters():
            p.requires_grad_(False)
        use_gistlib_attention(base)
        embed = base.get_input_embeddings()
        self.register_buffer("gist_ids", torch.tensor(gist_token_ids, dtype=torch.long), persistent=False)
        self.gist_embeddings = nn.Parameter(self._init_gist_embeddings(embed.weight, gist_token_ids))  # (k, d)
        lora = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(self.config.target_modules),
            bias="none",
        )
        cfg = base.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        with torch.random.fork_rng(devices=[]):  # LoRA and head init: the same for the same seed
            torch.manual_seed(self.config.seed)
            self.peft: PeftModel = peft_wrap(base, lora)
            self.prefix_head = PrefixHead(self.config.prefix_head, cfg.num_key_value_heads, head_dim)
        self.prefix_head.to(embed.weight.device)
        self.merge_lora_for_inference = True  # make_prefix without gradients runs on merged weights (`merged_lora`)
        self._merged: tuple | None = None  # (LoRA version, LoRA layers, their merged weights)
        self._lora_found: list | None = None  # the LoRA layers, found on first use

    def _init_gist_embeddings(self, vocab: torch.Tensor, gist_token_ids: list[int]) -> torch.Tensor:
        """(k, d) float32 copies of existing embeddings (k random real tokens, or the gist ids' rows)."""
        k = self.config.num_gist_tokens
        if self.config.gist_init == "gist_tokens":
            if max(gist_token_ids) >= vocab.shape[0]:
                raise ValueError(
                    "gist_init='gist_tokens' needs the gist ids inside the vocabulary embedding; "
                    "use gist_init='random_tokens' or resize the embeddings"
                )
            rows = torch.tensor(gist_token_ids)
        else:
            g = torch.Generator().manual_seed(self.config.seed)
            rows = torch.randperm(vocab.shape[0], generator=g)[:k]
        return vocab.detach()[rows.to(vocab.device)].float().clone()

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def base(self) -> PreTrainedModel:
        """The wrapped transformers model (LoRA layers inside; switch them off with `downstream_mode`)."""
        return self.peft.get_base_model()

    @property
    def adapters_off(self) -> bool:
        """True inside `downstream_mode()` (every LoRA layer disabled)."""
        layers = self._lora_layers()
        return bool(layers) and all(m.disable_adapters for m in layers)

    def downstream_mode(self):
        """Context manager: inside it, the base runs without adapters (the downstream model); nests.

        The LoRA layers are found once and switched directly (`lora_switched_off`), not through PEFT's
        `disable_adapter()`, which walks the whole model twice per call."""
        return lora_switched_off(self._lora_layers())

    def hyper_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, d) with gist positions taken from the trainable gist table."""
        match = input_ids[..., None] == self.gist_ids  # (B, L, k)
        is_gist = match.any(-1)
        safe_ids = torch.where(is_gist, 0, input_ids)  # gist ids need not exist in the vocabulary
        embeds = self.base.get_input_embeddings()(safe_ids)
        gist = match.to(self.gist_embeddings.dtype) @ self.gist_embeddings  # (B, L, d)
        return torch.where(is_gist[..., None], gist.to(embeds.dtype), embeds)

    # --- the two roles ---------------------------------------------------------------------------

    def make_prefix(self, hyper_input_ids: torch.Tensor, hyper_attention_mask: torch.Tensor) -> Prefix:
        """Canonical prefixes (n, B, H_kv, k, hd) for a batch of `[BOS] demos G_1..G_k` rows.

        One hypernetwork pass (adapters on); gist keys are captured inside attention at their
        absolute positions, re-rotated to 0..k-1, then passed through the prefix head. Raises inside
        `downstream_mode()`: there the adapters are off and the pass would be the frozen base's, not the hypernetwork's.
        A batch whose lengths differ a lot runs as two passes, rows of similar length together (`trimmed_groups`:
        less padding). The gists come last, so unpadded rows take sdpa's fast causal path (`prefix_pass`); without
        gradients (inference) the pass runs on LoRA-merged weights (`merged_lora`), with them on the unmerged ones.
        """
        if self.adapters_off:
            raise RuntimeError(
                "HyperLlama.make_prefix inside downstream_mode(): the adapters are off, so this would be the frozen "
                "base's pass; make the prefix first, then score or generate inside downstream_mode()"
            )
        groups = trimmed_groups(hyper_attention_mask)
        if not groups:
            return self._prefix_pass(hyper_input_ids, hyper_attention_mask)
        ids, mask = hyper_input_ids, hyper_attention_mask
        parts = [self._prefix_pass(ids[rows, cols], mask[rows, cols]) for rows, cols in groups]
        return Prefix.cat(parts).rows(rows_in_order(groups))

    def _prefix_pass(self, hyper_input_ids: torch.Tensor, hyper_attention_mask: torch.Tensor) -> Prefix:
        """`make_prefix` in one hypernetwork pass over the whole batch (B, Lh)."""
        gist_ids = self.gist_ids.tolist()
        positions = positions_from_mask(hyper_attention_mask)
        index = gist_positions(hyper_input_ids, gist_ids, hyper_attention_mask)  # (B, k)
        store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        merge = self.merge_lora_for_inference and not torch.is_grad_enabled() and self._lora_mergeable()
        if torch.is_grad_enabled():
            self._merged = None  # training: free the merged copy (it goes stale with the next step anyway)
        with self.merged_lora() if merge else contextlib.nullcontext():
            prefix_pass(
                self.peft,
                hyper_input_ids,
                hyper_attention_mask,
                gist_ids,
                index,
                positions,
                inputs_embeds=self.hyper_embeddings(hyper_input_ids),
                gist_capture=(store, index),
                use_cache=False,
                logits_to_keep=1,
            )
        keys = torch.stack([store[i][0] for i in range(len(store))])  # (n, B, H, k, hd)
        values = torch.stack([store[i][1] for i in range(len(store))])
        offset = positions.gather(1, index[:, :1]).squeeze(1)  # (B,) position of G_1
        return self.prefix_head(canonical_prefix(self.base, keys, values, offset))

    # --- LoRA merged for inference ---------------------------------------------------------------

    def _lora_layers(self) -> list:
        """Every LoRA layer, found once."""
        if self._lora_found is None:
            self._lora_found = lora_layers(self.peft)
        return self._lora_found

    def _lora_mergeable(self) -> bool:
        """Merging needs plain float linear maps (not 4-bit ones), no DoRA, and no dropout that is active."""
        if self.training and self.config.lora_dropout > 0:
            return False
        return all(
            type(m.get_base_layer()) is nn.Linear and not m.use_dora.get("default", False) for m in self._lora_layers()
        )

    def _lora_version(self) -> tuple:
        """Changes whenever a LoRA weight does (in-place optimiser steps and loads bump `_version`)."""
        params = [lin.weight for m in self._lora_layers() for branch in (m.lora_A, m.lora_B) for lin in branch.values()]
        return tuple((p.data_ptr(), p._version) for p in params)

    @contextlib.contextmanager
    def merged_lora(self):
        """Context manager: the base's linear maps hold W + (alpha / r) B A and the LoRA branches are off.

        The merged weights are separate tensors, made once and kept until a LoRA weight changes; the base's
        own weight tensors are only swapped out and back, never written, so they stay bit-identical.
        Costs one extra copy of the adapted linear weights while kept (`merge_lora_for_inference = False`:
        never merge). Equal to the unmerged hypernetwork within float32 rounding (tested). The branches are
        switched off as in `downstream_mode`.
        """
        version = self._lora_version()
        if self._merged is None or self._merged[0] != version:
            layers = self._lora_layers()
            with torch.no_grad():
                weights = [m.get_base_layer().weight + m.get_delta_weight("default") for m in layers]
            self._merged = (version, layers, [nn.Parameter(w, requires_grad=False) for w in weights])
        _, layers, merged = self._merged
        bases = [m.get_base_layer() for m in layers]
        originals = [b._parameters["weight"] for b in bases]
        try:
            for b, w in zip(bases, merged):
                b._parameters["weight"] = w
            with self.downstream_mode():  # the branches off: the merged weights alone
                yield
        finally:
            for b, w in zip(bases, originals):
                b._parameters["weight"] = w

    def downstream_logits(self, prefix: Prefix, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) of the frozen downstream model on tokens after `prefix` (positions k...)."""
        return self._downstream(prefix, input_ids, attention_mask).logits

    def _downstream(self, prefix: Prefix, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False):
        """The frozen downstream model's output on tokens after `prefix`; `hidden`: with every layer's states."""
        k = prefix.num_virtual_tokens
        past = torch.ones(input_ids.shape[0], k, dtype=torch.bool, device=input_ids.device)
        with self.downstream_mode():
            return forward_with_mask(
                self.peft,
                prefixed_causal_mask(past, attention_mask),
                positions_from_mask(attention_mask, start=k),
                input_ids=input_ids,
                gist_prefix=(prefix.keys, prefix.values),
                use_cache=False,
                output_hidden_states=hidden,
            )

    def _objective(
        self,
        prefix: Prefix,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        icl_input_ids: torch.Tensor | None,
        icl_attention_mask: torch.Tensor | None,
        icl_rows: torch.Tensor | None,
        distill_weight: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, language-modelling loss). Without teacher rows the two are the same.

        prefix: one per downstream row. icl_*: (R, Lt) teacher rows `[BOS] demos x y`, right padded;
        icl_rows (R,) says which downstream row each one teaches (see `gistlib.core.distill`).
        """
        teach = icl_input_ids is not None and distill_weight > 0
        out = self._downstream(prefix, input_ids, attention_mask, hidden=teach)
        lm = token_loss(out.logits, labels)
        if not teach:
            return lm, lm
        rows = torch.arange(len(icl_input_ids), device=input_ids.device) if icl_rows is None else icl_rows
        with self.downstream_mode():
            teacher = teacher_hidden_states(self.peft, icl_input_ids, icl_attention_mask)
        student = [h[rows] for h in out.hidden_states[1:]]
        aux = hidden_cosine_loss(student, teacher, attention_mask[rows], icl_attention_mask)
        return lm + distill_weight * aux, lm

    def forward(
        self,
        hyper_input_ids: torch.Tensor,
        hyper_attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        task_index: torch.Tensor | None = None,
        icl_input_ids: torch.Tensor | None = None,
        icl_attention_mask: torch.Tensor | None = None,
        icl_rows: torch.Tensor | None = None,
        distill_weight: float | None = None,
    ) -> torch.Tensor:
        """Loss on the downstream output tokens, ready for `.backward()` (without checkpointing).

        hyper_*: (T, Lh), one row per task. input_ids, attention_mask, labels: (B, L) downstream rows;
        `task_index` (B,) says which task row each downstream row belongs to (default: row b -> task b).
        icl_*: optional teacher rows (R, Lt) for ICL distillation, `icl_rows` (R,) their downstream rows;
        the loss is then LM + distill_weight * distill (`gistlib.core.distill`; None: `config.distill_weight`).
        With gradient checkpointing on, use `loss_and_backward` (see there why).
        """
        if self.base.is_activation_checkpointing and self.training and torch.is_grad_enabled():
            raise RuntimeError(
                "with gradient checkpointing on, call HyperLlama.loss_and_backward(...): the "
                "backward pass replays each layer, and must replay the downstream with adapters off"
            )
        prefix = self.make_prefix(hyper_input_ids, hyper_attention_mask)
        if task_index is not None:
            prefix = prefix.rows(task_index)
        weight = self.config.distill_weight if distill_weight is None else distill_weight
        teacher = (icl_input_ids, icl_attention_mask, icl_rows, weight)
        return self._objective(prefix, input_ids, attention_mask, labels, *teacher)[0]

    def loss_and_backward(
        self,
        hyper_input_ids: torch.Tensor,
        hyper_attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        task_index: torch.Tensor | None = None,
        loss_scale: float = 1.0,
        icl_input_ids: torch.Tensor | None = None,
        icl_attention_mask: torch.Tensor | None = None,
        icl_rows: torch.Tensor | None = None,
        distill_weight: float | None = None,
    ) -> torch.Tensor:
        """Forward and backward in two phases; returns the (unscaled, detached) language-modelling loss.

        Gradient checkpointing recomputes each layer during backward, *after* `downstream_mode()`
        has exited, so a single backward would replay the downstream with the adapters on. Instead:
        (1) build the prefix, cut the graph there; (2) downstream forward + backward with adapters
        off, giving d loss / d prefix; (3) backward from the prefix into LoRA, gist table and head with
        adapters on. Gradients equal those of `forward(...).backward()` (tested); works with or
        without checkpointing. `loss_scale` multiplies the gradients (e.g. 1 / accumulation steps).
        The teacher arguments are `forward`'s; the returned loss leaves the distillation term out, so
        curves stay comparable with and without it.
        """
        prefix = self.make_prefix(hyper_input_ids, hyper_attention_mask)
        leaf_k = prefix.keys.detach().requires_grad_(True)
        leaf_v = prefix.values.detach().requires_grad_(True)
        cut = Prefix(leaf_k, leaf_v)
        if task_index is not None:
            cut = cut.rows(task_index)
        weight = self.config.distill_weight if distill_weight is None else distill_weight
        teacher = (icl_input_ids, icl_attention_mask, icl_rows, weight)
        with self.downstream_mode():
            total, lm = self._objective(cut, input_ids, attention_mask, labels, *teacher)
            (total * loss_scale).backward()
        torch.autograd.backward([prefix.keys, prefix.values], [leaf_k.grad, leaf_v.grad])
        return lm.detach()

    # --- using prefixes --------------------------------------------------------------------------

    @torch.no_grad()
    def score(
        self, prefix: Prefix, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood of the labelled tokens per row (B,) and their count (B,), for rank classification."""
        return sequence_logprobs(self.downstream_logits(prefix, input_ids, attention_mask), labels)

    @torch.no_grad()
    def generate(
        self,
        prefix: Prefix,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> list[list[int]]:
        """Greedy answers of the downstream model, each row after its own prefix (cache path)."""
        with self.downstream_mode():
            return generate_with_prefix(
                self.base, prefix, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id
            )

    # --- what trains, and saving it --------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name: LoRA weights, gist embeddings, prefix head."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """LoRA adapter in PEFT's format, gist embeddings and prefix head in safetensors, config JSON.

        The base model is not saved: `from_pretrained` takes it (frozen weights never change).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.peft.save_pretrained(path / "adapter")
        extra = {"gist_embeddings": self.gist_embeddings.detach().contiguous()}
        extra.update({f"prefix_head.{k}": v.detach().contiguous() for k, v in self.prefix_head.state_dict().items()})
        save_file(extra, path / "hyper.safetensors")
        meta = {"config": asdict(self.config), "gist_token_ids": self.gist_ids.tolist()}
        (path / "hyper_config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, base: PreTrainedModel, path: str | os.PathLike) -> HyperLlama:
        """Rebuild a saved HyperLlama over `base` (the same base it was trained on)."""
        path = Path(path)
        if not (path / "hyper_config.json").exists():
            raise FileNotFoundError(
                f"{path} holds no HyperLlama (no hyper_config.json): "
                "point to a folder written by HyperLlama.save_pretrained"
            )
        meta = json.loads((path / "hyper_config.json").read_text())
        model = cls(base, meta["gist_token_ids"], HyperConfig(**meta["config"]))
        model.load_trainable(path)
        return model

    def load_trainable(self, path: str | os.PathLike) -> None:
        """Load adapter, gist embeddings and prefix head saved by `save_pretrained` into this model."""
        from peft import set_peft_model_state_dict

        path = Path(path)
        adapter = load_file(path / "adapter" / "adapter_model.safetensors")
        result = set_peft_model_state_dict(self.peft, adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter in {path} does not fit this model: unexpected {result.unexpected_keys[:3]}")
        extra = load_file(path / "hyper.safetensors")
        with torch.no_grad():
            self.gist_embeddings.copy_(extra.pop("gist_embeddings"))
        head = {k.removeprefix("prefix_head."): v for k, v in extra.items()}
        self.prefix_head.load_state_dict(head)
