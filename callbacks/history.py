"""``HistoryModel``: the per-token NLL of ssToken's history model for each training batch."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.func import functional_call
from torch.optim.swa_utils import get_ema_multi_avg_fn

from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll

Mode = Literal["base", "snapshot", "ema"]


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def hf_model(pl_module: pl.LightningModule, model_attr: str) -> torch.nn.Module:
    """The Hugging Face model a callback works on: ``getattr(pl_module, model_attr)``, with a clear error."""
    model = getattr(pl_module, model_attr, None)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"{type(pl_module).__name__}.{model_attr} is not a torch module (got {type(model).__name__}); "
            f"set the callback's model_attr to the attribute that holds the Hugging Face model"
        )
    return model


class HistoryModel(Callback):
    """Provides the history model's per-token NLL (no grad, eval mode) for each training batch.

    Args:
        mode: ``"base"``: the model as it was before training (the paper's main setting). With LoRA this is the same
            model with its adapters disabled: no second copy in memory. Without LoRA, a copy of the weights taken at
            fit start. ``"snapshot"``: a copy of the trainable weights refreshed every ``snapshot_every`` optimizer
            steps. ``"ema"``: ``θ_his ← α·θ_his + (1 − α)·θ`` after every optimizer step, ``α = ema_decay``.
            With LoRA, snapshot/EMA hold and average only the adapter weights.
        ema_decay: α of the EMA, in [0, 1).
        snapshot_every: optimizer steps between snapshot refreshes (≥ 1).
        model_attr: the attribute of the LightningModule that holds the Hugging Face model.

    Its state (weights, step counter) goes into Lightning checkpoints, so a resumed run continues exactly. The EMA
    is kept in float32 whatever the parameters' dtype (a bf16 average would round small updates away).

    It provides the input ``history_nll`` to ``TokenSelection`` (``token_input``), computed only when a method asks.
    """

    provides = ("history_nll",)

    def __init__(
        self,
        mode: Mode = "base",
        ema_decay: float = 0.99,
        snapshot_every: int = 100,
        model_attr: str = "model",
    ) -> None:
        if mode not in ("base", "snapshot", "ema"):
            raise ConfigError(f"HistoryModel.mode must be 'base', 'snapshot' or 'ema', got {mode!r}")
        if not (0.0 <= ema_decay < 1.0):
            raise ConfigError(f"HistoryModel.ema_decay must be in [0, 1), got {ema_decay!r}")
        if int(snapshot_every) != snapshot_every or snapshot_every < 1:
            raise ConfigError(f"HistoryModel.snapshot_every must be a positive integer, got {snapshot_every!r}")
        self.mode = mode
        self.ema_decay = float(ema_decay)
        self.snapshot_every = int(snapshot_every)
        self.model_attr = model_attr
        self._weights: dict[str, torch.Tensor] | None = None  # history values of the trainable parameters
        self._last_step = 0  # trainer.global_step at the last update
        self._pending: dict[str, Any] | None = None  # state loaded from a checkpoint, applied at fit start
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (the batch's input_ids, its NLL)

    # ------------------------------------------------------------------ setup
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start, not on_fit_start: it runs after the checkpoint is restored for every strategy (FSDP and
        # DeepSpeed restore after on_fit_start).
        model = hf_model(pl_module, self.model_attr)
        if self._pending is not None:
            self._restore(model, self._pending)
            self._pending = None
        elif self._weights is None and self._needs_weights(model):
            self._weights = {n: self._master(p) for n, p in self._trainable(model)}
            self._last_step = trainer.global_step

    def _master(self, tensor: torch.Tensor) -> torch.Tensor:
        """The stored copy of a weight: float32 for the EMA, the parameter's own dtype otherwise."""
        tensor = tensor.detach()
        return tensor.float().clone() if self.mode == "ema" and tensor.is_floating_point() else tensor.clone()

    def _needs_weights(self, model: torch.nn.Module) -> bool:
        return not (self.mode == "base" and is_peft_model(model))

    @staticmethod
    def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in model.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------ updates
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._cache = None
        if trainer.global_step <= self._last_step or self._weights is None:
            return  # no optimizer step since the last update (gradient accumulation), or nothing to update
        model = hf_model(pl_module, self.model_attr)
        current = dict(self._trainable(model))
        names = list(self._weights)
        with torch.no_grad():
            if self.mode == "ema":
                # float32 history of low-precision weights: one tensor at a time (no full-model float copy)
                same = [n for n in names if current[n].dtype == self._weights[n].dtype]
                if same:
                    get_ema_multi_avg_fn(self.ema_decay)(
                        [self._weights[n] for n in same], [current[n].detach() for n in same], None
                    )
                for n in set(names).difference(same):
                    self._weights[n].lerp_(current[n].detach().float(), 1.0 - self.ema_decay)
            elif self.mode == "snapshot" and trainer.global_step % self.snapshot_every == 0:
                for n in names:
                    self._weights[n].copy_(current[n].detach())
        self._last_step = trainer.global_step

    # ------------------------------------------------------------------ the provided quantity
    @contextlib.contextmanager
    def history_weights(self, model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, ``model`` computes as the history model; yields the parameter overrides to pass to
        ``torch.func.functional_call`` (empty for LoRA base: adapters are disabled instead)."""
        if self._weights is None:
            if not (self.mode == "base" and is_peft_model(model)):
                raise RuntimeError("HistoryModel has no history weights yet: it is set up at train start")
            with model.disable_adapter():
                yield {}
        else:
            params = dict(model.named_parameters())
            yield {n: w if w.dtype == params[n].dtype else w.to(params[n].dtype) for n, w in self._weights.items()}

    @torch.no_grad()
    def history_nll(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``FloatTensor[B, T]``: the history model's per-token NLL of this batch (aligned with ``labels``).

        Computed once per training batch (one extra forward, no grad, eval mode) and cached until the batch ends.
        """
        key = batch["input_ids"]
        if self._cache is not None and self._cache[0] is key:
            return self._cache[1]
        model = hf_model(pl_module, self.model_attr)
        was_training = model.training
        model.eval()
        try:
            with self.history_weights(model) as overrides:
                kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
                if overrides:
                    out = functional_call(model, overrides, args=(), kwargs=kwargs, strict=False)
                else:
                    out = model(**kwargs)
            nll = per_token_nll(out.logits, batch["labels"])
        finally:
            model.train(was_training)
        self._cache = (key, nll)
        return nll

    def token_input(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The provider protocol of ``TokenSelection``: ``history_nll`` for this batch."""
        if name != "history_nll":
            raise KeyError(f"HistoryModel provides history_nll, not {name!r}")
        return self.history_nll(pl_module, batch)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "ema_decay": self.ema_decay,
            "snapshot_every": self.snapshot_every,
            "last_step": self._last_step,
            "weights": None if self._weights is None else {n: w.detach().clone() for n, w in self._weights.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode") != self.mode:
            raise ConfigError(
                f"HistoryModel: the checkpoint's history model is mode={state_dict.get('mode')!r}, "
                f"this run asks for mode={self.mode!r}"
            )
        self._pending = dict(state_dict)

    def _restore(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        self._last_step = int(state["last_step"])
        weights = state["weights"]
        if weights is None:
            self._weights = None
            return
        current = dict(self._trainable(model))
        missing = sorted(set(current) ^ set(weights))
        if missing:
            raise ConfigError(
                f"HistoryModel: the checkpoint's history weights do not match the model's trainable parameters "
                f"(e.g. {missing[:3]})"
            )
        self._weights = {n: self._master(weights[n].to(device=p.device)) for n, p in current.items()}

    @property
    def num_history_parameters(self) -> int:
        """Elements held for the history model (0 for LoRA ``base``: it reuses the model with adapters off)."""
        return 0 if self._weights is None else sum(w.numel() for w in self._weights.values())
