"""Resuming exactly, and stopping cleanly: two callbacks that work in any Lightning project.

- ``ExactResume``: saves the random number generators' states (torch CPU and CUDA, NumPy, Python) in every
  checkpoint and restores them when a resumed run starts training, so that dropout and anything else drawn from the
  global generators continue as if the run had not stopped. Lightning saves the model, optimizer, schedulers, loop
  progress and callback states, but not these.
- ``SaveOnInterrupt``: on SIGTERM (a scheduler's pre-emption, ``kill``) or SIGINT (Ctrl-C) during ``fit``, finishes
  the current optimizer step, writes a resumable checkpoint, logs where, and exits with status 128 + the signal
  number (143, 130). ``fit --ckpt_path <that file>`` continues the run.

The CLI adds both by default (``--interrupt.enabled=false`` turns the second off).
"""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sstoken_pl.errors import ConfigError


# ---------------------------------------------------------------------------------------------------- RNG states
def rng_states() -> dict[str, Any]:
    """The global generators' states, as tensors and plain Python values (loadable with ``weights_only=True``)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return states
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what ``rng_states`` returned (a generator missing from ``states`` is left as it is)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    if "numpy" in states:
        import numpy as np

        s = states["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


class ExactResume(Callback):
    """Puts the random number generators' states into checkpoints and restores them at train start of a resumed run.

    With it, a run resumed from a checkpoint draws the same dropout masks (and anything else from the global
    generators) as the run that wrote it would have. The states are those of the process that writes the checkpoint
    (rank 0); under DDP every rank restores them, which is exact when the ranks' generators advance together (the
    usual case: ``seed_everything`` seeds every rank alike and they draw the same shapes).

    Together with a resumable training sampler (``sstoken_pl.data.ResumableSampler``, which ``SFTDataModule``
    uses) and the callbacks' own states, ``fit(ckpt_path=...)`` continues bit for bit, also in the middle of an epoch.
    """

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after model set-up, sanity validation and everything else a start draws: the next draw is the next batch's
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


# ---------------------------------------------------------------------------------------------------- interrupts
class TrainingInterrupted(SIGTERMException):
    """Raised after ``SaveOnInterrupt`` wrote its checkpoint: ends ``fit`` (a ``SystemExit`` with status 128 + signal,
    which Lightning handles as it handles its own SIGTERM: ``on_exception`` hooks, loggers finalised)."""

    def __init__(self, signum: int, path: str) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.path = path


class SaveOnInterrupt(Callback):
    """On SIGTERM or SIGINT during ``fit``: finish the optimizer step, save a resumable checkpoint, stop.

    The handlers are installed when training starts and the previous ones put back when it ends. A signal only sets
    a flag; at the end of the first training batch that completes an optimizer step after it (never in the middle
    of gradient accumulation), every rank agrees (one all-reduce per optimizer step under DDP, so a signal that
    reaches one rank is enough), the checkpoint is written with ``trainer.save_checkpoint`` (through the
    trainer's CheckpointIO: atomic with ``sstoken_pl.checkpoint_io.AtomicCheckpointIO``), its path is logged, and
    ``fit`` ends by raising ``TrainingInterrupted`` (status 143 for SIGTERM, 130 for SIGINT). A second Ctrl-C
    before that quits at once (Lightning's KeyboardInterrupt handling). A signal that arrives during validation is
    acted on after the next optimizer step; one that arrives after the last step is passed on to the previous
    handler once training has ended.

    The callback moves itself to the end of the trainer's callbacks, so the checkpoint holds every other callback's
    state after this batch (a ``HistoryModel``'s EMA updated for this step, for instance).

    Args:
        signals: names of the signals to handle (``SIGTERM``, ``SIGINT``, ``SIGUSR1``, ...).
        dirpath: folder of the checkpoint; default: the ``ModelCheckpoint``'s folder, else ``<log dir>/checkpoints``.
        filename: the checkpoint's file name; ``{epoch}``, ``{step}`` and ``{signal}`` are filled in.
        enabled: ``false`` turns the callback off (the signals keep their usual meaning).
    """

    def __init__(
        self,
        signals: Sequence[str] = ("SIGTERM", "SIGINT"),
        dirpath: Optional[str] = None,
        filename: str = "interrupted-epoch={epoch}-step={step}.ckpt",
        enabled: bool = True,
    ) -> None:
        self.signals: list[signal.Signals] = []
        for name in signals:
            value = getattr(signal, str(name).upper(), None)
            if not isinstance(value, signal.Signals):
                raise ConfigError(f"SaveOnInterrupt.signals: unknown signal {name!r} (e.g. SIGTERM, SIGINT)")
            self.signals.append(value)
        self.dirpath = dirpath
        self.filename = filename
        self.enabled = bool(enabled)
        self.received: Optional[int] = None  # the signal caught, until acted on
        self.saved_path: Optional[str] = None  # the checkpoint written, once written
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1
        self._dirpath: Optional[str] = None

    # ------------------------------------------------------------------ handlers
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: quit now
        self.received = signum
        name = signal.Signals(signum).name
        hint = " (Ctrl-C again to quit without it)" if signum == signal.SIGINT else ""
        rank_zero_info(f"{name} received: saving a resumable checkpoint at the end of this optimizer step{hint}")

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("SaveOnInterrupt: fit does not run in the main thread, so no signal handler is installed")
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _uninstall(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._handler:  # unless someone replaced ours meanwhile
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit" and trainer.callbacks[-1] is not self:
            # a new list: the loop calling this hook goes on over the old one
            trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        self.received, self.saved_path = None, None
        # resolved on every rank, now: log_dir is a collective call under DDP
        checkpoint = trainer.checkpoint_callback
        folder = self.dirpath or getattr(checkpoint, "dirpath", None)
        self._dirpath = folder or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        # after Lightning's own SIGTERM handler (registered before training starts), which this one replaces while
        # training runs: Lightning's would end fit at the end of any batch, also mid-accumulation, without a checkpoint
        self._install()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or trainer.global_step == self._step_at_batch_start:
            return  # no optimizer step in this batch (gradient accumulation): the state is not resumable here
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received if self.received is not None else int(signal.SIGTERM)  # another rank's signal
        name = signal.Signals(signum).name
        path = os.path.join(
            self._dirpath, self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step, signal=name)
        )
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(
            f"{name}: saved a resumable checkpoint at step {trainer.global_step} to {path}; continue the run with "
            f"the same settings and --ckpt_path {path}"
        )
        self._uninstall()
        raise TrainingInterrupted(signum, path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        if self.received is not None:  # training ended before acting on it: hand it to the previous handler
            signum, self.received = self.received, None
            rank_zero_info(f"{signal.Signals(signum).name} received after the last training step; passing it on")
            signal.raise_signal(signum)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()
