"""``AnswerAccuracy``: exact-match accuracy of the final answer, by greedy generation, before and after ``fit``; and
the retention measures (``sstoken_pl.retention``) before and after ``fit``. ``eval_problems``: the held-out problems
of an ``SFTDataModule`` that the accuracy is measured on."""

from __future__ import annotations

import json
import math
import os
import re
from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from sstoken_pl import sharding
from sstoken_pl.data import extract_final_answer, load_splits
from sstoken_pl.errors import ConfigError, DataError
from sstoken_pl.retention import FitRetention, RetentionConfig
from sstoken_pl.templates import prompt_ids

if TYPE_CHECKING:
    from sstoken_pl.data import SFTDataModule

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def eval_problems(
    datamodule: SFTDataModule, limit: Optional[int] = None, split: str = "validation"
) -> list[dict[str, Any]]:
    """The held-out problems of ``datamodule`` for generation-based accuracy, in file order: ``{"prompt_ids",
    "prompt", "answer", "index"}`` (``SFTDataModule.eval_problems``).

    ``split``: ``validation`` — what the module validates on (the source's validation split, else its test
    split, else the held-out share; the synthetic task's validation problems); ``test`` — the source's test
    split (a file or folder with a ``test*`` file). ``prompt_ids`` prompts the model for the last assistant
    turn; ``prompt`` is that turn's user message; ``answer`` is the gold final answer (the synthetic task's
    number, the text after GSM8K's ``####`` without commas, else the whole reference response).
    """
    if split not in ("validation", "test"):
        raise ConfigError(f"split must be 'validation' or 'test', got {split!r}")
    if datamodule.tokenizer is None:
        datamodule.tokenizer = datamodule._resolve_tokenizer()
    if split == "validation":
        samples = datamodule.val_samples or datamodule._load_samples()[1]  # no tokenising of the training data
    else:
        if datamodule.path is None:
            raise DataError("the built-in synthetic task has no test split; use split 'validation'")
        splits = load_splits(datamodule.path, datamodule.hub_config)
        if "test" not in splits:
            raise DataError(f"{datamodule.path}: no test split (only {sorted(splits)}); name a file test*.jsonl")
        samples = datamodule._samples(splits["test"], f"test ({datamodule.path})")
    if not samples:
        raise DataError("the held-out split is empty")
    problems = []
    for sample in samples[:limit]:
        messages = sample["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        problems.append({
            "prompt_ids": prompt_ids(messages[:last], datamodule.tokenizer),
            "prompt": messages[last - 1]["content"] if last else "",
            "answer": sample["answer"],
            "index": sample["index"],
        })
    return problems


def answers_match(predicted: Optional[str], gold: str) -> bool:
    """Exact match of final answers; numbers compare by value (``"19.0"`` matches ``"19"``)."""
    if predicted is None:
        return False
    p, g = predicted.strip().replace(",", ""), gold.strip().replace(",", "")
    if _NUMBER.match(p) and _NUMBER.match(g):
        return math.isclose(float(p), float(g), rel_tol=0.0, abs_tol=1e-6)
    return p == g


def score_answers(problems: list[dict[str, Any]], outputs: list[str]) -> list[dict[str, Any]]:
    """One row per problem: ``index``, ``prompt``, ``output``, ``gold``, ``extracted``, ``correct`` (the JSONL rows)."""
    rows = []
    for problem, output in zip(problems, outputs):
        extracted = extract_final_answer(output)
        rows.append({
            "index": problem["index"],
            "prompt": problem["prompt"],
            "output": output,
            "gold": problem["answer"],
            "extracted": extracted,
            "correct": answers_match(extracted, problem["answer"]),
        })
    return rows


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    progress: Any = None,
    synced: bool = False,
) -> list[str]:
    """Greedy completions of token-id prompts (left-padded batches), decoded without special tokens.
    ``progress(n)`` is called after each batch with the number of prompts done in it. ``synced``: every rank runs
    the same generation in lockstep (a sharded model's forward is a collective: no rank may stop early)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **({"synced_gpus": True} if synced else {}),
        )
        outputs.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
        if progress is not None:
            progress(len(chunk))
    return outputs


class AnswerAccuracy(Callback):
    """Exact-match accuracy of the final answer on held-out problems (``datamodule.eval_problems``), measured by
    greedy generation at fit start and fit end; both are printed and logged (``eval/accuracy_before|after``), and
    each problem's prompt, output, gold and extracted answer is written to ``eval_before.jsonl`` / ``eval_after.jsonl``
    in the run's log directory (the rows of ``sstoken_pl evaluate``).

    Args:
        num_problems: how many held-out problems; 0 turns the evaluation off.
        max_new_tokens: generation budget per problem.
        batch_size: problems generated together.
        before: also evaluate at fit start (the base model); off saves one evaluation when comparing many runs of
            the same base model.
        retention: the retention measures (``sstoken_pl.retention``): general-instruction and other-domain NLL of
            the base model at fit start and of the trained model at fit end, independent of ``num_problems``; on by
            default, skipped with one logged reason where their data are absent; ``<log dir>/retention.json``.
    """

    def __init__(
        self,
        num_problems: int = 64,
        max_new_tokens: int = 128,
        batch_size: int = 16,
        before: bool = True,
        retention: RetentionConfig = RetentionConfig(),
    ) -> None:
        if num_problems < 0 or max_new_tokens < 1 or batch_size < 1:
            raise ConfigError(
                "AnswerAccuracy: num_problems must be ≥ 0, max_new_tokens and batch_size ≥ 1 "
                f"(got {num_problems}, {max_new_tokens}, {batch_size})"
            )
        self.num_problems = num_problems
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.before = before
        self.retention = FitRetention(RetentionConfig(**retention) if isinstance(retention, dict) else retention)
        self.results: dict[str, float] = {}
        self._log_dir: str | None = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """The rows of ``score_answers`` for ``pl_module.model`` on the datamodule's held-out problems."""
        problems = trainer.datamodule.eval_problems(limit=self.num_problems)
        tokenizer = getattr(pl_module, "tokenizer", None) or trainer.datamodule.tokenizer
        model = pl_module.model
        was_training = model.training
        model.eval()
        bar = None
        if trainer.is_global_zero and trainer.progress_bar_callback is not None:  # the console shows progress
            from tqdm import tqdm

            when = "after" if trainer.global_step else "before"
            bar = tqdm(total=len(problems), desc=f"Generating answers ({when} training)", unit="problem", leave=False)
        try:
            texts = generate_answers(
                model, tokenizer, [p["prompt_ids"] for p in problems], self.max_new_tokens, self.batch_size,
                progress=bar.update if bar is not None else None, synced=sharding.is_sharded(model),
            )
        finally:
            model.train(was_training)
            if bar is not None:
                bar.close()
        return score_answers(problems, texts)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        # Under FSDP2 every rank generates (in lockstep: each forward gathers the shards), rank 0 reports; otherwise
        # rank 0 alone generates and the other ranks wait for it at their next collective.
        if self.num_problems == 0 or not (trainer.is_global_zero or sharding.is_sharded(pl_module.model)):
            return
        rows = self.evaluate(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        n, correct = len(rows), sum(r["correct"] for r in rows)
        acc = correct / n if n else float("nan")
        self.results[when] = acc
        path = None if self._log_dir is None else os.path.join(self._log_dir, f"eval_{when}.jsonl")
        if path is not None:
            write_jsonl(path, rows)
        rank_zero_info(f"Answer accuracy {when} training: {acc:.1%} ({correct}/{n} held-out problems"
                       + (f"; per problem: {path})" if path else ")"))
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"eval/accuracy_{when}": acc}, step=trainer.global_step)
        if when == "after" and "before" in self.results:
            rank_zero_info(
                f"Answer accuracy: {self.results['before']:.1%} before → {acc:.1%} after "
                f"({(acc - self.results['before']) * 100:+.1f} points)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wanted = self.num_problems or self.retention.config.enabled
        self._log_dir = trainer.log_dir if wanted else None  # on every rank: under DDP, a collective call
        if self.num_problems:
            sharding.check_gathering(trainer, "eval (answer accuracy)", "eval.num_problems: 0")
        if self.before:
            self._run(trainer, pl_module, "before")
        self.retention.before(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "after")
        self.retention.after(trainer, pl_module, self._log_dir)
