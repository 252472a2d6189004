"""Padding-free packed batches: the model runs on packed rows, every per-token tensor stays per sample.

A packed batch is the padded batch of the same samples (``input_ids``, ``attention_mask``, ``labels`` ``[N, L]``,
``index``, ``noise``, ``token_weights``: exactly what ``SFTCollator`` gives without packing, the *samples view*) plus
``batch["packed"]``, the rows the model's forward runs on:

- ``input_ids``, ``position_ids``: ``LongTensor[R, P]``: the samples laid end to end in rows of at most
  ``capacity`` tokens (best-fit decreasing, TRL's ``bfd``), ``position_ids`` restarting at 0 at each sample and at
  the padding after a row's last sample (a segment of its own). This is transformers' padding-free convention
  (``DataCollatorWithFlattening``): called with ``position_ids`` and no ``attention_mask``, a transformers ≥ 5
  causal LM builds a block-diagonal causal mask for ``sdpa``/``eager`` (``masking_utils.find_packed_sequence_indices``)
  and flash attention runs its variable-length kernel (rows are flattened to one for it: ``model_inputs``).
- ``where``: ``LongTensor[N, L]``: the flat position (``r·P + p``) of each sample token in the rows; -1 on padding.

Only the forward sees the rows: ``sstoken_pl.models.response_logits`` runs it on them and hands back the logits in
the samples view's order, and the two probes of the training forward (``AttentionScore``, ``SequenceEntropy``) map
what they capture back with ``to_samples``. Every method's inputs, scores, rules and the loss then see exactly the
tensors of the unpacked batch, so each per-sample notion (ssToken's min-max and top-⌈ρR⌉, Q-Tuning's triage,
``random``, ``keep_end_of_turn``), each batch-level rule and the step's token mean are those of the unpacked run,
to the forward's float rounding. Packing is per micro-batch (the samples a padded run would put in it), so batch
composition, gradient accumulation and resume are unchanged.

``check_model`` verifies, at fit start, that a model keeps packed samples apart: the first of two packed samples
must not change the second's logits, and the second's logits must be those it has alone.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from sstoken_pl.errors import ConfigError

PACKED = "packed"


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sample positions: longest sample first, each into the row it fills best (least room left that still
    fits), a new row when none fits; ties by position, so the packing is a function of the lengths alone."""
    if capacity < 1:
        raise ValueError(f"best_fit_decreasing: capacity must be ≥ 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"best_fit_decreasing: sample {i} has {n} tokens, more than a row's {capacity}")
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: (room[r], r))
            rows[r].append(i)
            room[r] -= n
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack(batch: dict[str, torch.Tensor], capacity: int, pad_token_id: int, always: bool = False) -> dict[str, torch.Tensor]:
    """Adds ``batch["packed"]`` to a right-padded batch (``input_ids``, ``attention_mask`` ``[N, L]``); returns it.

    A batch whose rows would hold as many positions as its padded form (samples too long to share a row, or too
    alike in length to leave padding) stays padded, unless ``always``: packing it would save nothing and lengthen
    the attention rows."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    N, L = ids.shape
    lengths = mask.sum(1).tolist()
    rows = best_fit_decreasing(lengths, capacity)
    P = max(sum(lengths[i] for i in row) for row in rows) if rows else 1
    R = max(len(rows), 1)
    if R * P >= N * L and not always:
        return batch
    packed_ids = torch.full((R, P), pad_token_id, dtype=torch.long)
    positions = torch.zeros((R, P), dtype=torch.long)
    where = torch.full((N, L), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            n = lengths[i]
            packed_ids[r, offset : offset + n] = ids[i, :n]
            positions[r, offset : offset + n] = torch.arange(n)
            where[i, :n] = r * P + offset + torch.arange(n)
            offset += n
        positions[r, offset:] = torch.arange(P - offset)  # the row's padding: a segment of its own
    batch[PACKED] = {"input_ids": packed_ids, "position_ids": positions, "where": where}
    return batch


def is_packed(batch: Mapping[str, Any]) -> bool:
    return isinstance(batch, Mapping) and PACKED in batch


def model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The forward's inputs for ``batch``: ``input_ids`` and ``attention_mask``, or for a packed batch the rows'
    ``input_ids`` and ``position_ids`` with no ``attention_mask`` (flattened to one row for flash attention, whose
    variable-length path takes one row only)."""
    if not is_packed(batch):
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    packed = batch[PACKED]
    ids, positions = packed["input_ids"], packed["position_ids"]
    if _is_flash(model):
        ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
    return {"input_ids": ids, "position_ids": positions}


def _is_flash(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None) or ""
    return "flash" in str(name)


def row_positions(batch: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """``LongTensor[K]``: the flat row positions of the samples view's positions ``mask`` (``[N, L]``), in its
    row-major order."""
    return batch[PACKED]["where"].to(mask.device)[mask]


def to_samples(x: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """``x`` laid out as the rows (``[R, P, ...]``, or flattened ``[1, R·P, ...]``) → the samples view
    ``[N, L, ...]`` (0 on padding)."""
    where = batch[PACKED]["where"].to(x.device)
    flat = x.reshape(-1, *x.shape[2:])
    out = flat[where.clamp(min=0)]
    valid = (where >= 0).reshape(*where.shape, *([1] * (x.dim() - 2)))
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def to_rows(y: torch.Tensor, batch: Mapping[str, Any], fill: Any = 0) -> torch.Tensor:
    """The samples view ``y`` (``[N, L]``) → the rows' layout ``[R, P]`` (``fill`` off the samples)."""
    packed = batch[PACKED]
    where = packed["where"].to(y.device)
    R, P = packed["input_ids"].shape
    out = torch.full((R * P,), fill, dtype=y.dtype, device=y.device)
    valid = where >= 0
    out[where[valid]] = y[valid]
    return out.view(R, P)


def segments(position_ids: torch.Tensor) -> torch.Tensor:
    """``LongTensor[R, P]``: which segment (sample, or a row's padding) each position belongs to: a new one wherever
    the position does not follow its left neighbour (as ``find_packed_sequence_indices``)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def padding_share(lengths: Sequence[int], batch_size: int) -> float:
    """The share of the positions of right-padded batches of ``batch_size`` consecutive samples that are padding."""
    total = padded = 0
    for s in range(0, len(lengths), batch_size):
        chunk = lengths[s : s + batch_size]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1.0 - total / padded if padded else 0.0


@torch.no_grad()
def check_model(model: torch.nn.Module, what: str = "model", tolerance: float | None = None) -> None:
    """Refuses, in one ``ConfigError``, a model that would let packed samples see each other or number their
    positions wrongly: two samples packed in one row, the second's log-probabilities must not change when the
    first's tokens do (no attention across samples), and must be those it has alone (positions restart).

    ``tolerance``: on the largest log-probability difference; default 1e-3 for float32 weights, 5e-2 for half
    precision. Runs three small forwards in eval mode (on every rank under a sharded strategy: collective)."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 8:
        raise ConfigError(f"data.packing: cannot check {what} ({type(model).__name__} has no config.vocab_size)")
    param = next(model.parameters())
    device = param.device
    if tolerance is None:
        tolerance = 1e-3 if param.dtype == torch.float32 else 5e-2
    g = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(3, vocab, (n,), generator=g) for n in (11, 11, 13))
    pos = torch.cat([torch.arange(11), torch.arange(13)])[None].to(device)
    was = model.training
    model.eval()
    try:
        def logprobs(ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
            kwargs = {"position_ids": positions} if positions is not None else {}
            out = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits
            return torch.log_softmax(out[0, -13:].float(), dim=-1)

        packed = logprobs(torch.cat([first, second])[None], pos)
        packed_other = logprobs(torch.cat([other, second])[None], pos)
        alone = logprobs(second[None], None)
    except Exception as err:  # noqa: BLE001 - a forward that takes no position_ids, or fails on them
        raise ConfigError(f"data.packing: {what} ({type(model).__name__}) cannot run packed rows: {err}") from None
    finally:
        model.train(was)
    leak = float((packed - packed_other).abs().max())
    shift = float((packed - alone).abs().max())
    name = getattr(config, "_attn_implementation", "?")
    if leak > tolerance:
        raise ConfigError(
            f"data.packing: {what} ({type(model).__name__}, attn_implementation={name}) attends across packed "
            f"samples (a sample's log-probabilities change by {leak:.3g} with the sample before it); use "
            f"attn_implementation sdpa, eager or flash_attention_2 with a transformers ≥ 5 model, or data.packing: false"
        )
    if shift > tolerance:
        raise ConfigError(
            f"data.packing: {what} ({type(model).__name__}, attn_implementation={name}) gives a packed sample other "
            f"log-probabilities than it has alone (by {shift:.3g}): its positions do not restart at each sample; "
            f"set data.packing: false"
        )
