"""``StepProgressBar``: Lightning's Rich progress bar for step-budgeted runs.

With ``max_steps`` and no ``max_epochs`` Lightning's bar reads ``Epoch 0/-2`` (its ``max_epochs - 1`` of an unbounded
run) and shows the logger's version as a float metric (``v_num: 0.000``). This bar names the epoch alone when the
number of epochs is unbounded, shows the optimizer step against ``max_steps`` (``step: 12/30``), and leaves the
version out (it is in the run folder's name). Everything else is Lightning's ``RichProgressBar``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` with ``step: N/max_steps`` and without ``v_num`` (module docstring)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if self.validation_description:
            description = f"{description:{len(self.validation_description)}}"
        return description

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("v_num", None)
        step = f"{trainer.global_step}/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else str(trainer.global_step)
        return {"step": step, **items}
