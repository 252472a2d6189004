"""Token-level SFT objectives: what each kept token contributes to the loss.

A selection method (``sstoken_pl.methods``) decides *which* tokens count and how much (the mask or weights ``c``);
an **objective** decides *what* each counted token contributes, a per-token loss ``ℓ``. The training loss is always

    loss = Σ c·d·ℓ / Σ c        (over the response tokens of the optimizer step, ``sstoken_pl.token_loss``)

with ``d`` the weights given by the data (``batch["token_weights"]``, 1 when absent; a token count normalises, as
ms-swift's ``loss_scale``). Plain SFT is ``ℓ = NLL`` with
``c`` = every response token; ``TokenSelection(method="sstoken", objective="dft")`` trains ssToken's kept tokens
with DFT's loss; the weighting methods (``dft``, ``eaft``, ``prob``, ``otr``, ``asft``) are the objective with
``c`` = every response token. The normaliser counts tokens (as TRL's ``dft`` loss divides by the number of response
tokens), never the objective's own weights.

An objective is a pure function ``loss(inputs, response_mask, options, generator) -> (ℓ [B, T], stats[, keep])``:

- ``inputs["nll"]``: the per-token NLL *with its graph* (float32, aligned with ``labels``; 0 off the response);
- ``inputs["logits"]``: only for objectives that need the distribution (``needs_logits``): the rows of logits that
  predict a response token, ``[N, V]`` in row-major order of the response positions, with their graph (the fused
  cross-entropy paths never hold them: such an objective refuses ``model.fused_cross_entropy``);
- ``inputs["targets"]``: ``LongTensor[N]``, the target token of each row;
- provider inputs (``history_logits``: the anchor model's rows, no graph) when the objective names them;
- ``inputs["draw_keys"]`` (``LongTensor[B, T]``) for an objective that samples (``draws``);
- ``stats``: scalars to log under ``objective/`` (the mean weight, OTR's share of sampled ground truth, …), each a
  mean over the response tokens;
- ``keep`` (optional ``BoolTensor[B, T]``): an objective that counts only some tokens (the probability objectives'
  thresholds) narrows ``c`` to them, in the loss and its normaliser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from sstoken_pl.errors import ConfigError

Inputs = Mapping[str, torch.Tensor]
LossFn = Callable[[Inputs, torch.Tensor, Mapping[str, Any], "torch.Generator | None"], "tuple[torch.Tensor, dict]"]


@dataclass(frozen=True)
class Objective:
    """A per-token objective.

    Args:
        name: the name configs use (``TokenSelection(objective=name)``).
        loss: ``loss(inputs, response_mask, options, generator) -> (ℓ FloatTensor[B, T], stats)``.
        needs_logits: whether ``inputs`` must carry the response rows of logits (refused with a fused
            cross-entropy).
        provider_inputs: names of inputs from provider callbacks (``history_logits``).
        draws: whether the loss samples (``inputs["draw_keys"]`` is then given).
        options: the objective's options and their defaults.
        summary: one line for docs.
    """

    name: str
    loss: LossFn
    needs_logits: bool = False
    provider_inputs: frozenset[str] = frozenset()
    draws: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values.detach() * mask).sum() / mask.sum().clamp(min=1)


def scatter_rows(rows: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` values of the response rows back to ``[B, T]`` aligned with ``labels`` (0 elsewhere)."""
    out = torch.zeros(response_mask.shape, dtype=rows.dtype, device=rows.device)
    return out.masked_scatter(response_mask, rows)


# ---------------------------------------------------------------------------------------------------- objectives
def nll_loss(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator=None):
    """Plain SFT: ``ℓ = −log p``."""
    return inputs["nll"], {}


def dft_loss(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator=None):
    """DFT (Wu et al., arXiv 2508.05629; TRL ``loss_type="dft"``): ``ℓ = sg(p)·(−log p)``, ``p = exp(−NLL)`` of the
    target, no gradient through the weight."""
    nll = inputs["nll"]
    p = torch.exp(-nll.detach())
    return p * nll, {"weight_mean": _masked_mean(p, resp)}


def prob_loss(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator=None):
    """Probability objectives as the authors' code runs them (Li et al., arXiv 2510.00526;
    ``GaotangLi/Beyond-Log-Likelihood``, ``main_verl/trainer/fsdp_sft_trainer.py``, ``objective_trans``):
    ``ℓ = (1 − p^k)/k`` for ``power`` k > 0 (their ``GeneralFamily-k``; k = 1 is ``1 − p``, their ``p``), ``−log p``
    for k = 0 (``logp``); the gradient flows through p. ``min_p`` / ``max_p`` count only the tokens with
    ``min_p ≤ p ≤ max_p`` — in the loss and its normaliser, as their ``OnlyTopP`` / ``OnlyBottomP`` (k = 1) and
    ``OnlyTopLogP`` / ``OnlyBottomLogP`` (k = 0) overwrite the loss mask.

    The gradient of ``(1 − p^k)/k`` is that of ``sg(p^k)·(−log p)``: the logged ``weight_mean`` is the mean ``p^k``
    over the counted tokens."""
    nll = inputs["nll"]
    k = float(options["power"])
    p = torch.exp(-nll.detach())
    loss = nll if k == 0 else -torch.expm1(-k * nll) / k
    keep = resp & (p >= float(options["min_p"])) & (p <= float(options["max_p"]))
    stats = {"weight_mean": _masked_mean(p**k, keep), "counted_fraction": _masked_mean(keep.float(), resp)}
    return loss, stats, keep


def eaft_loss(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator=None):
    """EAFT (arXiv 2601.02151) as the authors' code runs it (their LLaMA-Factory integration,
    ``src/llamafactory/train/trainer_utils.py``, ``_eaft_cross_entropy``; the same in their ms-swift fork):
    ``ℓ = (H_k / normalizer)^alpha · (−log p)`` with ``H_k`` the entropy of the softmax over the ``k`` largest
    logits of the position (k = 20, normalizer 3.0 ≈ ln 20, alpha 1), no gradient through the weight. Axolotl's port
    divides by nothing: ``normalizer: 1``."""
    nll, rows = inputs["nll"], inputs["logits"]
    k, norm, alpha = int(options["k"]), float(options["normalizer"]), float(options["alpha"])
    with torch.no_grad():
        entropy = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        chunk = max(1, (1 << 26) // max(1, rows.shape[-1]))
        for s in range(0, rows.shape[0], chunk):
            top = torch.topk(rows[s : s + chunk].float(), k=min(k, rows.shape[-1]), dim=-1).values
            logq = top - torch.logsumexp(top, dim=-1, keepdim=True)
            entropy[s : s + chunk] = -(logq.exp() * logq).sum(-1)
        weight = scatter_rows((entropy / norm).pow(alpha), resp)
    return weight * nll, {"weight_mean": _masked_mean(weight, resp)}


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) of int64 values in [0, 2^32): the same bits on every device."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def keyed_uniform(keys: torch.Tensor, k: int) -> torch.Tensor:
    """``FloatTensor[N, k]`` in (0, 1): ``k`` uniforms per row from the row's integer key alone — a counter-based
    draw, so a token's draws do not depend on which batch, micro-batch or rank it lands in."""
    j = torch.arange(k, device=keys.device, dtype=torch.int64)
    x = _hash32(_hash32(keys[:, None] & _MASK32) ^ _hash32((keys[:, None] >> 32) + 0x9E3779B9 * (j + 1)))
    x = _hash32(x + j * 0x632BE5AB)
    return (x.double() + 0.5) / 2.0**32


def otr_loss(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator=None):
    """One-Token Rollout (Ming et al., arXiv 2509.26313; no public code: this is our reading). Each response position
    is a one-step episode: draw ``samples`` K tokens with replacement from the current policy at ``temperature``
    (no gradient through the draw; the paper samples above temperature 1 to explore — 1.5 is our choice, as is the
    default β = −0.1, "slightly negative" in the paper; K = 256 is the paper's), reward a draw 1 when it is the
    ground-truth token and ``penalty`` β otherwise (the reward under a stop-gradient), and take the policy-gradient
    loss ``ℓ = −(1/K) Σ_k R(a_k)·log π_θ(a_k)`` with ``log π_θ`` at temperature 1 (no importance weight for the
    sampling temperature). In expectation (τ = 1) this is ``−p·log p − β Σ_{a≠y} π(a) log π(a)``: DFT's gradient on
    the ground truth plus a push away from the wrong tokens the policy would emit.

    The draws are inverse-CDF samples of uniforms keyed by ``inputs["draw_keys"]`` (``LongTensor[B, T]``, one key
    per token: ``TokenSelection`` derives it from the seed, the optimizer step, the sample's index and the position),
    so gradient accumulation and data parallelism draw exactly what one big batch would. Logs ``sampled_gt``: the
    share of draws equal to the ground truth."""
    nll, rows, targets = inputs["nll"], inputs["logits"], inputs["targets"]
    k, tau, beta = int(options["samples"]), float(options["temperature"]), float(options["penalty"])
    n = rows.shape[0]
    keys = inputs["draw_keys"][resp]
    draws = torch.empty(n, k, dtype=torch.long, device=rows.device)
    with torch.no_grad():
        chunk = max(1, (1 << 24) // max(1, rows.shape[-1]))
        for s in range(0, n, chunk):
            cdf = torch.softmax(rows[s : s + chunk].double() / tau, dim=-1).cumsum(-1)
            u = keyed_uniform(keys[s : s + chunk], k) * cdf[:, -1:]
            draws[s : s + chunk] = torch.searchsorted(cdf, u).clamp_(max=rows.shape[-1] - 1)
        hit = draws == targets[:, None]
        reward = torch.where(hit, 1.0, beta)
    # log π(a) = x_a − lse = x_a − x_y − NLL_y: through the NLL's chunked graph, no float copy of the rows
    logp = rows.gather(1, draws).float() - rows.gather(1, targets[:, None]).float() - nll[resp][:, None]
    loss_rows = -(reward * logp).mean(dim=1)
    stats = {"sampled_gt": hit.float().mean() if n else torch.zeros((), device=rows.device)}
    return scatter_rows(loss_rows, resp), stats


class _RowKL(torch.autograd.Function):
    """Per-row ``KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)`` of ``p = softmax(logits)`` from ``q = softmax(anchor)``,
    chunked over rows (never a float32 copy of all rows); the gradient ``p − q`` is recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, anchor, chunk: int):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            logp = torch.log_softmax(logits[s : s + chunk].float(), dim=-1)
            logq = torch.log_softmax(anchor[s : s + chunk].float(), dim=-1)
            out[s : s + chunk] = (logq.exp() * (logq - logp)).sum(-1)
        ctx.save_for_backward(logits, anchor)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, anchor = ctx.saved_tensors
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            p = torch.softmax(logits[s : s + ctx.chunk].float(), dim=-1)
            q = torch.softmax(anchor[s : s + ctx.chunk].float(), dim=-1)
            out[s : s + ctx.chunk] = ((p - q) * grad[s : s + ctx.chunk, None].float()).to(logits.dtype)
        return out, None, None


def row_kl(logits: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``FloatTensor[N]``: ``KL(softmax(anchor) ‖ softmax(logits))`` per row, differentiable in ``logits``."""
    if logits.shape != anchor.shape:
        raise ValueError(f"row_kl: logits {tuple(logits.shape)} and anchor {tuple(anchor.shape)} differ")
    chunk = max(1, (1 << 26) // max(1, logits.shape[-1]))
    return _RowKL.apply(logits.contiguous(), anchor.detach().contiguous(), chunk)


def asft_loss(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator=None):
    """Anchored SFT (Zhu et al., arXiv 2509.23753) as the authors' code runs it (``zhuchichi56/ASFT``, ``train_v2.py``,
    ``EnhancedTrainer.compute_loss``; LLaMA-Factory's ``asft_loss_func`` is the same): DFT's ``sg(p)·(−log p)`` plus
    ``alpha ·  KL(π_anchor ‖ π_θ)``, the KL summed over the vocabulary at each response position (``F.kl_div(log π_θ,
    π_anchor)``), no temperature. The anchor is ``HistoryModel``'s ``history_logits``: the base model (LoRA with
    adapters off, or the weights at fit start), as their code uses the base model."""
    nll, rows = inputs["nll"], inputs["logits"]
    p = torch.exp(-nll.detach())
    kl = scatter_rows(row_kl(rows, inputs["history_logits"]), resp)
    return p * nll + float(options["alpha"]) * kl, {"weight_mean": _masked_mean(p, resp), "kl": _masked_mean(kl, resp)}


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Make ``objective`` available by name to ``TokenSelection(objective=...)``; returns it."""
    OBJECTIVES[objective.name] = objective
    return objective


for _o in (
    Objective("nll", nll_loss, summary="plain SFT: −log p"),
    Objective("dft", dft_loss, summary="DFT: sg(p)·(−log p), normalised by the token count (TRL's dft)"),
    Objective(
        "prob", prob_loss, options={"power": 1.0, "min_p": 0.0, "max_p": 1.0},
        summary="probability objectives: (1 − p^k)/k (k = 1: 1 − p; k = 0: −log p) on tokens with min_p ≤ p ≤ max_p",
    ),
    Objective(
        "eaft", eaft_loss, needs_logits=True, options={"k": 20, "normalizer": 3.0, "alpha": 1.0},
        summary="EAFT: (H_top-k / normalizer)^alpha · (−log p), no gradient through the weight",
    ),
    Objective(
        "otr", otr_loss, needs_logits=True, draws=True, options={"samples": 256, "temperature": 1.5, "penalty": -0.1},
        summary="One-Token Rollout: −(1/K) Σ R(a_k) log π(a_k) over K draws, R = 1 on the ground truth, else penalty",
    ),
    Objective(
        "asft", asft_loss, needs_logits=True, provider_inputs=frozenset({"history_logits"}), options={"alpha": 0.1},
        summary="Anchored SFT: DFT + alpha · KL(π_base ‖ π_θ) over the vocabulary",
    ),
):
    register_objective(_o)


def get_objective(name: str) -> Objective:
    """The objective registered under ``name``, or the ``Objective`` object at a dotted path ``package.module:NAME``."""
    from sstoken_pl.methods import registered

    return registered(name, OBJECTIVES, Objective, "TokenSelection.objective")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def resolve_objective_options(objective: Objective, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The objective's defaults updated with ``options``; unknown keys and out-of-range values are one clear error."""
    options = dict(options or {})
    unknown = sorted(set(options).difference(objective.options))
    if unknown:
        known = ", ".join(sorted(objective.options)) or "none"
        raise ConfigError(
            f"TokenSelection.objective_options: {unknown} are not options of objective {objective.name!r} (known: {known})"
        )
    merged = {**objective.options, **options}
    for key, value in merged.items():
        check = _CHECKS.get((objective.name, key))
        if check is not None:
            merged[key] = check(value, f"TokenSelection.objective_options.{key}")
    return merged


def _at_least(low: float, strict: bool = False) -> Callable[[Any, str], float]:
    def check(value: Any, key: str) -> float:
        v = _number(value, key)
        if v < low or (strict and v == low):
            raise ConfigError(f"{key} must be {'>' if strict else '≥'} {low:g}, got {value!r}")
        return v

    return check


def _count(low: int) -> Callable[[Any, str], int]:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key} must be an integer ≥ {low}, got {value!r}")
        return value

    return check


def _unit(value: Any, key: str) -> float:
    v = _number(value, key)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1], got {value!r}")
    return v


_CHECKS: dict[tuple[str, str], Callable[[Any, str], Any]] = {
    ("prob", "power"): _at_least(0.0),
    ("prob", "min_p"): _unit,
    ("prob", "max_p"): _unit,
    ("eaft", "k"): _count(2),
    ("eaft", "normalizer"): _at_least(0.0, strict=True),
    ("eaft", "alpha"): _at_least(0.0),
    ("otr", "samples"): _count(1),
    ("otr", "temperature"): _at_least(0.0, strict=True),
    ("otr", "penalty"): _number,
    ("asft", "alpha"): _at_least(0.0),
}
