"""The decoded samples ``TokenSelection`` logs every ``log_samples_every`` steps: dropped tokens marked ``[-like this-]``
(TensorBoard text, or ``selection_samples.txt``) and, token by token, ``selection_samples.jsonl`` in the run
directory (``tools/compare.py`` builds ``samples.html`` from it)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger


def write_samples(trainer: Any, tokenizer: Any, last: tuple, num: int, log_dir: Optional[str]) -> None:
    """Logs up to ``num`` samples of the last batch ``(input_ids, response, kept, index, noise)``."""
    ids, resp, kept, index, noise = last
    rows = [b for b in range(ids.shape[0]) if resp[b].any()][:num]
    body = f"step {trainer.global_step}\n" + "\n---\n".join(
        render_selection(tokenizer, ids[b], resp[b], kept[b]) for b in rows
    )
    logger = trainer.logger
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text("selection/samples", body.replace("\n", "  \n"), trainer.global_step)
    if log_dir is None:
        return
    os.makedirs(log_dir, exist_ok=True)
    if not isinstance(logger, TensorBoardLogger):
        with open(os.path.join(log_dir, "selection_samples.txt"), "a", encoding="utf-8") as f:
            f.write(body + "\n\n")
    with open(os.path.join(log_dir, "selection_samples.jsonl"), "a", encoding="utf-8") as f:
        for b in rows:
            positions = resp[b].nonzero().flatten().tolist()
            f.write(json.dumps({
                "step": trainer.global_step,
                "index": int(index[b]) if index is not None else b,
                "tokens": [tokenizer.decode([int(ids[b, p])]) for p in positions],
                "kept": [int(kept[b, p]) for p in positions],
                "noise": [int(noise[b, p]) for p in positions] if noise is not None else None,
            }) + "\n")


def render_selection(tokenizer: Any, input_ids: torch.Tensor, response: torch.Tensor, kept: torch.Tensor) -> str:
    """The response of one sample as text, dropped tokens wrapped as ``[-token-]``."""
    pieces: list[str] = []
    dropped_run: list[int] = []
    kept_run: list[int] = []

    def flush() -> None:
        if kept_run:
            pieces.append(tokenizer.decode(kept_run))
            kept_run.clear()
        if dropped_run:
            pieces.append("[-" + tokenizer.decode(dropped_run) + "-]")
            dropped_run.clear()

    for tok, is_resp, is_kept in zip(input_ids.tolist(), response.tolist(), kept.tolist()):
        if not is_resp:
            continue
        if is_kept:
            if dropped_run:
                flush()
            kept_run.append(tok)
        else:
            if kept_run:
                flush()
            dropped_run.append(tok)
    flush()
    return "".join(pieces)
