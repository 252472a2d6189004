"""``SequenceEntropy``: the current model's predictive entropy at every attended position (prompt and response)."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from sstoken_pl import packing
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import _CHUNK_ELEMENTS
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


class SequenceEntropy(Callback):
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
        if not isinstance(model_attr, str) or not model_attr:
            raise ConfigError(f"SequenceEntropy.model_attr must be a non-empty attribute name, got {model_attr!r}")
        self.model_attr = model_attr
        self._handle = None
        self._head: torch.nn.Module | None = None
        self._armed = False
        self._hidden: torch.Tensor | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"SequenceEntropy: {type(pl_module).__name__}.{self.model_attr} is not a Hugging Face model (got "
                f"{type(model).__name__}); set SequenceEntropy(model_attr=...) to the attribute that holds it"
            )
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
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._armed, self._hidden, self._cache = False, None, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._armed, self._hidden, self._cache = True, None, None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._armed, self._hidden, self._cache = False, None, None

    def token_input(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The provider protocol of ``TokenSelection``, after the training forward (the last forward the hook saw)."""
        if name not in self.provides:
            raise KeyError(f"SequenceEntropy provides {', '.join(self.provides)}, not {name!r}")
        attended = attended_positions(batch)
        if name == "attended":
            return attended.float()
        key = batch["labels"]
        if self._cache is not None and self._cache[0] is key:
            return self._cache[1]
        if self._hidden is not None and packing.is_packed(batch):  # the packed forward's rows → the samples view
            self._hidden = packing.to_samples(self._hidden, batch)
        if self._hidden is None or self._hidden.shape[:2] != key.shape:
            raise RuntimeError("SequenceEntropy: no hidden states of this training batch (is the hook installed?)")
        entropy = entropy_at(self._hidden, self._head, attended)
        self._cache = (key, entropy)
        return entropy
