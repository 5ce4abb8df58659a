"""Losses and log-likelihoods over labelled tokens (labels -100 carry no loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE", "token_loss", "sequence_logprobs"]

IGNORE = -100  # label value that carries no loss (PyTorch's cross-entropy default)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions. logits (B, L, V), labels (B, L)."""
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the labelled tokens per row, and their count. Both (B,)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    keep = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * keep).sum(-1), keep.sum(-1)
