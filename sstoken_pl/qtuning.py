"""Q-Tuning (arXiv 2509.23873) as the authors' code runs it, as pure functions on tensors.

Followed: the authors' LLaMA-Factory fork ``Q-tuning/Q-tuning``, file
``LLaMA-Factory/src/llamafactory/train/sft/trainer.py``, ``CustomSeq2SeqTrainer.compute_loss`` with ``plug: wisely``
and ``token_method: wise`` (its ``_compute_ppl_entropy`` and ``_dynamic_threshold_search_bisect``). Per training
batch:

1. **The error × uncertainty plane.** A sample's error is the perplexity of its response, ``exp(mean NLL)`` over
   its response tokens; its uncertainty the mean predictive entropy over **every attended position** (prompt and
   response: the release averages over the attention mask, not over the labels).
2. **Sample triage.** For a quantile level α (the same for both axes: the release bisects α and β with identical
   bounds and updates, so they never differ), Q2 = ``ppl > q_{1−α}(ppl) ∧ H ≤ q_α(H)`` (valuable misconception) and
   Q4 = ``ppl ≤ q_α(ppl) ∧ H > q_{1−α}(H)`` (calibration) are **kept**; every other sample is dropped. α is bisected
   in [0, 0.49] for at most 10 halvings, stopping when the kept share is within 0.01 of ``sample_ratio``
   (quantiles interpolate linearly, as ``numpy.quantile``). Q2 ∪ Q4 can hold at most about half of a batch; when it
   holds fewer than ``K = round(sample_ratio · B)`` samples, the remaining samples with the largest
   ``|minmax(ppl) − minmax(H)|`` fill it up to K; those with ``minmax(ppl) ≥ minmax(H)`` count as Q2.
3. **Token pruning, batch budget.** The batch may train on ``round(A · sample_ratio · ratio)`` of its ``A``
   attended positions (prompt positions count). The dropped samples' attended positions count as dropped first;
   the rest of the drop comes from the response tokens of the Q2 samples: those with the **highest** smoothed
   perplexity ``(1 − λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1})`` are dropped (``PPL_i = exp(NLL_i)``; a neighbour that
   is an attended prompt position has NLL 0, so PPL 1; a padding neighbour, or one past either end, counts 0).
   Q4 samples are kept whole.

Where we differ from the release, and why: the loss is the mean NLL over the kept *response* tokens (the project's
contract, ``sstoken_pl.token_loss``); the release divides the kept tokens' summed NLL by its kept *attended*
positions, prompt positions included (whose NLL is 0), which scales each batch's gradient by its response share.
Scores are float32 (the release computes them in the logits' dtype). Ties in the drop order are broken by the
seeded draw every rule uses (the release: ``torch.topk``'s order).

The paper's reading that the project implemented before the code was public is ``sstoken_pl.selection.qtuning_scores``
(method ``qtuning_paper``).
"""

from __future__ import annotations

import torch

from sstoken_pl.selection import _descending_order, check_gamma, check_ratio


def eu_quadrants(
    ppl: torch.Tensor, entropy: torch.Tensor, keep_ratio: float, iterations: int = 10, tol: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q2, q4)``, two ``BoolTensor[N]``: the release's joint bisection of the quantile level on the plane.

    Q2: ``ppl > q_{1−α}(ppl)`` and ``entropy ≤ q_α(entropy)``; Q4: ``ppl ≤ q_α(ppl)`` and ``entropy > q_{1−α}``.
    α starts at 0.245 (the middle of [0, 0.49]); each halving widens α when Q2 ∪ Q4 holds less than ``keep_ratio``
    of the samples and narrows it otherwise; the last level tried is returned.
    """
    check_ratio(keep_ratio, "sample_ratio")
    n = ppl.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=ppl.device)
        return empty, empty
    p, h = ppl.double(), entropy.double()
    lo, hi = 0.0, 0.49
    q2 = q4 = None
    for _ in range(iterations):
        alpha = (lo + hi) / 2.0
        levels = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64, device=p.device)
        p_lo, p_hi = torch.quantile(p, levels)
        h_lo, h_hi = torch.quantile(h, levels)
        q2 = (p > p_hi) & (h <= h_lo)
        q4 = (p <= p_lo) & (h > h_hi)
        share = float((q2 | q4).sum()) / n
        if abs(share - keep_ratio) < tol:
            break
        if share < keep_ratio:
            lo = alpha
        else:
            hi = alpha
    return q2, q4


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    if float(hi - lo) < 1e-12:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def triage(
    ppl: torch.Tensor, entropy: torch.Tensor, sample_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, pruned)``, two ``BoolTensor[B]``: the samples the release trains on (Q2 ∪ Q4, filled up to
    ``K = round(sample_ratio · B)``) and, among them, those whose tokens it prunes (Q2 and the Q2-like fill)."""
    B = ppl.numel()
    q2, q4 = eu_quadrants(ppl, entropy, sample_ratio)
    kept, pruned = q2 | q4, q2.clone()
    k = min(B, max(1, int(round(B * sample_ratio))))  # Python's round, as the release
    if int(kept.sum()) < k:
        p_n, h_n = _minmax(ppl.double()), _minmax(entropy.double())
        gap = torch.maximum(p_n - h_n, h_n - p_n)
        remain = torch.nonzero(~kept).squeeze(-1)
        order = torch.argsort(-gap[remain], stable=True)
        extra = remain[order[: k - int(kept.sum())]]
        kept[extra] = True
        pruned[extra] = (p_n - h_n)[extra] >= (h_n - p_n)[extra]
    return kept, pruned


def smoothed_ppl(nll: torch.Tensor, attended: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``(1 − λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1})`` with ``PPL = exp(NLL)·attended`` (``[B, T]``, float32): an
    attended prompt position (NLL 0) counts 1, a padding position or one past either end 0."""
    ppl = torch.exp(nll.detach().float().clamp(max=80.0)) * attended
    left = torch.nn.functional.pad(ppl[:, :-1], (1, 0))
    right = torch.nn.functional.pad(ppl[:, 1:], (0, 1))
    return (1.0 - smoothing) * ppl + smoothing * (left + right)


def qtuning_mask(
    nll: torch.Tensor,
    sequence_entropy: torch.Tensor,
    attended: torch.Tensor,
    response_mask: torch.Tensor,
    sample_ratio: float = 0.25,
    ratio: float = 0.5,
    smoothing: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``BoolTensor[B, T]``: the response tokens the release trains on (module docstring).

    ``nll``: the current model's per-token NLL (0 off the response); ``sequence_entropy``: its predictive entropy at
    every attended position (``sstoken_pl.callbacks.SequenceEntropy``); ``attended``: the attended positions aligned
    with ``labels`` (position 0 excluded); ``ratio``: the release's ``token_ratio``.
    """
    check_ratio(sample_ratio, "sample_ratio")
    check_ratio(ratio, "ratio")
    check_gamma(smoothing, "smoothing")
    resp = response_mask
    att = (attended > 0) | resp
    R = resp.sum(1)
    nll = torch.where(resp, nll.detach().float(), 0.0)
    ppl = torch.exp((nll.sum(1) / R.clamp(min=1)).clamp(max=80.0))
    entropy = torch.where(att, sequence_entropy.float(), 0.0).sum(1) / att.sum(1).clamp(min=1)
    kept, pruned = triage(ppl, entropy, sample_ratio)
    mask = resp & kept[:, None]
    total = int(att.sum())
    drop_target = max(0, total - int(round(total * sample_ratio * ratio)))
    remaining = drop_target - int((att & ~kept[:, None]).sum())
    candidates = resp & (kept & pruned)[:, None]
    n_drop = min(max(0, remaining), int(candidates.sum()))
    if ratio == 1.0 or n_drop == 0:
        return mask
    scores = torch.where(candidates, smoothed_ppl(nll, att.float(), smoothing), -torch.inf)
    order = _descending_order(scores.reshape(1, -1), generator).squeeze(0)
    drop = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    drop[order[:n_drop]] = True
    return mask & ~drop.reshape(scores.shape)


def qtuning_scores(
    nll: torch.Tensor,
    sequence_entropy: torch.Tensor,
    attended: torch.Tensor,
    response_mask: torch.Tensor,
    sample_ratio: float = 0.25,
    ratio: float = 0.5,
    smoothing: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``qtuning_mask`` as scores every rule honours: ``+inf`` on kept response tokens, ``−inf`` on the others."""
    mask = qtuning_mask(nll, sequence_entropy, attended, response_mask, sample_ratio, ratio, smoothing, generator)
    scores = torch.where(mask, torch.inf, -torch.inf)
    return torch.where(response_mask, scores, 0.0)
