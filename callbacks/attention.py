"""``AttentionScore``: ssToken's per-token attention mass on the prompt, captured from the training forward."""

from __future__ import annotations

import contextlib

from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sstoken_pl.attention import PromptAttentionProbe, check_chunk_size, check_layer, prompt_key_mask
from sstoken_pl import packing
from sstoken_pl.callbacks.provider import TokenInputProvider
from sstoken_pl.errors import ConfigError


class AttentionScore(TokenInputProvider):
    """Provides, for each training batch, the attention mass each token's query puts on the prompt (``[B, T]``).

    The score comes from one decoder layer of the training forward itself (no extra forward): the layer keeps its
    fast attention (SDPA / flash) and the probe recomputes only the needed softmax rows, chunked and without grad
    (see ``sstoken_pl.attention``). Values are in [0, 1], averaged over heads, aligned with ``labels``, 0 at padding.

    Args:
        layer: the decoder layer (negative counts from the end; ``-1``, the last, as in the paper).
        chunk_size: query positions handled at once; the probe's extra memory is one float32
            ``[B, heads, chunk_size, T]`` buffer.
        model_attr: the attribute of the LightningModule that holds the Hugging Face model (plain or peft-wrapped).

    The probe is installed at fit start (after ``configure_model``), armed at each training batch start while
    ``active`` and removed at teardown. ``TokenSelection`` reads the scores through ``scores(pl_module, batch)`` and
    sets ``active`` to False for the steps whose selection does not use attention (``warmup_steps``, a γ = 1
    phase), so that those steps cost what plain SFT does. It provides the input ``attention`` (``token_input``).
    """

    provides = ("attention",)
    from_training_forward = True  # read after the training forward, never before it

    def __init__(self, layer: int = -1, chunk_size: int = 256, model_attr: str = "model") -> None:
        super().__init__(model_attr)
        self.layer = check_layer(layer, "AttentionScore.layer")
        self.chunk_size = check_chunk_size(chunk_size, "AttentionScore.chunk_size")
        self.active = True  # whether the next training batches capture scores
        self._probe: PromptAttentionProbe | None = None

    # ------------------------------------------------------------------ probe life cycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        model = self.hf_model(pl_module)
        try:
            self._probe = PromptAttentionProbe.install(model, layer=self.layer, chunk_size=self.chunk_size)
        except ConfigError as err:
            raise ConfigError(f"AttentionScore ({type(pl_module).__name__}.{self.model_attr}): {err}") from None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove()

    def _remove(self) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.clear()
        if not self.driven and self.active:  # on its own; a TokenSelection arms it after the other models' forwards
            self.arm(pl_module, batch)

    def arm(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> None:
        """Capture the next forward over this batch (the training forward)."""
        if self._probe is None:
            return
        attention_mask = batch.get("attention_mask")
        prompt = prompt_key_mask(batch["labels"], attention_mask)
        if not packing.is_packed(batch):
            self._probe.arm(prompt, attention_mask)
            return
        # packed rows: the masks in the rows' layout (as the forward's input, flattened for flash attention), and
        # each query's own sample as the only keys it sees
        shape = packing.model_inputs(self.hf_model(pl_module), batch)["input_ids"].shape
        valid = torch.ones_like(batch["labels"], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [packing.to_rows(m, batch, False).view(shape) for m in (prompt, valid)]
        positions = batch[packing.PACKED]["position_ids"].reshape(shape)
        self._probe.arm(rows[0], rows[1], packing.segments(positions))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._probe is not None:
            self._probe.disarm()

    def paused(self) -> contextlib.AbstractContextManager:
        """Within the block, forwards of the model are not captured (``TokenSelection`` runs the history model's
        forward, through the same layers, before the training forward)."""
        return self._probe.paused() if self._probe is not None else contextlib.nullcontext()

    def scores(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``FloatTensor[B, T]`` (float32): this training batch's attention mass on the prompt, per token.

        Available once the training forward has run (e.g. from inside the loss); the same tensor is returned for
        the rest of the batch.
        """
        return self.token_input("attention", pl_module, batch)

    def compute(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self._probe is None:
            raise RuntimeError("AttentionScore.scores: no probe installed (scores exist only during trainer.fit)")
        scores = self._probe.take()
        if packing.is_packed(batch):  # captured on the packed rows: back to the samples view
            scores = packing.to_samples(scores, batch)
        if scores.shape != batch["labels"].shape:
            raise RuntimeError(
                f"AttentionScore.scores: captured scores {tuple(scores.shape)} do not match this batch's labels "
                f"{tuple(batch['labels'].shape)}"
            )
        return scores

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "chunk_size": self.chunk_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the checkpoint's scores came from another layer (``chunk_size`` changes only memory use)."""
        if state_dict.get("layer") != self.layer:
            rank_zero_warn(
                f"AttentionScore: the checkpoint was trained with attention layer {state_dict.get('layer')!r}, this "
                f"run uses layer {self.layer}; continuing with layer {self.layer}"
            )
