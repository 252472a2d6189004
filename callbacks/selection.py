"""``TokenSelection``: turns the providers' per-token quantities into the mask ``sstoken_pl.token_loss`` applies."""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from sstoken_pl.errors import ConfigError
from sstoken_pl.selection import check_gamma, check_ratio, global_top_ratio_mask, sstoken_scores, top_ratio_mask


class TokenSelection(Callback):
    """Keeps, per sample, the top ``⌈ratio · R⌉`` response tokens by ssToken's score, before backward.

    ``score = gamma · minmax(REL) + (1 − gamma) · attn``, ``REL = L_history − L_current`` (from ``HistoryModel``),
    ``attn`` from ``AttentionScore``. ``gamma=1``: REL only (no ``AttentionScore`` needed); ``gamma=0``: attention
    only (no ``HistoryModel`` needed).

    Args:
        ratio: ρ, the share of response tokens kept, in (0, 1].
        gamma: γ, the weight of REL against the attention score, in [0, 1].
        warmup_steps: optimizer steps of plain SFT (all response tokens) before selection starts.
        granularity: ``"sample"`` ranks within each sample (the paper); ``"batch"`` ranks all response tokens of
            the batch together (one threshold).
        log_samples_every: every this many optimizer steps, log a few decoded samples with dropped tokens marked
            ``[-like this-]`` (TensorBoard text, or ``selection_samples.txt`` in the run directory); 0 turns it off.
        num_log_samples: how many samples of the batch to log each time.
    """

    def __init__(
        self,
        ratio: float = 0.6,
        gamma: float = 0.5,
        warmup_steps: int = 0,
        granularity: Literal["sample", "batch"] = "sample",
        log_samples_every: int = 0,
        num_log_samples: int = 2,
    ) -> None:
        self.ratio = check_ratio(ratio, "TokenSelection.ratio")
        self.gamma = check_gamma(gamma, "TokenSelection.gamma")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ConfigError(f"TokenSelection.warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        if granularity not in ("sample", "batch"):
            raise ConfigError(f"TokenSelection.granularity must be 'sample' or 'batch', got {granularity!r}")
        if int(log_samples_every) != log_samples_every or log_samples_every < 0:
            raise ConfigError(f"TokenSelection.log_samples_every must be ≥ 0, got {log_samples_every!r}")
        if int(num_log_samples) != num_log_samples or num_log_samples < 1:
            raise ConfigError(f"TokenSelection.num_log_samples must be ≥ 1, got {num_log_samples!r}")
        self.warmup_steps = int(warmup_steps)
        self.granularity = granularity
        self.log_samples_every = int(log_samples_every)
        self.num_log_samples = int(num_log_samples)
        self._history = None
        self._attention = None
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # ids, response, kept
        self._log_dir: str | None = None
        self._logged_step = -1  # under gradient accumulation, log each optimizer step's samples once

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from sstoken_pl.callbacks.attention import AttentionScore
        from sstoken_pl.callbacks.history import HistoryModel

        def find(kind: type) -> Any:
            return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)

        self._log_dir = trainer.log_dir  # on every rank: under DDP, log_dir is a collective call
        self._history = find(HistoryModel) if self.gamma > 0 else None
        self._attention = find(AttentionScore) if self.gamma < 1 else None
        if self.gamma > 0 and self._history is None:
            raise ConfigError(
                f"TokenSelection(gamma={self.gamma}) needs a HistoryModel callback for REL: add "
                f"sstoken_pl.callbacks.HistoryModel to trainer.callbacks, or set gamma=0 (attention only)"
            )
        for unused, why in ((find(HistoryModel), self.gamma == 0), (find(AttentionScore), self.gamma == 1)):
            if unused is not None and why:
                rank_zero_warn(
                    f"TokenSelection(gamma={self.gamma}) does not use {type(unused).__name__}; remove it from "
                    f"trainer.callbacks to save its cost"
                )
        if self.gamma < 1 and self._attention is None:
            raise ConfigError(
                f"TokenSelection(gamma={self.gamma}) needs an AttentionScore callback for the attention score: add "
                f"sstoken_pl.callbacks.AttentionScore to trainer.callbacks, or set gamma=1 (REL only)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_attention_active(trainer.global_step)  # after a resume has restored global_step

    def _set_attention_active(self, step: int) -> None:
        """The attention score is captured only for batches that select (not during warm-up)."""
        if self._attention is not None:
            self._attention.active = step >= self.warmup_steps

    def select(
        self,
        pl_module: pl.LightningModule,
        batch: Mapping[str, torch.Tensor],
        token_nll: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The kept-token mask for this training batch (called by ``sstoken_pl.token_loss``)."""
        trainer = pl_module.trainer
        n_resp = response_mask.sum().clamp(min=1)
        if trainer.global_step < self.warmup_steps:
            self._log(pl_module, {"selection/kept_fraction": torch.ones(())})
            return response_mask
        history = self._history.history_nll(pl_module, batch) if self._history is not None else None
        attention = self._attention.scores(pl_module, batch) if self._attention is not None else None
        scores = sstoken_scores(token_nll, history, attention, response_mask, self.gamma)
        rank = top_ratio_mask if self.granularity == "sample" else global_top_ratio_mask
        kept = rank(scores, response_mask, self.ratio)

        stats = {"selection/kept_fraction": kept.sum() / n_resp}
        if history is not None:
            rel = history - token_nll.detach()
            stats["selection/rel_mean"] = (rel * response_mask).sum() / n_resp
        if attention is not None:
            stats["selection/attn_mean"] = (attention * response_mask).sum() / n_resp
        self._log(pl_module, stats)
        if self.log_samples_every:
            self._last = (batch["input_ids"].detach(), response_mask.detach(), kept.detach())
        return kept

    @staticmethod
    def _log(pl_module: pl.LightningModule, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            pl_module.log(name, value.float(), on_step=True, on_epoch=False, prog_bar=name.endswith("kept_fraction"))

    # ------------------------------------------------------------------ decoded samples
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # after this batch's optimizer step (if any): the next batch's step
        self._set_attention_active(step)
        last, self._last = self._last, None
        if last is None or step % self.log_samples_every or step == self._logged_step or not trainer.is_global_zero:
            return
        self._logged_step = step
        tokenizer = getattr(pl_module, "tokenizer", None) or getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        samples = [
            render_selection(tokenizer, ids, resp, kept) for ids, resp, kept in zip(*last) if resp.any()
        ][: self.num_log_samples]
        body = f"step {trainer.global_step}\n" + "\n---\n".join(samples)
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("selection/samples", body.replace("\n", "  \n"), trainer.global_step)
        elif self._log_dir is not None:
            os.makedirs(self._log_dir, exist_ok=True)
            with open(os.path.join(self._log_dir, "selection_samples.txt"), "a", encoding="utf-8") as f:
                f.write(body + "\n\n")

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "gamma": self.gamma, "warmup_steps": self.warmup_steps, "granularity": self.granularity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = {k: (v, getattr(self, k)) for k, v in state_dict.items() if getattr(self, k, v) != v}
        if changed:
            rank_zero_warn(f"TokenSelection: resuming with other settings than the checkpoint's (was, now): {changed}")


def render_selection(tokenizer: Any, input_ids: torch.Tensor, response: torch.Tensor, kept: torch.Tensor) -> str:
    """The response of one sample as text, dropped tokens wrapped as ``[-token-]``."""
    pieces: list[str] = []
    dropped_run: list[int] = []
    kept_run: list[int] = []

    def flush() -> None:
        if kept_run:
            pieces.append(tokenizer.decode(kept_run))
            kept_run.clear()
        if dropped_run:
            pieces.append("[-" + tokenizer.decode(dropped_run) + "-]")
            dropped_run.clear()

    for tok, is_resp, is_kept in zip(input_ids.tolist(), response.tolist(), kept.tolist()):
        if not is_resp:
            continue
        if is_kept:
            if dropped_run:
                flush()
            kept_run.append(tok)
        else:
            if kept_run:
                flush()
            dropped_run.append(tok)
    flush()
    return "".join(pieces)
