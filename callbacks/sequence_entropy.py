"""``SequenceEntropy``: the current model's predictive entropy at every attended position (prompt and response)."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch

from sstoken_pl import packing
from sstoken_pl.callbacks.provider import TokenInputProvider
from sstoken_pl.errors import ConfigError
from sstoken_pl.row_nll import _CHUNK_ELEMENTS
from sstoken_pl.models import fused_head_problem, unwrap


def attended_positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``BoolTensor[B, T]`` aligned with ``labels``: the attended positions whose token is predicted (position 0
    excluded: nothing predicts it). Without an ``attention_mask``, every position."""
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    att = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    att = att.clone()
    att[:, 0] = False
    return att


@torch.no_grad()
def entropy_at(hidden: torch.Tensor, head: torch.nn.Module, attended: torch.Tensor) -> torch.Tensor:
    """``FloatTensor[B, T]`` (float32): the entropy of ``softmax(head(hidden[b, i − 1]))`` at each attended
    position ``i`` (aligned with ``labels``), 0 elsewhere; the head is applied chunk by chunk to those rows only."""
    B, T = attended.shape
    out = torch.zeros(B, T, dtype=torch.float32, device=hidden.device)
    rows = hidden[:, :-1][attended[:, 1:]]
    if rows.shape[0] == 0:
        return out
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else 1
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    values = []
    for s in range(0, rows.shape[0], chunk):
        x = head(rows[s : s + chunk]).float()
        lse = torch.logsumexp(x, dim=-1)
        values.append(lse - ((x - lse[:, None]).exp() * x).sum(-1))
    return out.masked_scatter(attended, torch.cat(values))


class SequenceEntropy(TokenInputProvider):
    """Provides ``sequence_entropy`` (the predictive entropy at every attended position of the training batch,
    prompt included) and ``attended`` (those positions, as 0/1) — Q-Tuning's uncertainty axis as the authors' code
    computes it (``sstoken_pl.qtuning``).

    No extra forward: a hook on the decoder keeps the training forward's final hidden states (detached), and the
    LM head is applied, without grad, to the rows the loss does not already need (``logits_to_keep`` skips the
    prompt's). Cost: one no-grad LM-head matmul over the prompt rows per step.

    Args:
        model_attr: the attribute of the LightningModule that holds the Hugging Face model (plain or peft-wrapped).
    """

    provides = ("sequence_entropy", "attended")
    from_training_forward = True  # read after the training forward, never before it

    def __init__(self, model_attr: str = "model") -> None:
        super().__init__(model_attr)
        self._handle = None
        self._head: torch.nn.Module | None = None
        self._armed = False
        self._hidden: torch.Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        model = self.hf_model(pl_module)
        base = unwrap(model)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if decoder is None or head is None or decoder is base:
            raise ConfigError(
                f"SequenceEntropy: {type(base).__name__} has no separate decoder and LM head (get_decoder, "
                f"get_output_embeddings); it needs a Hugging Face causal LM"
            )
        problem = fused_head_problem(model)
        if problem and "after the LM head" in problem:
            raise ConfigError(f"SequenceEntropy: {problem}; its entropy cannot be taken from the head alone")
        self._head = head
        self._handle = decoder.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._armed:
            hidden = getattr(output, "last_hidden_state", None)
            self._hidden = (hidden if hidden is not None else output[0]).detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._armed, self._hidden = False, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.clear()
        if not self.driven:  # on its own; a TokenSelection arms it after the other models' forwards
            self._armed, self._hidden = True, None

    def arm(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> None:
        """Keep the hidden states of the next forward (the training forward)."""
        self._armed, self._hidden = True, None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._armed, self._hidden = False, None

    def compute(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """After the training forward (the last forward the hook saw while armed)."""
        attended = attended_positions(batch)
        if name == "attended":
            return attended.float()
        hidden = self._hidden
        if hidden is not None and packing.is_packed(batch):  # the packed forward's rows → the samples view
            hidden = packing.to_samples(hidden, batch)
        if hidden is None or hidden.shape[:2] != batch["labels"].shape:
            raise RuntimeError("SequenceEntropy: no hidden states of this training batch (is the hook installed?)")
        return entropy_at(hidden, self._head, attended)
