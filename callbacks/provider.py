"""``TokenInputProvider``: the base of the callbacks that give ``TokenSelection`` its per-token inputs."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from sstoken_pl.errors import ConfigError


class TokenInputProvider(Callback):
    """A callback that provides named per-token inputs (``[B, T]``, aligned with ``labels``) for each training batch.

    Subclasses set ``provides`` (the input names) and implement ``compute(name, pl_module, batch)``; ``token_input``
    computes each input at most once per batch (a per-batch cache, cleared at batch end). Two kinds, which
    ``TokenSelection`` prepares in one fixed order before the training forward:

    1. other models' forwards (``from_training_forward = False``: ``HistoryModel``, ``ReferenceModel``, and a score
       store read in their place): ``prepare`` computes them first, with every probe paused, inside the training
       step's precision context (their own ``training_precision``), so that their activations never coexist with
       the training graph;
    2. probes of the training forward (``from_training_forward = True``: ``AttentionScore``, ``SequenceEntropy``):
       then ``arm``, so that they capture that forward and nothing else; their inputs are read after it.

    A probe that no ``TokenSelection`` drives (``driven`` False: used on its own) arms itself at batch start.

    Args:
        model_attr: the attribute of the LightningModule that holds the Hugging Face model (plain or peft-wrapped).
    """

    provides: tuple[str, ...] = ()
    from_training_forward = False

    def __init__(self, model_attr: str = "model") -> None:
        if not isinstance(model_attr, str) or not model_attr:
            raise ConfigError(f"{type(self).__name__}.model_attr must be a non-empty attribute name, got {model_attr!r}")
        self.model_attr = model_attr
        self.driven = False  # set by the TokenSelection that prepares this provider
        self._batch_key: Any = None
        self._batch_values: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ the protocol
    def token_input(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Input ``name`` of this batch: computed once, then the same tensor until the batch ends."""
        if name not in self.provides:
            raise KeyError(f"{type(self).__name__} provides {', '.join(self.provides)}, not {name!r}")
        key = batch["labels"]
        if self._batch_key is not key:
            self._batch_key, self._batch_values = key, {}
        if name not in self._batch_values:
            self._batch_values[name] = self.compute(name, pl_module, batch)
        return self._batch_values[name]

    def compute(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor], name: str) -> None:
        """Before the training forward (other models' forwards): compute ``name`` now."""
        self.token_input(name, pl_module, batch)

    def arm(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> None:
        """Before the training forward, after every other model's (probes): capture the next forward."""

    def clear(self) -> None:
        """Forget this batch's inputs."""
        self._batch_key, self._batch_values = None, {}

    def hf_model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The Hugging Face model the provider works on: ``getattr(pl_module, model_attr)``, with a clear error."""
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"{type(self).__name__}: {type(pl_module).__name__}.{self.model_attr} is not a torch module (got "
                f"{type(model).__name__}); set {type(self).__name__}(model_attr=...) to the attribute that holds the "
                f"Hugging Face model"
            )
        return model

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clear()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.clear()


def find_providers(callbacks: Iterable[Any]) -> dict[str, Any]:
    """Input name → the callback among ``callbacks`` that provides it (its ``provides``); two providers of one name
    are one ``ConfigError``."""
    providers: dict[str, Any] = {}
    for cb in callbacks:
        for name in getattr(cb, "provides", ()):
            if name in providers:
                raise ConfigError(
                    f"trainer.callbacks: both {type(providers[name]).__name__} and {type(cb).__name__} provide "
                    f"{name!r}; keep one"
                )
            providers[name] = cb
    return providers


def prepare_providers(
    pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor], used: Sequence[tuple[str, Any]], every: Iterable[Any]
) -> None:
    """Before the training forward, in the fixed order ``TokenInputProvider`` describes: (1) the inputs of other
    models' forwards in ``used`` (name, provider), with every probe among ``every`` paused — their no-grad forwards
    then never coexist with the training graph, so the step's peak memory is the training forward's alone; (2) the
    driven probes in ``used`` armed, so that they capture the training forward and nothing else."""
    probes = {id(cb): cb for cb in every if getattr(cb, "from_training_forward", False)}
    with contextlib.ExitStack() as stack:
        for probe in probes.values():
            if hasattr(probe, "paused"):
                stack.enter_context(probe.paused())
        for name, provider in used:
            if not getattr(provider, "from_training_forward", False):
                prepare = getattr(provider, "prepare", None)
                prepare(pl_module, batch, name) if prepare else provider.token_input(name, pl_module, batch)
    armed = set()
    for name, provider in used:
        if getattr(provider, "from_training_forward", False) and getattr(provider, "driven", False) and id(provider) not in armed:
            armed.add(id(provider))
            provider.arm(pl_module, batch)
