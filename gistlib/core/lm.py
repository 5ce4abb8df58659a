"""A whole causal LM as a trainee of `gistlib.train.loop`: the pocket base (causal mask) and Gisting (gist mask).

A trainee trains every weight, or (with `lora_rank`) only a LoRA on every linear map over a frozen base:
the paper's multi-task baseline with full attention over the demos (`multitask_icl`), and Gisting on a
4-bit base, whose weights cannot be trained.

Gisting (Mu et al. 2023) is the single-model special case of HyperLlama: one sequence
`[BOS] demos G_1..G_k query answer` under the gist mask, every weight trained, so the model learns to
compress the demos into the gist tokens' activations. The pocket base is the same model trained
under the plain causal mask on `[BOS] demos query answer`: a multi-task in-context learner.

With `distill_weight` > 0 Gisting also gets HyperLlama's ICL distillation (`gistlib.core.distill`): on the
tokens after the gists, every layer's hidden state should point where the frozen base's does when it reads
the same row without gists, demos in full view. Not in Mu et al.; README, "What we changed and why".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from gistlib.core.distill import hidden_cosine_loss, teacher_hidden_states
from gistlib.core.hyper import LINEAR_MAPS
from gistlib.core.masks import make_causal_mask, make_gist_mask
from gistlib.core.prefix import (
    by_length,
    forward_with_mask,
    lora_layers,
    lora_switched_off,
    peft_wrap,
    positions_from_mask,
)
from gistlib.core.scoring import sequence_logprobs, token_loss

__all__ = ["LMTrainee"]


class LMTrainee(nn.Module):
    """Train `model` on labelled sequences under a causal or gist mask.

    mask: "causal" (in-context learning, plain LM) or "gist" (needs `gist_token_ids`).
    lora_rank: 0 trains every weight; r > 0 freezes the base and trains a LoRA (rank r, `lora_alpha`) on the
    seven linear maps of every layer (`self.model` is then the PEFT wrapper: forward passes use the adapter).
    distill_weight: weight of ICL distillation on batches that carry teacher rows (`icl_input_ids`; mask
    "gist" only). The teacher is the frozen base: `teacher` (an untrained copy, needed when every weight
    trains) or, with a LoRA, this model with its adapter off.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        mask: str = "causal",
        gist_token_ids: list[int] | None = None,
        lora_rank: int = 0,
        lora_alpha: int = 16,
        seed: int = 0,
        distill_weight: float = 0.0,
        teacher: PreTrainedModel | None = None,
    ):
        super().__init__()
        if mask not in ("causal", "gist"):
            raise ValueError(f"mask must be 'causal' or 'gist', got {mask!r}")
        if mask == "gist" and not gist_token_ids:
            raise ValueError("mask='gist' needs gist_token_ids")
        if distill_weight and (mask != "gist" or (not lora_rank and teacher is None)):
            raise ValueError(
                "distill_weight > 0 needs mask='gist' and a teacher: pass teacher= (a frozen copy of the base) "
                "when every weight trains, or lora_rank > 0"
            )
        self.mask, self.gist_token_ids, self.lora_rank = mask, list(gist_token_ids or []), lora_rank
        self.distill_weight = distill_weight
        self._lora_found: list | None = None  # the LoRA layers (lora_rank > 0), found when first switched off
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []  # a list: not a submodule
        if lora_rank:
            for p in model.parameters():
                p.requires_grad_(False)
            lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(LINEAR_MAPS), bias="none")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = peft_wrap(model, lora)
        else:
            self.model = model
            for p in model.parameters():
                p.requires_grad_(True)

    @property
    def base(self) -> PreTrainedModel:
        """The transformers model (with the LoRA layers inside when there is an adapter)."""
        return self.model.get_base_model() if self.lora_rank else self.model

    def attention_mask_4d(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, L, L) boolean mask for this trainee's rule."""
        if self.mask == "gist":
            return make_gist_mask(input_ids, self.gist_token_ids, attention_mask=attention_mask)
        return make_causal_mask(input_ids, attention_mask=attention_mask)

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(logits (B, L, V), hidden states: embeddings then every layer's, (B, L, d) each; () unless `hidden`)
        under the mask, positions counting real tokens from 0. Rows of very different lengths run as two
        passes (`by_length`)."""

        def run(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            rule, positions = self.attention_mask_4d(ids, mask), positions_from_mask(mask)
            out = forward_with_mask(self.model, rule, positions, input_ids=ids, output_hidden_states=hidden)
            return (out.logits, *(out.hidden_states if hidden else ()))

        logits, *states = by_length(run, input_ids, attention_mask)
        return logits, tuple(states)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits under the mask, positions counting real tokens from 0."""
        return self._forward(input_ids, attention_mask)[0]

    def objective(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        icl_input_ids: torch.Tensor | None = None,
        icl_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, LM loss on `labels`): the two differ by distill_weight x the distillation term
        when the batch has teacher rows, (B, Lt) `[BOS] demos x y` for each (B, L) row."""
        teach = icl_input_ids is not None and self.distill_weight > 0
        logits, states = self._forward(input_ids, attention_mask, hidden=teach)
        lm = token_loss(logits, labels)
        if not teach:
            return lm, lm
        teacher = self._teacher_hidden(icl_input_ids, icl_attention_mask)
        after = self.tokens_after_gists(input_ids, attention_mask)
        aux = hidden_cosine_loss(states[1:], teacher, attention_mask, icl_attention_mask, after)
        return lm + self.distill_weight * aux, lm

    def loss_and_backward(self, input_ids, attention_mask, labels, loss_scale: float = 1.0, **teacher) -> torch.Tensor:
        """Backward of `objective` (teacher: its icl_* rows, if the batch has them); returns the LM loss, detached."""
        teacher = {n: v for n, v in teacher.items() if n in ("icl_input_ids", "icl_attention_mask")}
        total, lm = self.objective(input_ids, attention_mask, labels, **teacher)
        (total * loss_scale).backward()
        return lm.detach()

    def tokens_after_gists(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) real tokens after each row's last gist token (right-padded rows)."""
        is_gist = torch.isin(input_ids, torch.tensor(self.gist_token_ids, device=input_ids.device))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(is_gist, positions, torch.full_like(positions, -1)).amax(1)
        return attention_mask.long().sum(1) - 1 - last

    def _teacher_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen base's hidden states on the teacher rows, one (B, Lt, d) per layer."""
        if self._teacher:
            return teacher_hidden_states(self._teacher[0], input_ids, attention_mask)
        if self._lora_found is None:
            self._lora_found = lora_layers(self.model)
        with lora_switched_off(self._lora_found):
            return teacher_hidden_states(self.model, input_ids, attention_mask)

    @torch.no_grad()
    def score(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood of the labelled tokens per row (B,) and their count (B,)."""
        return sequence_logprobs(self.logits(input_ids, attention_mask), labels)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)  # safetensors + config.json (a LoRA: PEFT's adapter files)

    def load_trainable(self, path: str | os.PathLike) -> None:
        if self.lora_rank:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, load_file(Path(path) / "adapter_model.safetensors"))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"adapter in {path} does not fit this model: unexpected {result.unexpected_keys[:3]}")
            return
        state = load_file(Path(path) / "model.safetensors")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise ValueError(
                f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
