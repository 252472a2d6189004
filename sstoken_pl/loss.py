"""The loss contract: per-token NLL aligned with ``labels`` and the one loss function every module calls.

HF label convention: ``labels[b, i]`` is the target at position ``i`` (a copy of ``input_ids[b, i]`` on response
tokens, ``-100`` elsewhere); it is predicted from ``logits[b, i - 1]``. Every per-token tensor here is ``[B, T]``
and aligned with ``labels``: position ``i`` holds the quantity for target ``labels[b, i]``. Position 0 is never
a response position (nothing predicts it).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Literal, Mapping, Protocol, runtime_checkable

import torch

from sstoken_pl.row_nll import FUSED_CROSS_ENTROPY, HeadRows, check_fused_cross_entropy, row_nll  # noqa: F401 (public names)

IGNORE_INDEX = -100


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[B, T]``: the positions whose target is trained on (``labels != -100``, position 0 excluded)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[B, T]``: the positions whose *next* token is a trained target (``response_mask`` shifted left by
    one): the rows of hidden states the LM head is needed at. Pass it to a Hugging Face causal LM as
    ``logits_to_keep`` to get the logits of those rows only, flattened to ``[N, V]`` (``response_logits``)."""
    valid = labels != IGNORE_INDEX
    keep = torch.zeros_like(valid)
    keep[:, :-1] = valid[:, 1:]
    return keep


def per_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None, with_entropy: bool = False
):
    """``FloatTensor[B, T]`` (float32): NLL of target ``labels[b, i]`` under the logits predicting it; 0 where
    ignored.

    ``logits`` is either the full ``[B, T, V]`` (position ``i - 1`` predicts ``labels[b, i]``) or only the rows
    that predict a target, ``[N, V]`` in row-major order, as ``response_logits`` returns them (a Hugging Face model
    called with ``logits_to_keep=prediction_mask(labels)``): the cheap path, which never computes the LM head at
    prompt or padding positions; or ``HeadRows`` (``response_logits(..., fused=...)``), whose NLL comes from a fused
    linear cross-entropy that never holds the ``[N, V]`` logits. Differentiable with respect to ``logits`` (or the
    hidden states and head); no float32 copy of all logits is made. With ``with_entropy=True`` returns ``(nll, entropy)``: the predictive entropy of each position's
    next-token distribution (aligned the same way, 0 where ignored, not differentiable), from the same pass.
    """
    B, T = labels.shape
    valid = response_mask(labels)
    if isinstance(logits, HeadRows):
        pass
    elif logits.dim() == 3:
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"per_token_nll: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
        logits = logits[:, :-1][valid[:, 1:]]  # the predicting rows: [N, V]
    elif logits.dim() != 2:
        raise ValueError(f"per_token_nll: logits must be [B, T, V] or response rows [N, V], got {tuple(logits.shape)}")
    # N, the number of targets, is the logits' row count (known on the host): the targets are gathered without a
    # device-to-host sync, and the count is checked asynchronously on an accelerator.
    n = logits.shape[0]
    count = valid.sum()
    if valid.device.type == "cpu":
        if int(count) != n:
            raise ValueError(
                f"per_token_nll: {n} rows of logits for {int(count)} response targets; row logits must come from "
                f"logits_to_keep=prediction_mask(labels) of the same labels"
            )
    else:
        torch._assert_async(count == n, "per_token_nll: row logits do not match the labels' response targets")
    targets = labels.flatten()[torch.nonzero_static(valid.flatten(), size=n).squeeze(-1)]
    out = row_nll(logits, targets, with_entropy, chunk_size)
    rows, entropy = out if with_entropy else (out, None)
    nll = torch.zeros(B, T, dtype=torch.float32, device=logits.device).masked_scatter(valid, rows)
    if not with_entropy:
        return nll
    return nll, torch.zeros(B, T, dtype=torch.float32, device=logits.device).masked_scatter(valid, entropy)


LossNormalization = Literal["step", "micro_batch"]
LOSS_NORMALIZATIONS = ("step", "micro_batch")


class StepTokenMean:
    """Makes the training loss the mean NLL over all kept tokens of the optimizer step: every micro-batch of a
    gradient-accumulation window and every rank weigh each kept token alike (``loss_normalization: step``).

    Each micro-batch's loss keeps the value of its own mean (for logging) but the gradient of its *sum*, and its kept
    count is added up; at ``finish`` (``on_before_optimizer_step``, after the last backward and before gradient
    clipping) the count is all-reduced once and the gradients are scaled by ``A·W / N`` (``A``: accumulation steps,
    which Lightning divides each loss by; ``W``: ranks, which DDP/FSDP average over; ``N``: kept tokens of the step
    on all ranks) — the token-weighted mean, as current Hugging Face training computes it. No host sync.
    Assumes Lightning's automatic optimization (``token_loss`` falls back to the per-micro-batch mean otherwise).
    """

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None

    def loss(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        count = count.detach().float()
        self.count = count if self.count is None else self.count + count
        mean = (total / count.clamp(min=1e-12)).detach()
        return total - total.detach() + torch.where(count > 0, mean, torch.zeros_like(mean))

    def mark(self) -> torch.Tensor | None:
        """The kept count so far in this step; ``rewind(mark)`` returns to it."""
        return self.count

    def rewind(self, mark: torch.Tensor | None) -> None:
        """Forget the micro-batches counted since ``mark``: a micro-batch skipped without backward (non-finite loss)
        must not dilute the step's token mean, or the other micro-batches' gradients are under-scaled."""
        self.count = mark

    def finish(self, trainer: Any, optimizer: Any) -> None:
        if self.count is None:
            return  # nothing went through this owner in this step
        count, self.count = self.count, None
        total = trainer.strategy.reduce(count, reduce_op="sum") if trainer.world_size > 1 else count
        scale = trainer.accumulate_grad_batches * trainer.world_size / total.clamp(min=1.0)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device))


def check_loss_normalization(value: str, name: str) -> str:
    if value not in LOSS_NORMALIZATIONS:
        from sstoken_pl.errors import ConfigError

        raise ConfigError(f"{name} must be 'step' or 'micro_batch', got {value!r}")
    return value


@runtime_checkable
class TokenSelector(Protocol):
    """What ``token_loss`` asks of a selection callback (``sstoken_pl.callbacks.TokenSelection`` implements it).

    ``current_inputs``: the names of the inputs it needs from the current forward, a subset of ``("nll",
    "entropy")`` (entropy is computed only when asked for). ``select`` returns the kept-token ``BoolTensor[B, T]``
    or per-token float weights ``[B, T]`` for this training batch.
    """

    @property
    def current_inputs(self) -> frozenset[str]: ...

    def select(
        self,
        pl_module: Any,
        batch: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        response_mask: torch.Tensor,
    ) -> torch.Tensor: ...


_SELECTOR = "_sstoken_selector"


def register_selector(trainer: Any, selector: Any) -> None:
    """Remember ``selector`` as the trainer's token selector (``TokenSelection`` does at fit start)."""
    setattr(trainer, _SELECTOR, (trainer.callbacks, len(trainer.callbacks), selector))


def token_selector(pl_module: Any) -> TokenSelector | None:
    """The token selector attached to the module's trainer (a callback implementing ``TokenSelector``), if any:
    found once per trainer (again only if its callbacks list changes), not on every call."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        return None
    found = getattr(trainer, _SELECTOR, None)
    if found is None or found[0] is not trainer.callbacks or found[1] != len(trainer.callbacks):
        selector = next((cb for cb in trainer.callbacks if isinstance(cb, TokenSelector)), None)
        register_selector(trainer, selector)
        return selector
    return found[2]


def step_token_mean(pl_module: Any) -> StepTokenMean | None:
    """The ``StepTokenMean`` that ``token_loss`` counts this module's kept tokens in (the selector's, or without one
    the module's), or None when the loss is a per-micro-batch mean (``loss_normalization: micro_batch``, manual
    optimization, no trainer)."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or not getattr(pl_module, "automatic_optimization", True):
        return None
    selector = token_selector(pl_module)
    owner = selector if selector is not None else pl_module
    step = getattr(owner, "token_step", None)
    if isinstance(step, StepTokenMean) and getattr(owner, "loss_normalization", None) == "step":
        return step
    return None


def training_precision(pl_module: Any) -> ContextManager:
    """The context the training step's forward runs in (the precision plugin's: autocast under ``bf16-mixed`` /
    ``16-mixed``). Forwards of other models (history, reference) and scoring passes run in it too, so that their
    per-token NLL differs from the current model's by the weights only, not by rounding (REL ≡ 0 at lr 0)."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        return contextlib.nullcontext()
    return trainer.strategy.precision_plugin.train_step_context()


def response_rows(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """The rows of logits that predict a response target, ``[N, V]`` (row-major over the response positions):
    ``logits`` as it is when it already is rows, else the predicting rows of ``[B, T, V]``."""
    if isinstance(logits, HeadRows):
        from sstoken_pl.errors import ConfigError

        raise ConfigError(
            "the objective needs the response rows of logits, which a fused cross-entropy never holds: set "
            "model.fused_cross_entropy: null"
        )
    if logits.dim() == 2:
        return logits
    return logits[:, :-1][response_mask(labels)[:, 1:]]


def token_loss(pl_module: Any, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """The training loss of every module, ours or a user's: ``Σ c·d·ℓ / Σ c`` over the response tokens.

    ``logits``: the model's ``[B, T, V]`` logits, or — cheaper — only the rows that predict a response token,
    ``[N, V]``: ``sstoken_pl.models.response_logits(model, batch)``, i.e. a Hugging Face causal LM called with
    ``logits_to_keep=prediction_mask(batch["labels"])``, which applies the LM head at those rows only.

    - ``c``: which tokens count, and how much. With no token selector (``TokenSelection``) on the trainer, or outside
      training, every response token (plain SFT). With one, its mask or weights, computed from this batch's
      per-token inputs before backward.
    - ``ℓ``: each token's loss: the NLL, or the selector's objective (``sstoken_pl.objectives``: DFT, EAFT, …).
    - ``d``: the weights given by the data (``batch["token_weights"]``, aligned with ``labels``), in training only:
      they scale each token's loss, and the normaliser still counts tokens (ms-swift's ``loss_scale`` divides by
      the number of supervised tokens too), so weights of 2 double a turn's pull and do not renormalise the rest.

    A batch with no counted token gives a zero loss (with a graph), never NaN.

    The mean is over the counted tokens of the whole optimizer step (all micro-batches, all ranks: ``StepTokenMean``)
    when the selector — or, without one, the module — has ``loss_normalization == "step"`` (the default of
    ``TokenSelection`` and ``SFTModule``); otherwise, and in a module of your own without a selector, over the
    micro-batch (the authors' choice: ``loss_normalization: micro_batch``). The returned value is always the
    micro-batch's mean, for logging.
    """
    labels = batch["labels"]
    mask = response_mask(labels)
    selector = token_selector(pl_module)
    trainer = getattr(pl_module, "_trainer", None)
    training = pl_module.training and trainer is not None and trainer.training
    if selector is None or not training:
        nll = per_token_nll(logits, labels)
        weights, per_token = mask.to(nll.dtype), nll
    else:
        needs = selector.current_inputs
        rows = response_rows(logits, labels) if "logits" in needs else None  # before the NLL: fail fast if fused
        if "entropy" in needs:
            nll, entropy = per_token_nll(logits, labels, with_entropy=True)
            inputs = {"nll": nll, "entropy": entropy}
        else:
            nll = per_token_nll(logits, labels)
            inputs = {"nll": nll}
        weights = selector.select(pl_module, batch, inputs, mask).to(nll.dtype)
        per_token = nll
        objective_loss = getattr(selector, "objective_loss", None)
        if objective_loss is not None:
            if rows is not None:
                inputs["logits"] = rows
            per_token = objective_loss(pl_module, batch, inputs, weights, mask)
            if isinstance(per_token, tuple):  # the objective counts only some tokens (probability thresholds)
                per_token, keep = per_token
                weights = weights * keep.to(weights.dtype)
    data = batch.get("token_weights") if training else None
    if data is not None:  # scales each token's loss; the normaliser still counts tokens (as ms-swift's loss_scale)
        per_token = per_token * data.to(per_token.dtype)
    total, count = (per_token * weights).sum(), weights.sum()
    step = step_token_mean(pl_module) if training else None
    if step is not None:
        return step.loss(total, count)
    return total / torch.where(count > 0, count, torch.ones_like(count))
