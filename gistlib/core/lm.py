"""A whole causal LM as a trainee of `gistlib.train.loop`: the pocket base (causal mask) and Gisting (gist mask).

A trainee trains every weight, or (with `lora_rank`) only a LoRA on every linear map over a frozen base:
the paper's multi-task baseline with full attention over the demos (`multitask_icl`), and Gisting on a
4-bit base, whose weights cannot be trained.

Gisting (Mu et al. 2023) is the single-model special case of HyperLlama: one sequence
`[BOS] demos G_1..G_k query answer` under the gist mask, every weight trained, so the model learns to
compress the demos into the gist tokens' activations. The pocket base is the same model trained
under the plain causal mask on `[BOS] demos query answer`: a multi-task in-context learner.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from gistlib.core.hyper import LINEAR_MAPS
from gistlib.core.masks import make_causal_mask, make_gist_mask
from gistlib.core.prefix import forward_with_mask, peft_wrap, positions_from_mask
from gistlib.core.scoring import sequence_logprobs, token_loss

__all__ = ["LMTrainee"]


class LMTrainee(nn.Module):
    """Train `model` on labelled sequences under a causal or gist mask.

    mask: "causal" (in-context learning, plain LM) or "gist" (needs `gist_token_ids`).
    lora_rank: 0 trains every weight; r > 0 freezes the base and trains a LoRA (rank r, `lora_alpha`) on the
    seven linear maps of every layer (`self.model` is then the PEFT wrapper: forward passes use the adapter).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        mask: str = "causal",
        gist_token_ids: list[int] | None = None,
        lora_rank: int = 0,
        lora_alpha: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        if mask not in ("causal", "gist"):
            raise ValueError(f"mask must be 'causal' or 'gist', got {mask!r}")
        if mask == "gist" and not gist_token_ids:
            raise ValueError("mask='gist' needs gist_token_ids")
        self.mask, self.gist_token_ids, self.lora_rank = mask, list(gist_token_ids or []), lora_rank
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

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits under the mask, positions counting real tokens from 0."""
        mask = self.attention_mask_4d(input_ids, attention_mask)
        return forward_with_mask(self.model, mask, positions_from_mask(attention_mask), input_ids=input_ids).logits

    def loss_and_backward(self, input_ids, attention_mask, labels, loss_scale: float = 1.0, **_) -> torch.Tensor:
        loss = token_loss(self.logits(input_ids, attention_mask), labels)
        (loss * loss_scale).backward()
        return loss.detach()

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
