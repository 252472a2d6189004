"""Per-token values of a *fixed* model (a base history, a reference) kept by training sample across epochs.

A fixed model gives the same per-token NLL for a sample every time it sees it, so after the first epoch the extra
forward is wasted work. ``SampleCache`` keeps, per sample index, the values at the sample's response positions (on
the CPU, 4 bytes per response token of the training set) with a fingerprint of the sample's tokens and response
positions: a changed dataset, tokenizer, template or ``max_length`` changes the fingerprint and the entry is
recomputed. The cache lives for one ``fit`` (it is not written to checkpoints; a resumed run refills it). Where the
padding falls does not matter: values are stored and put back by response position.

It is the in-memory case of a score store (``sstoken_pl.score_store.ScoreReader``): the same ``values(index)`` and
``lookup(index, positions)``, filled as the fit goes instead of by ``python -m sstoken_pl score`` beforehand.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping

import torch

from sstoken_pl.loss import response_mask
from sstoken_pl.score_store import ScoreReader


class SampleCache(ScoreReader):
    """Values ``[B, T]`` of a batch by sample (``batch["index"]``), at the positions of ``mask``."""

    def __init__(self) -> None:
        self._store: dict[int, tuple[bytes, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def _keys(batch: Mapping[str, torch.Tensor], mask: torch.Tensor) -> list[tuple[int, bytes]] | None:
        index = batch.get("index")
        if index is None:
            return None
        ids = batch["input_ids"].detach().cpu()
        attention = batch.get("attention_mask")
        attention = ids.new_ones(ids.shape, dtype=torch.bool) if attention is None else attention.detach().cpu().bool()
        where = mask.detach().cpu()
        keys = []
        for b, i in enumerate(index.detach().cpu().tolist()):
            h = hashlib.blake2b(digest_size=16)
            h.update(ids[b][attention[b]].numpy().tobytes())
            h.update(where[b][attention[b]].numpy().tobytes())
            keys.append((int(i), h.digest()))
        return keys

    def get(self, batch: Mapping[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor | None, list | None]:
        """``(values [B, T] float32 on the mask's device, 0 off the mask, or None if any sample is missing; the
        keys to ``put`` with)``."""
        keys = self._keys(batch, mask)
        if keys is None:
            return None, None
        found = [self._store.get(i) for i, _ in keys]
        if any(f is None or f[0] != d for f, (_, d) in zip(found, keys)):
            self.misses += 1
            return None, keys
        self.hits += 1
        return self.lookup(batch["index"], mask), keys

    def values(self, index: int) -> torch.Tensor:
        """The values kept for sample ``index`` (at its response positions)."""
        found = self._store.get(int(index))
        if found is None:
            raise KeyError(f"SampleCache: no values for sample {int(index)}")
        return found[1]

    def fetch(
        self,
        batch: Mapping[str, torch.Tensor],
        compute: Callable[[], torch.Tensor],
        agree: Callable[[bool], bool] = bool,
    ) -> torch.Tensor:
        """The batch's values ``[B, T]`` at its response positions: from the cache when every sample is there, else
        ``compute()`` (then kept). ``agree(hit)`` decides from the local hit whether to use it (under FSDP2 a forward
        is collective: the forward is skipped only if every rank hits)."""
        mask = response_mask(batch["labels"])
        values, keys = self.get(batch, mask)
        if agree(values is not None):
            return values
        values = compute()
        self.put(keys, mask, values)
        return values

    def put(self, keys: list | None, mask: torch.Tensor, values: torch.Tensor) -> None:
        if keys is None:
            return
        where = mask.detach().cpu()
        rows = values.detach().float().cpu()
        for b, (i, d) in enumerate(keys):
            self._store[i] = (d, rows[b][where[b]].clone())
