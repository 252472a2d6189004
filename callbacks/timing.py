"""``StepTimer``: seconds per optimizer step, logged as ``time/step`` (for comparing methods' cost in one run)."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class StepTimer(Callback):
    """Logs ``time/step``: the wall time of each optimizer step (all its micro-batches: forward, selection,
    backward, optimizer), after ``warmup`` untimed steps. CUDA is synchronised at both ends when used.

    Args:
        warmup: optimizer steps not logged at the start of the run (allocator, caches, lazy initialisation).
    """

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = int(warmup)
        self._start: float | None = None
        self._step = 0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:  # the first micro-batch of an optimizer step
            self._sync(pl_module)
            self._start = time.perf_counter()
            self._step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._start is None or trainer.global_step == self._step:
            return  # gradient accumulation: the step goes on
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        self._start = None
        if self._step >= self.warmup:
            pl_module.log("time/step", elapsed, on_step=True, on_epoch=False)
