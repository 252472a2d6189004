"""Token-selection rules as pure functions on tensors (no Lightning, no models).

Every per-token tensor is ``[B, T]`` and aligned with ``labels`` (see ``sstoken_pl.loss``); ``response_mask`` is the
``BoolTensor[B, T]`` of trained positions. Callbacks (``sstoken_pl.callbacks``) and baselines only gather the inputs
and call these.
"""

from __future__ import annotations

import math

import torch

from sstoken_pl.errors import ConfigError

EPS = 1e-8


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """``ratio`` must be in (0, 1]; raises ``ConfigError`` (a ``ValueError``) naming ``name`` otherwise."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0.0 < ratio <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1], got {ratio!r}")
    return float(ratio)


def check_gamma(gamma: float, name: str = "gamma") -> float:
    """``gamma`` must be in [0, 1]; raises ``ConfigError`` (a ``ValueError``) naming ``name`` otherwise."""
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not (0.0 <= gamma <= 1.0):
        raise ConfigError(f"{name} must be in [0, 1], got {gamma!r}")
    return float(gamma)


def minmax_per_sample(values: torch.Tensor, response_mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Min-max normalise each sample over its response positions: ``(x − min) / (max − min + eps)``; 0 elsewhere."""
    values = values.float()
    big = torch.finfo(values.dtype).max
    lo = torch.where(response_mask, values, big).amin(dim=1, keepdim=True)
    hi = torch.where(response_mask, values, -big).amax(dim=1, keepdim=True)
    out = (values - lo) / (hi - lo + eps)
    return torch.where(response_mask, out, 0.0)


def sstoken_scores(
    token_loss: torch.Tensor,
    history_loss: torch.Tensor | None,
    attention_score: torch.Tensor | None,
    response_mask: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """ssToken's score ``gamma · minmax(history_loss − token_loss) + (1 − gamma) · attention_score`` (``[B, T]``).

    ``token_loss`` is the current model's per-token NLL (detached here), ``history_loss`` the history model's.
    The min-max is per sample over its response positions (ε = 1e-8). Non-response positions score 0.
    ``history_loss`` may be None when ``gamma == 0`` and ``attention_score`` None when ``gamma == 1``.
    """
    check_gamma(gamma)
    score = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    if gamma > 0:
        if history_loss is None:
            raise ValueError("sstoken_scores: gamma > 0 needs history_loss")
        rel = history_loss.float() - token_loss.detach().float()
        score = score + gamma * minmax_per_sample(rel, response_mask)
    if gamma < 1:
        if attention_score is None:
            raise ValueError("sstoken_scores: gamma < 1 needs attention_score")
        score = score + (1.0 - gamma) * attention_score.float()
    return torch.where(response_mask, score, 0.0)


def kept_count(num_response: torch.Tensor, ratio: float) -> torch.Tensor:
    """``⌈ratio · R⌉`` per sample (the authors' rounding), 0 where R = 0.

    The product is rounded to 1e-6 first so that e.g. 0.6 · 5 (3.0000000000000004 in floating point) keeps 3.
    """
    r = num_response.to(torch.float64)
    k = torch.ceil(torch.round(r * ratio, decimals=6))
    return torch.where(r > 0, k.clamp(min=1), 0.0).to(torch.long)


def top_ratio_mask(scores: torch.Tensor, response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """``BoolTensor[B, T]``: per sample, the top ``⌈ratio · R⌉`` of its ``R`` response positions by score.

    Never selects a non-response position; ``R = 0`` selects nothing. Ties go to the earlier position.
    """
    check_ratio(ratio)
    k = kept_count(response_mask.sum(dim=1), ratio)  # [B]
    masked = torch.where(response_mask, scores.float(), -torch.inf)
    order = torch.argsort(masked, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & response_mask


def global_top_ratio_mask(scores: torch.Tensor, response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """``BoolTensor[B, T]``: the top ``⌈ratio · N⌉`` of all ``N`` response positions of the batch (one threshold
    across samples, as the baselines that rank globally do). Ties go to the earlier position in row-major order."""
    check_ratio(ratio)
    flat_mask = response_mask.reshape(1, -1)
    return top_ratio_mask(scores.reshape(1, -1), flat_mask, ratio).reshape(response_mask.shape)


def threshold_mask(scores: torch.Tensor, response_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """``BoolTensor[B, T]``: response positions whose score is at least ``threshold`` (a fixed global threshold)."""
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    return (scores >= threshold) & response_mask
