"""Batches: ``SFTCollator`` pads tokenised samples into tensors; ``noise_flags`` places the built-in task's injected
noise on a sample's response tokens (the ``noise`` key of its training batches)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from sstoken_pl.loss import IGNORE_INDEX


class SFTCollator:
    """Pads samples (``input_ids``, ``labels`` lists and an ``index``) on the right to the longest one.

    Returns ``input_ids``, ``attention_mask``, ``labels`` as ``LongTensor[B, T]`` (padding: ``pad_token_id``, 0
    and -100) and ``index`` as ``LongTensor[B]``; ``noise`` as ``BoolTensor[B, T]`` (padding: False) when every
    sample carries a ``noise`` list (the built-in task's training samples); ``token_weights`` as ``FloatTensor[B, T]``
    (padding: 0) when every sample carries them (training data with a ``weight`` field: ``sstoken_pl.token_loss``
    multiplies each token's loss by its weight).

    With ``pack_length``, the batch is also packed (``sstoken_pl.packing.pack``): ``batch["packed"]`` holds the
    samples laid end to end in rows of at most ``pack_length`` tokens, which the model's forward runs on; the padded
    tensors above stay as the samples view every per-token tensor is aligned with.
    """

    def __init__(self, pad_token_id: int, pack_length: Optional[int] = None) -> None:
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(s["labels"], dtype=torch.long)
        index = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}
        if all(s.get("token_weights") is not None for s in samples):
            weights = torch.zeros((len(samples), width), dtype=torch.float32)
            for i, s in enumerate(samples):
                weights[i, : len(s["token_weights"])] = torch.tensor(s["token_weights"], dtype=torch.float32)
            batch["token_weights"] = weights
        if all(s.get("noise") is not None for s in samples):
            noise = torch.zeros((len(samples), width), dtype=torch.bool)
            for i, s in enumerate(samples):
                noise[i, : len(s["noise"])] = torch.tensor(s["noise"], dtype=torch.bool)
            batch["noise"] = noise
        if self.pack_length is not None:
            from sstoken_pl.packing import pack

            pack(batch, self.pack_length, self.pad_token_id)
        return batch


def noise_flags(
    input_ids: Sequence[int], labels: Sequence[int], completion: str, spans: Sequence[Sequence[int]], tokenizer: Any
) -> Optional[list[int]]:
    """Per token, 1 where a response token's text overlaps a noise span ``[start, end)`` of ``completion``, else 0.

    The response tokens (``labels != -100``) start at the completion; each is decoded on its own and the lengths
    accumulated to place it in the completion (tokens past its end, such as the end-of-turn token, are clean). A
    response cut short by truncation is placed as far as it goes; a sample with no response token is all clean.
    ``None`` when the decoded response does not start with the completion (or, cut short, is not a prefix of it): a
    tokenizer whose pieces do not round-trip, which the caller counts.
    """
    flags = [0] * len(input_ids)
    offset, text = 0, ""
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        piece = tokenizer.decode([input_ids[i]])
        start, end = offset, offset + len(piece)
        offset, text = end, text + piece
        if start < len(completion) and any(a < end and start < b for a, b in spans):
            flags[i] = 1
    n = min(len(text), len(completion))
    return flags if text[:n] == completion[:n] else None
