"""Token selection as pure functions on tensors (no Lightning, no models): scores and rules.

Every per-token tensor is ``[B, T]`` and aligned with ``labels`` (see ``sstoken_pl.loss``); ``response_mask`` is the
``BoolTensor[B, T]`` of trained positions. A method is *inputs → score → rule*: the callbacks gather named per-token
inputs (``nll``, ``entropy``, ``history_nll``, ``reference_nll``, ``attention``), a **score** function here turns
them into one float per token, and a **rule** turns scores into the kept mask (or weights). ``sstoken_pl.methods``
names the combinations.

Scores may use two special values that every rule honours: ``+inf`` — always kept (e.g. Q-Tuning's samples kept
whole), ``−inf`` — never kept (e.g. Q-Tuning's dropped samples). Ranking rules keep the top ``⌈ρ·R⌉`` of the ``R``
*finite* scores of a sample (or batch) plus every ``+inf``.
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


# REL spreads up to this (nats) within a sample are ties, not a ranking: the float rounding between two forwards of the
# same weights in other batch layouts (a score store, a cache filled in another epoch) is ~1e-7 in float32 and more
# under bf16, and the per-sample min-max would blow it up to [0, 1]. Real REL spreads after a step are ≥ 1e-2.
REL_TIE = 1e-4


def minmax_per_sample(
    values: torch.Tensor, response_mask: torch.Tensor, eps: float = EPS, tie: float = 0.0
) -> torch.Tensor:
    """Min-max normalise each sample over its response positions: ``(x − min) / (max − min + eps)``; 0 elsewhere.
    A sample whose values span no more than ``tie`` is all ties (0 everywhere): its spread is rounding, not a
    ranking."""
    values = values.float()
    big = torch.finfo(values.dtype).max
    lo = torch.where(response_mask, values, big).amin(dim=1, keepdim=True)
    hi = torch.where(response_mask, values, -big).amax(dim=1, keepdim=True)
    out = (values - lo) / (hi - lo + eps)
    if tie > 0:
        out = torch.where(hi - lo <= tie, 0.0, out)
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
    The min-max is per sample over its response positions (ε = 1e-8; a REL spread ≤ ``REL_TIE`` is all ties).
    Non-response positions score 0.
    ``history_loss`` may be None when ``gamma == 0`` and ``attention_score`` None when ``gamma == 1``.
    """
    check_gamma(gamma)
    score = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    if gamma > 0:
        if history_loss is None:
            raise ValueError("sstoken_scores: gamma > 0 needs history_loss")
        rel = history_loss.float() - token_loss.detach().float()
        score = score + gamma * minmax_per_sample(rel, response_mask, tie=REL_TIE)
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


def _descending_order(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per row, positions by descending score. Ties: the earlier position first, or, with a ``generator``, a seeded
    random order (no positional bias: when all scores are equal, which tokens are kept is a uniform draw)."""
    if generator is None:
        return torch.argsort(scores, dim=1, descending=True, stable=True)
    key = torch.rand(scores.shape, generator=generator, device=generator.device).to(scores.device)
    shuffle = torch.argsort(key, dim=1)
    order = torch.argsort(scores.gather(1, shuffle), dim=1, descending=True, stable=True)
    return shuffle.gather(1, order)


def top_ratio_mask(
    scores: torch.Tensor, response_mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``BoolTensor[B, T]``: per sample, the top ``⌈ratio · R⌉`` of its ``R`` finite-scored response positions, plus
    those scored ``+inf``; ``−inf`` is never kept.

    Never selects a non-response position; ``R = 0`` selects nothing (but the ``+inf`` ones). Ties go to the earlier
    position, or are broken by a seeded random draw when a ``generator`` is given (``TokenSelection`` always gives
    one, so that equal scores, e.g. REL ≡ 0 at step 0, do not systematically drop the end of every response).
    """
    check_ratio(ratio)
    scores = scores.float()
    finite = response_mask & torch.isfinite(scores)
    always = response_mask & (scores == torch.inf)
    k = kept_count(finite.sum(dim=1), ratio) + always.sum(dim=1)  # [B]
    masked = torch.where(response_mask & (scores > -torch.inf), scores, -torch.inf)
    order = _descending_order(masked, generator)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & response_mask & (scores > -torch.inf)


def batch_top_ratio_mask(
    scores: torch.Tensor, response_mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``BoolTensor[B, T]``: the top ``⌈ratio · N⌉`` of all ``N`` finite-scored response positions of the batch (one
    threshold across samples, as Rho-1 ranks), plus those scored ``+inf``. Ties as in ``top_ratio_mask``."""
    check_ratio(ratio)
    flat_mask = response_mask.reshape(1, -1)
    return top_ratio_mask(scores.reshape(1, -1), flat_mask, ratio, generator).reshape(response_mask.shape)


def global_top_ratio_mask(scores: torch.Tensor, response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Deprecated name of ``batch_top_ratio_mask`` (it ranks over one batch, not the dataset)."""
    return batch_top_ratio_mask(scores, response_mask, ratio)


def threshold_mask(scores: torch.Tensor, response_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """``BoolTensor[B, T]``: response positions whose score is at least ``threshold`` (a fixed global threshold)."""
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    return (scores >= threshold) & response_mask


def ratio_threshold(scores: torch.Tensor, ratio: float) -> float:
    """The threshold that keeps the top ``⌈ratio · N⌉`` of the ``N`` finite values of ``scores`` (any shape):
    the ``⌈ratio · N⌉``-th largest. TokenCleaning's dataset-global threshold, from the scores of a scoring pass."""
    check_ratio(ratio)
    flat = scores.float().flatten()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        raise ValueError("ratio_threshold: no finite score to take a threshold from")
    k = int(kept_count(torch.tensor([flat.numel()]), ratio)[0])
    return float(torch.topk(flat, k).values[-1])


def weights_from_scores(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``FloatTensor[B, T]`` in [0, 1]: per-sample min-max of the finite scores as per-token loss weights (the soft
    rule: weight rather than drop); ``+inf`` → 1, ``−inf`` → 0, 0 off the response. A sample whose finite scores
    all tie (one token, or REL ≡ 0 at step 0 of a base history) has no ranking to express: uniform weights 1."""
    scores = scores.float()
    finite = response_mask & torch.isfinite(scores)
    w = minmax_per_sample(torch.where(finite, scores, 0.0), finite)
    big = torch.finfo(scores.dtype).max
    lo = torch.where(finite, scores, big).amin(dim=1, keepdim=True)
    hi = torch.where(finite, scores, -big).amax(dim=1, keepdim=True)
    w = torch.where(finite & (hi == lo), 1.0, w)
    w = torch.where(scores == torch.inf, 1.0, w)
    return torch.where(response_mask & (scores > -torch.inf), w, 0.0)


# ---------------------------------------------------------------------------------------------------- scores
def random_scores(response_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores (the ``random`` baseline: a seeded ``⌈ρR⌉`` of each response)."""
    device = generator.device if generator is not None else response_mask.device
    s = torch.rand(response_mask.shape, generator=generator, device=device).to(response_mask.device)
    return torch.where(response_mask, s, 0.0)


def excess_loss_scores(token_loss: torch.Tensor, reference_loss: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Rho-1's excess loss ``L_current − L_reference``: high where the current model still errs on a token that the
    reference (trained on clean data) finds easy — learnable and useful."""
    return torch.where(response_mask, token_loss.detach().float() - reference_loss.float(), 0.0)


def influence_scores(base_loss: torch.Tensor, reference_loss: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """TokenCleaning's fixed-model influence ``L_base − L_reference``: how much training on clean data lowered the
    token's loss; low (or negative) for tokens the clean reference does not learn — the noise."""
    return torch.where(response_mask, base_loss.float() - reference_loss.float(), 0.0)


def end_of_turn_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[B, T]``: the last position of each contiguous response span (the end-of-turn/EOS token of each
    assistant turn under this project's templates)."""
    nxt = torch.nn.functional.pad(response_mask[:, 1:], (0, 1), value=False)
    return response_mask & ~nxt


def _ranks01(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid entry among the valid ones, scaled to [0, 1] (0.5 when there is one); −1 elsewhere."""
    n = int(valid.sum())
    out = torch.full(values.shape, -1.0, device=values.device)
    if n == 0:
        return out
    v = values[valid]
    order = torch.argsort(v, stable=True)
    r = torch.empty(n, device=values.device)
    r[order] = torch.arange(n, device=values.device, dtype=torch.float32)
    out[valid] = r / (n - 1) if n > 1 else torch.full_like(r, 0.5)
    return out


def qtuning_partition(
    error: torch.Tensor, uncertainty: torch.Tensor, valid: torch.Tensor, sample_ratio: float, iterations: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Tuning's sample triage on the error × uncertainty plane of one batch: ``(keep_whole, prune_tokens)``,
    two ``BoolTensor[B]``.

    Each valid sample is placed by its quantile rank on both axes (``e``, ``u`` in [0, 1]). With a quantile level
    α, Q1 ("harmful noise": ``e ≥ 1 − α`` and ``u ≥ 1 − α``) and Q3 ("redundant": ``e ≤ α`` and ``u ≤ α``) are
    dropped; the dropped share grows with α, and α is found by bisection as the largest level that keeps at least
    ``⌈sample_ratio · N⌉`` samples. A kept sample whose error rank exceeds its uncertainty rank lies towards Q2
    ("valuable misconception": high error, low uncertainty; its tokens are pruned); the others lie towards Q4
    ("calibration": low error, high uncertainty; kept whole).
    """
    check_ratio(sample_ratio, "sample_ratio")
    e, u = _ranks01(error.float(), valid), _ranks01(uncertainty.float(), valid)
    target = int(kept_count(valid.sum().reshape(1), sample_ratio)[0])

    def dropped(alpha: float) -> torch.Tensor:
        q1 = (e >= 1 - alpha) & (u >= 1 - alpha)
        q3 = (e <= alpha) & (u <= alpha)
        return valid & (q1 | q3)

    lo, hi = 0.0, 1.0  # kept(lo) ≥ target (α = 0 drops only exact corners), kept(hi) = 0
    if int((valid & ~dropped(lo)).sum()) < target:
        lo = -1.0  # α < 0 drops nothing
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if int((valid & ~dropped(mid)).sum()) >= target:
            lo = mid
        else:
            hi = mid
    kept = valid & ~dropped(lo)
    prune = kept & (e > u)
    return kept & ~prune, prune


def qtuning_scores(
    token_loss: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    sample_ratio: float = 0.5,
    smoothing: float = 0.5,
) -> torch.Tensor:
    """Q-Tuning's scores: ``−inf`` on dropped samples, ``+inf`` on samples kept whole, and on samples whose tokens
    are pruned the neighbour-smoothed token perplexity ``(1 − λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1})``
    (``λ = smoothing``; a neighbour outside the response counts as the token itself), so a ranking rule keeps the
    top ρ of those tokens (the least predictable ones, the misconception; confidently predicted tokens are pruned).

    The error of a sample is its response perplexity ``exp(mean NLL)``, its uncertainty its mean predictive entropy
    (see ``qtuning_partition``).
    """
    check_gamma(smoothing, "smoothing")
    resp = response_mask
    R = resp.sum(dim=1)
    nll = torch.where(resp, token_loss.detach().float(), 0.0)
    error = torch.exp((nll.sum(1) / R.clamp(min=1)).clamp(max=80.0))
    uncertainty = torch.where(resp, entropy.float(), 0.0).sum(1) / R.clamp(min=1)
    whole, prune = qtuning_partition(error, uncertainty, R > 0, sample_ratio)
    ppl = torch.exp(nll.clamp(max=80.0))
    prev_ok = torch.nn.functional.pad(resp[:, :-1], (1, 0), value=False) & resp
    next_ok = torch.nn.functional.pad(resp[:, 1:], (0, 1), value=False) & resp
    prev = torch.where(prev_ok, torch.nn.functional.pad(ppl[:, :-1], (1, 0)), ppl)
    nxt = torch.where(next_ok, torch.nn.functional.pad(ppl[:, 1:], (0, 1)), ppl)
    smoothed = (1 - smoothing) * ppl + smoothing * (prev + nxt)
    scores = torch.where(prune[:, None], smoothed, torch.where(whole[:, None], torch.inf, -torch.inf))
    return torch.where(resp, scores, 0.0)


def selection_stats(
    values: dict[str, torch.Tensor], response_mask: torch.Tensor, kept: torch.Tensor, noise: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What a step's selection did, as ``TokenSelection`` logs it: ``selection/kept_fraction`` (weight share of the
    response tokens), ``selection/rel_mean`` and ``selection/attn_mean`` when those inputs are in ``values``, and,
    given the injected-noise flags (``noise``, the built-in task's ground truth), ``selection/noise_dropped`` and
    ``selection/clean_kept``."""
    w = kept.float()
    resp = response_mask
    n_resp = resp.sum().clamp(min=1)
    stats = {"selection/kept_fraction": (w * resp).sum() / n_resp}
    if "history_nll" in values and "nll" in values:
        stats["selection/rel_mean"] = ((values["history_nll"] - values["nll"]) * resp).sum() / n_resp
    if "attention" in values:
        stats["selection/attn_mean"] = (values["attention"] * resp).sum() / n_resp
    if noise is not None:
        noise = noise.bool() & resp
        clean = resp & ~noise
        if noise.any():
            stats["selection/noise_dropped"] = 1.0 - (w * noise).sum() / noise.sum()
        if clean.any():
            stats["selection/clean_kept"] = (w * clean).sum() / clean.sum()
    return stats
