"""A training sampler and loader that a checkpoint can resume part-way through an epoch.

They depend on torch alone, not on the rest of ``sstoken_pl``: any Lightning project can use them. Build the loader
in the DataModule's ``train_dataloader``; save the position in its ``state_dict`` (Lightning keeps that in the
checkpoint) and apply it to the next sampler built after ``load_state_dict``, as ``SFTDataModule`` does::

    def train_dataloader(self):
        t = self.trainer
        self.sampler = ResumableSampler(len(self.ds), seed, num_replicas=t.world_size, rank=t.global_rank,
                                        batch_size=bs)
        if self.saved is not None:  # skip the batches of the epoch that the checkpoint had trained on
            epoch, start = self.saved["epoch"], self.saved["batches"] * bs
            if start >= self.sampler.num_samples:  # saved at the end of an epoch: the next one, from its start
                epoch, start = epoch + 1, 0
            self.sampler.resume(epoch, start)
            self.saved = None
        return ResumableDataLoader(self.ds, batch_size=bs, sampler=self.sampler)

    def state_dict(self):  # self.sampler and self.saved start as None in __init__
        if self.sampler is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.sampler.epoch, "batches": done}

    def load_state_dict(self, state):
        self.saved = state

``SFTDataModule`` also saves the number of samples, batch size, seed and number of processes with the position, and
starts the epoch afresh (with a warning) when they differ from the checkpoint's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """The training order: a seeded shuffle per epoch, which a checkpoint can resume part-way through an epoch.

    On one process the order is exactly that of ``DataLoader(shuffle=True, batch_size=batch_size,
    generator=torch.Generator().manual_seed(seed))`` as Lightning iterates it, one iterator per epoch that stops
    after ``len(loader)`` batches (so runs keep the data order they had before this sampler existed). Across
    ``num_replicas`` processes each rank takes every ``num_replicas``-th index of that same order, padded to a
    multiple of ``num_replicas`` as ``DistributedSampler`` pads; being a ``DistributedSampler``, Lightning uses it as
    it is instead of wrapping it (under DDP the order therefore follows ``data.seed``, no longer the global seed).

    The order of an epoch is a function of ``(seed, epoch)`` only: Lightning's ``set_epoch`` picks it, and
    ``resume(epoch, start)`` makes the next iteration be ``epoch`` from this rank's ``start``-th index on (the
    samples of the batches a checkpoint had already trained on), whatever ``set_epoch`` said in between (Lightning
    may iterate the training loader once before it restores the loops).
    """

    def __init__(self, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0, batch_size: int = 1) -> None:
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self._resume_at: Optional[tuple[int, int]] = None

    def order(self, epoch: int) -> list[int]:
        """The permutation of all ``len(dataset)`` indices for ``epoch`` (before sharding across ranks)."""
        generator = torch.Generator().manual_seed(self.seed)
        n = len(self.dataset)
        order = torch.arange(n)
        for _ in range(epoch + 1):  # what a shuffling DataLoader draws per epoch from its generator:
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # its iterator's base seed,
            order = torch.randperm(n, generator=generator)  # RandomSampler's permutation,
            if n % self.batch_size:  # and, asked past its end for the last partial batch, one for the remainder
                torch.randperm(n, generator=generator)
        return order.tolist()

    def resume(self, epoch: int, start: int) -> None:
        """The next iteration is ``epoch``'s, from this rank's ``start``-th index on."""
        self._resume_at = (int(epoch), int(start))

    def __iter__(self):
        epoch, start = self.epoch, 0
        if self._resume_at is not None:
            (epoch, start), self._resume_at = self._resume_at, None
            self.epoch = epoch
        indices = self.order(epoch)
        if self.total_size > len(indices):  # pad by repeating from the start, as DistributedSampler does
            indices += (indices * (self.total_size // len(indices) + 1))[: self.total_size - len(indices)]
        return iter(indices[self.rank : self.total_size : self.num_replicas][start:])


class ResumableDataLoader(DataLoader):
    """The training ``DataLoader`` of ``SFTDataModule``. It has ``state_dict``/``load_state_dict`` so that Lightning
    treats it as resumable (and does not warn that a mid-epoch resume replays data), but the position itself is saved
    by ``SFTDataModule.state_dict``: Lightning restores a loader's own state only if it builds the loader after
    restoring the loops, which it does not when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``
    (``SFTModule`` does; Lightning issue #20550), and a loader cannot tell the batches trained on from those its
    fetcher prefetched.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
