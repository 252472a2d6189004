"""The scoring pass of ``TokenSelection(rule=global_threshold)``: one threshold for the whole training set."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from sstoken_pl import selection
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll, response_mask as response_positions, training_precision
from sstoken_pl.methods import CURRENT_INPUTS
from sstoken_pl.models import response_logits


@torch.no_grad()
def global_threshold(selector: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
    """``TokenSelection(rule=global_threshold)``'s scoring pass (TokenCleaning's one threshold): scores the training
    set (unshuffled; the first ``selector.threshold_batches`` batches) with ``selector``'s method and returns
    the threshold that keeps the top ρ of all its response tokens. Every rank scores the same batches, so every
    rank gets the same threshold."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or not hasattr(loader.dataset, "__len__"):
        raise ConfigError("TokenSelection(rule=global_threshold) needs a map-style training DataLoader to score")
    plain = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn)
    total = len(plain) if selector.threshold_batches is None else min(len(plain), selector.threshold_batches)
    needs = selector.method.needs(selector.options)
    model = None
    if needs & set(CURRENT_INPUTS):
        model = getattr(pl_module, getattr(selector._providers.get("history_nll"), "model_attr", "model"))
    chunks = []
    for i, batch in enumerate(plain):
        if i >= total:
            break
        batch = trainer.strategy.batch_to_device(batch)
        resp = response_positions(batch["labels"])
        inputs = {}
        if model is not None:  # in the training step's precision (autocast), as the training forward
            was = model.training
            model.eval()
            try:
                with training_precision(pl_module):
                    logits = response_logits(model, batch)
                    inputs["nll"], inputs["entropy"] = per_token_nll(logits, batch["labels"], with_entropy=True)
            finally:
                model.train(was)
        values = selector._gather(pl_module, batch, inputs, needs)
        scores = selector.method.score(
            values, resp, {**selector.options, "ratio": selector.ratio}, torch.Generator().manual_seed(selector.seed + i)
        )
        chunks.append(scores[resp & torch.isfinite(scores)].float().cpu())
    threshold = selection.ratio_threshold(torch.cat(chunks), selector.ratio)
    rank_zero_info(
        f"TokenSelection: global threshold {threshold:.4g} keeps the top {selector.ratio:.0%} of "
        f"{sum(c.numel() for c in chunks)} response tokens ({total} batches scored)"
    )
    return threshold
