"""``HistoryModel``: the per-token NLL of ssToken's history model for each training batch."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Mapping, Optional

import lightning.pytorch as pl
import torch
from torch.func import functional_call
from torch.optim.swa_utils import get_ema_multi_avg_fn

from sstoken_pl import sharding
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll, response_mask, response_rows, training_precision
from sstoken_pl.models import response_logits
from sstoken_pl.callbacks.provider import TokenInputProvider
from sstoken_pl.token_cache import SampleCache

Mode = Literal["base", "snapshot", "ema"]


def _index(batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """The batch's sample indices, which a score store is read by."""
    index = batch.get("index")
    if index is None:
        raise ConfigError(f"{key}: the batches carry no 'index' (SFTDataModule's do), so stored scores cannot be read")
    return index


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class HistoryModel(TokenInputProvider):
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
        scores: ``base`` mode only: a score store of the base model (``python -m sstoken_pl score``) to read each
            batch's NLL from, by ``batch["index"]``, with no forward (and, without LoRA, no copy of the weights);
            refused when it was made for another model, data, tokenizer, template, length or precision.
        cache: ``base`` mode only: keep each training sample's history NLL (CPU, 4 bytes per response token) so
            that later epochs skip the extra forward (``sstoken_pl.token_cache``; needs ``batch["index"]``, which
            ``SFTDataModule`` provides).

    Its state (weights, step counter) goes into Lightning checkpoints, so a resumed run continues exactly. The EMA
    is kept in float32 whatever the parameters' dtype (a bf16 average would round small updates away).

    It provides the inputs ``history_nll`` (per-token NLL) and ``history_logits`` (the history model's logits at the
    rows that predict a response token, ``[N, V]``: the anchor distribution of ``asft``) to ``TokenSelection``
    (``token_input``), each computed only when a method or objective asks, from one forward when both are asked.
    """

    provides = ("history_nll", "history_logits")

    def __init__(
        self,
        mode: Mode = "base",
        ema_decay: float = 0.99,
        snapshot_every: int = 100,
        model_attr: str = "model",
        cache: bool = True,
        scores: Optional[str] = None,
    ) -> None:
        super().__init__(model_attr)
        if mode not in ("base", "snapshot", "ema"):
            raise ConfigError(f"HistoryModel.mode must be 'base', 'snapshot' or 'ema', got {mode!r}")
        if not (0.0 <= ema_decay < 1.0):
            raise ConfigError(f"HistoryModel.ema_decay must be in [0, 1), got {ema_decay!r}")
        if int(snapshot_every) != snapshot_every or snapshot_every < 1:
            raise ConfigError(f"HistoryModel.snapshot_every must be a positive integer, got {snapshot_every!r}")
        self.mode = mode
        self.ema_decay = float(ema_decay)
        self.snapshot_every = int(snapshot_every)
        if scores is not None and mode != "base":
            raise ConfigError(f"HistoryModel.scores holds a fixed model's values: only mode base reads it, not {mode!r}")
        self.scores = scores
        self._store = None
        self._weights: dict[str, torch.Tensor] | None = None  # history values of the trainable parameters
        self._last_step = 0  # trainer.global_step at the last update
        self._pending: dict[str, Any] | None = None  # state loaded from a checkpoint, applied at fit start
        self.cache = bool(cache)
        self._samples = SampleCache() if self.cache and mode == "base" else None  # later epochs: no extra forward
        self._sharded = False  # FSDP2: the weights are this rank's local shards of the parameters' DTensors

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scores is not None:  # the base model's values from a store: checked against this run, no forward
            from sstoken_pl.score_store import check_store, run_fingerprint

            fingerprint = run_fingerprint(pl_module, trainer.datamodule, trainer.precision, "base")
            self._store = check_store(self.scores, fingerprint, "HistoryModel.scores")
        model = self.hf_model(pl_module)
        sharding.check_strategy(trainer, f"HistoryModel(mode={self.mode!r})", needs_weights=self._needs_weights(model))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start, not on_fit_start: it runs after the checkpoint is restored for every strategy (FSDP and
        # DeepSpeed restore after on_fit_start).
        model = self.hf_model(pl_module)
        self._sharded = sharding.is_sharded(model)
        if self._pending is not None:
            if self._pending.get("weights_in") == "distributed_checkpoint":
                self._load_shards(model, trainer.ckpt_path)
                self._last_step = int(self._pending["last_step"])
            else:
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
        return not (self.mode == "base" and (is_peft_model(model) or self.scores is not None))

    @staticmethod
    def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The trainable parameters; under FSDP2 this rank's local shards of them (views of the shard storage)."""
        return ((n, sharding.local(p)) for n, p in sharding.named_parameters(model).items() if p.requires_grad)

    # ------------------------------------------------------------------ updates
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step <= self._last_step or self._weights is None:
            return  # no optimizer step since the last update (gradient accumulation), or nothing to update
        if not self.should_update(trainer.global_step):
            self._last_step = trainer.global_step
            return
        model = self.hf_model(pl_module)
        current = dict(self._trainable(model))
        names = list(self._weights)
        decay = float(self.decay(trainer.global_step))
        with torch.no_grad():
            if decay == 0.0:  # a snapshot: θ_h ← θ
                for n in names:
                    self._weights[n].copy_(current[n].detach())
            else:  # θ_h ← d·θ_h + (1 − d)·θ; a float32 history of low-precision weights one tensor at a time
                same = [n for n in names if current[n].dtype == self._weights[n].dtype]
                if same:
                    get_ema_multi_avg_fn(decay)([self._weights[n] for n in same], [current[n].detach() for n in same], None)
                for n in set(names).difference(same):
                    self._weights[n].lerp_(current[n].detach().float(), 1.0 - decay)
        self._last_step = trainer.global_step

    def should_update(self, step: int) -> bool:
        """Whether the history moves after optimizer step ``step`` — the one update rule is
        ``θ_h ← d·θ_h + (1 − d)·θ`` with ``d = decay(step)``: ``base`` never, ``snapshot`` every ``snapshot_every``
        steps with d = 0, ``ema`` every step with d = ``ema_decay``. Override this (and ``decay``) in a subclass for
        a schedule of your own, as Lightning's ``WeightAveraging.should_update``."""
        if self.mode == "base":
            return False
        if self.mode == "snapshot":
            return step % self.snapshot_every == 0
        return True

    def decay(self, step: int) -> float:
        """``d`` of the update after optimizer step ``step``: 0 (a copy) for a snapshot, ``ema_decay`` for the EMA."""
        return self.ema_decay if self.mode == "ema" else 0.0

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
        elif self._sharded:  # FSDP2: the history shards are swapped into the parameters for the forward
            with sharding.swapped_local_shards(model, self._weights):
                yield {}
        else:
            params = dict(model.named_parameters())
            yield {n: w if w.dtype == params[n].dtype else w.to(params[n].dtype) for n, w in self._weights.items()}

    def history_nll(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``FloatTensor[B, T]``: the history model's per-token NLL of this batch (aligned with ``labels``).

        Computed once per training batch (one extra forward, no grad, eval mode) and cached until the batch ends.
        """
        return self.token_input("history_nll", pl_module, batch)

    def history_logits(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, V]``: the history model's logits at the rows that predict a response token of this batch (no grad,
        eval mode, the model's dtype); with its NLL from the same forward. Kept until the batch ends."""
        return self.token_input("history_logits", pl_module, batch)

    @torch.no_grad()
    def compute(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if name == "history_logits":  # one forward gives both: its NLL is kept for history_nll
            if self._store is not None:
                raise ConfigError("HistoryModel.scores holds per-token NLL only; history_logits (asft) needs the model: drop scores")
            nll, rows = self._forward(pl_module, batch, with_rows=True)
            self._batch_values.setdefault("history_nll", nll)
            return rows
        if self._store is not None:
            return self._store.lookup(_index(batch, "HistoryModel.scores"), response_mask(batch["labels"]))
        if self._samples is not None:  # base history: the same values every epoch (FSDP2: all ranks hit or none)
            compute = lambda: self._forward(pl_module, batch)  # noqa: E731
            return self._samples.fetch(batch, compute, lambda hit: sharding.everywhere(hit, self._sharded))
        return self._forward(pl_module, batch)

    def _forward(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor], with_rows: bool = False):
        model = self.hf_model(pl_module)
        was_training = model.training
        model.eval()
        try:  # in the training step's precision (autocast), or REL would carry its rounding
            with training_precision(pl_module), self.history_weights(model) as overrides:
                if overrides:
                    call = lambda **kw: functional_call(model, overrides, args=(), kwargs=kw, strict=False)  # noqa: E731
                    logits = response_logits(model, batch, call=call)
                else:
                    logits = response_logits(model, batch)
                nll = per_token_nll(logits, batch["labels"])
                rows = response_rows(logits, batch["labels"]) if with_rows else None
        finally:
            model.train(was_training)
        return (nll, rows) if with_rows else nll

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "ema_decay": self.ema_decay,
            "snapshot_every": self.snapshot_every,
            "last_step": self._last_step,
            # under FSDP2 the shards are written by on_save_checkpoint (``weights_in``), not here
            "weights": None if self._weights is None or self._sharded else {n: w.detach().clone() for n, w in self._weights.items()},
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """FSDP2: the history shards go into the distributed checkpoint beside the model's (DTensors sharded as the
        parameters, each rank writes its own); with ``save_distributed_checkpoint=False`` they are gathered, one
        tensor at a time, into the single file as the model is. Called on every rank."""
        if not (self._sharded and self._weights is not None):
            return
        state = checkpoint["callbacks"][self.state_key]
        params = sharding.named_parameters(self.hf_model(pl_module))
        shards = {n: sharding.as_dtensor_like(params[n], w) for n, w in self._weights.items()}
        if getattr(trainer.strategy, "_save_distributed_checkpoint", True):
            checkpoint["state_dict"].update({sharding.HISTORY_PREFIX + n: t for n, t in shards.items()})
            state["weights_in"] = "distributed_checkpoint"
        else:
            state["weights"] = {n: t.full_tensor().cpu() for n, t in shards.items()}

    def _load_shards(self, model: torch.nn.Module, path: str) -> None:
        """FSDP2 resume: each rank reads its history shards from the distributed checkpoint directory ``path``."""
        params = {n: p for n, p in sharding.named_parameters(model).items() if p.requires_grad}
        templates = {}
        for n, p in params.items():
            shard = sharding.local(p)
            dtype = torch.float32 if self.mode == "ema" and shard.is_floating_point() else shard.dtype
            templates[sharding.HISTORY_PREFIX + n] = sharding.as_dtensor_like(p, torch.empty_like(shard, dtype=dtype))
        try:
            loaded = sharding.load_distributed(path, templates)
        except Exception as err:  # noqa: BLE001 - a checkpoint without them, or of another model
            raise ConfigError(
                f"HistoryModel: could not read the history weights from the distributed checkpoint {path} ({err})"
            ) from None
        self._weights = {n: sharding.local(loaded[sharding.HISTORY_PREFIX + n]) for n in params}

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
        if self._sharded:  # a whole-tensor checkpoint (one file) into a sharded model: keep this rank's shards
            params = sharding.named_parameters(model)
            self._weights = {n: self._master(sharding.local_shard_of(weights[n], params[n])) for n in current}
            return
        self._weights = {n: self._master(weights[n].to(device=p.device)) for n, p in current.items()}

    @property
    def num_history_parameters(self) -> int:
        """Elements held for the history model (0 for LoRA ``base``: it reuses the model with adapters off)."""
        return 0 if self._weights is None else sum(w.numel() for w in self._weights.values())
