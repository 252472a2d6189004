"""Retention: how much SFT made the model forget, as the change of two NLLs against the base model.

- ``general_nll`` (general-instruction NLL): the mean NLL per token of the human-written outputs of the Alpaca seed
  tasks (``seed_tasks.jsonl``: ``{"id", "name", "instruction", "instances": [{"input", "output"}], ...}``), every
  instance; the prompt is the instruction, plus ``"\\n\\n" + input`` when the input is not empty, the response is
  the output. Never trained on.
- ``other_nll`` (another domain's NLL): the mean NLL per token of the first ``max_samples`` GSM8K *test* answers
  (``{"question", "answer"}``, calculator annotations removed as for training) — or, for a run that trains on GSM8K
  (``data.format: gsm8k``, or ``auto`` on the folder of ``other_path``), the first ``max_samples`` of the built-in
  synthetic task's clean validation answers at the run's ``data.synthetic`` settings.

Each sample is rendered with the model's chat template exactly as training data is (``templates.encode_messages``),
with **no system prompt** (``data.system_prompt`` is ignored), so that the measure is the same for every config.
The NLL is token-weighted — the sum of the response tokens' NLL over their number —, computed in eval mode under
``torch.no_grad`` on the model as it is (a LoRA model, or an exported ``hf_model``).

The record (``retention_record``; ``<run dir>/retention.json`` at the end of ``fit``)::

    {"general_nll": {"base": x, "after": y, "delta": y - x, "tokens": n, "path": "..."},
     "other_nll":   {"base": ..., "after": ..., "delta": ..., "tokens": ..., "path": "..."}}

``delta`` = after − base: 0 means nothing forgotten, positive is worse. Without base values ``base`` and ``delta``
are ``null``. A measure whose data is absent is ``{"skipped": "<reason>", "path": "..."}``. ``fit`` also logs
``retention/general_nll_base`` (at fit start), ``retention/general_nll``, ``retention/general_nll_delta`` (at fit
end), and the same for ``other_nll``, to the run's logger (``metrics.csv`` for the CSV logger), and prints one line
per measure.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sstoken_pl.errors import ConfigError, DataError

GENERAL_PATH = "../shared/data/alpaca_seed_tasks/seed_tasks.jsonl"
OTHER_PATH = "../shared/data/gsm8k/test.jsonl"
LABELS = {"general_nll": "general-instruction NLL", "other_nll": "other-domain NLL"}
SYNTHETIC_SOURCE = "synthetic validation answers"

Pairs = list[tuple[str, str]]


@dataclass
class RetentionConfig:
    """``eval.retention``: the retention measures of ``fit`` (see ``sstoken_pl.retention``).

    Args:
        enabled: measure before and after training (skipped, with one logged reason, where the data are absent).
            Off by default (two NLL passes of a few minutes each on a CPU for SmolLM2-135M); ``tools/compare.py``
            turns it on for every run (``--eval.retention.enabled=true``).
        general_path: the Alpaca seed tasks (relative to the current folder).
        other_path: the GSM8K test file (relative to the current folder).
        max_samples: at most this many samples per measure (all 175 seed instances fit the default).
        batch_size: samples per forward pass.
        max_length: samples are truncated to this many tokens; default: ``data.max_length`` (2048 in ``evaluate``).
        base: the ``retention.json`` of an earlier run of the same base model on the same retention data (e.g. the
            first run of a comparison): its ``base`` values are taken instead of measuring the base model at fit
            start (the base pass costs as much as the final one). Each measure's source and response-token count
            must match this run's, else one ``ConfigError`` at fit start.
    """

    enabled: bool = False
    general_path: str = GENERAL_PATH
    other_path: str = OTHER_PATH
    max_samples: int = 200
    batch_size: int = 16
    max_length: Optional[int] = None
    base: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("max_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"eval.retention.{name} must be a positive integer, got {value!r}")


def _jsonl(path: str) -> list[tuple[str, dict]]:
    """``(where, record)`` of each non-empty line; a line that is not a JSON object is one ``DataError``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: a record must be a JSON object")
            rows.append((where, record))
    return rows


def _field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def read_seed_tasks(path: str, limit: Optional[int] = None) -> Pairs:
    """``(prompt, response)`` of every instance of the seed tasks, in file order, at most ``limit``."""
    pairs: Pairs = []
    for where, record in _jsonl(path):
        instruction = _field(record, "instruction", where)
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
        for instance in instances:
            if not isinstance(instance, dict):
                raise DataError(f"{where}: each of 'instances' must be an object {{input, output}}")
            extra = instance.get("input") or ""
            if not isinstance(extra, str):
                raise DataError(f"{where}: field 'input' must be a string")
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            pairs.append((prompt, _field(instance, "output", where)))
    return pairs[:limit]


def read_gsm8k(path: str, limit: Optional[int] = None) -> Pairs:
    """``(question, answer)`` of the first ``limit`` GSM8K records, calculator annotations removed (as training)."""
    from sstoken_pl.data import normalise

    pairs: Pairs = []
    for where, record in _jsonl(path)[:limit]:
        messages, _ = normalise(record, "gsm8k", where)
        pairs.append((messages[-2]["content"], messages[-1]["content"]))
    return pairs


def synthetic_pairs(task: Any = None, limit: Optional[int] = None) -> Pairs:
    """``(prompt, completion)`` of the built-in task's clean validation problems (``task``: a ``SyntheticTask``)."""
    from sstoken_pl.synthetic import SyntheticTask

    task = SyntheticTask() if task is None else (SyntheticTask(**task) if isinstance(task, dict) else task)
    return [(r["prompt"], r["completion"]) for r in task.records("val")[:limit]]


def sources(
    config: RetentionConfig, gsm8k_run: bool = False, synthetic: Any = None, strict: bool = False,
    option: str = "eval.retention.{}",
) -> dict[str, tuple[str, Pairs] | str]:
    """Each measure's ``(source, pairs)``, or the reason it is skipped (a missing file; ``strict``: a ConfigError).
    ``option`` names the setting of a path in messages (``"--{}"`` for the command line)."""
    out: dict[str, tuple[str, Pairs] | str] = {}
    for name, path, reader in (("general_nll", config.general_path, read_seed_tasks),
                               ("other_nll", config.other_path, read_gsm8k)):
        if name == "other_nll" and gsm8k_run:
            out[name] = (SYNTHETIC_SOURCE, synthetic_pairs(synthetic, config.max_samples))
        elif not os.path.isfile(path):
            reason = f"no file {path} ({option.format(name.split('_')[0] + '_path')})"
            if strict:
                raise ConfigError(f"retention: {LABELS[name]} needs its data: {reason}")
            out[name] = reason
        else:
            out[name] = (path, reader(path, config.max_samples))
    return out


def trains_on_gsm8k(data_format: Optional[str], data_path: Optional[str], other_path: str = OTHER_PATH) -> bool:
    """Whether a run's data is GSM8K: ``format: gsm8k``, or ``auto`` on the folder (or file) of ``other_path``."""
    if data_format == "gsm8k":
        return True
    if data_format not in (None, "auto") or not data_path:
        return False
    here = os.path.abspath(os.path.expanduser(data_path))
    other = os.path.abspath(os.path.expanduser(other_path))
    return here in (other, os.path.dirname(other))


def encode_pairs(pairs: Pairs, tokenizer: Any, max_length: Optional[int] = None) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of each pair, rendered as training data without a system prompt; those left with no
    response token after truncation are dropped."""
    from sstoken_pl.loss import IGNORE_INDEX
    from sstoken_pl.templates import encode_messages, to_messages

    encoded = [encode_messages(to_messages(p, r), tokenizer, max_length) for p, r in pairs]
    return [(ids, labels) for ids, labels in encoded if any(t != IGNORE_INDEX for t in labels[1:])]


@torch.no_grad()
def mean_nll(model: torch.nn.Module, encoded: list[tuple[list[int], list[int]]], pad_token_id: int,
             batch_size: int = 16) -> tuple[float, int]:
    """``(sum of the response tokens' NLL / their number, number)`` of ``encoded``, in eval mode, right-padded
    batches of similar lengths (the sum does not depend on the order)."""
    from sstoken_pl.loss import IGNORE_INDEX, per_token_nll, response_mask
    from sstoken_pl.models import response_logits

    device = next(model.parameters()).device
    order = sorted(encoded, key=lambda e: len(e[0]))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, (seq, lab) in enumerate(chunk):
                ids[i, : len(seq)], mask[i, : len(seq)], labels[i, : len(seq)] = (
                    torch.tensor(seq), 1, torch.tensor(lab))
            batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
            nll = per_token_nll(response_logits(model, batch), batch["labels"])
            total += float(nll.double().sum())
            count += int(response_mask(batch["labels"]).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("retention: no response token to score")
    return total / count, count


def _base_value(base: Optional[dict], name: str) -> Optional[float]:
    """The base value of a measure from ``base``: a record (its ``after``) or plain numbers ``{name: x}``."""
    value = (base or {}).get(name)
    if isinstance(value, dict):
        value = value.get("after")
    return None if value is None else float(value)


def retention_record(
    model: torch.nn.Module,
    tokenizer: Any,
    config: Optional[RetentionConfig] = None,
    base: Optional[dict] = None,
    gsm8k_run: bool = False,
    synthetic: Any = None,
    strict: bool = False,
    prepared: Optional[dict[str, tuple[str, Pairs] | str]] = None,
    option: str = "eval.retention.{}",
) -> dict[str, dict[str, Any]]:
    """The retention record (module docstring) of ``model``. ``base``: the base model's record (or ``{name: x}``),
    for ``base``/``delta``; None leaves them null. ``prepared``: the output of ``sources`` (read once, reused)."""
    config = config or RetentionConfig()
    prepared = prepared if prepared is not None else sources(config, gsm8k_run, synthetic, strict, option)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    record: dict[str, dict[str, Any]] = {}
    for name, source in prepared.items():
        if isinstance(source, str):
            record[name] = {"skipped": source, "path": getattr(config, f"{name.split('_')[0]}_path")}
            continue
        path, pairs = source
        value, tokens = mean_nll(model, encode_pairs(pairs, tokenizer, config.max_length or 2048), pad, config.batch_size)
        record[name] = {"base": None, "after": value, "delta": None, "tokens": tokens, "path": path}
    return with_base(record, base)


def with_base(record: dict[str, dict[str, Any]], base: Optional[dict]) -> dict[str, dict[str, Any]]:
    """``record`` with ``base`` and ``delta`` filled from ``base`` (a record, or ``{name: x}``) where it has them."""
    out = {}
    for name, entry in record.items():
        before = None if "skipped" in entry else _base_value(base, name)
        if before is not None:
            entry = {**entry, "base": before, "delta": entry["after"] - before}
        out[name] = entry
    return out


def format_line(name: str, entry: dict[str, Any]) -> str:
    """``general-instruction NLL 1.234 → 1.250 (+0.016)``, the absolute value, or why it was skipped."""
    if "skipped" in entry:
        return f"{LABELS[name]}: skipped ({entry['skipped']})"
    tail = f"  [{entry['tokens']} tokens of {entry['path']}]"
    if entry.get("base") is None:
        return f"{LABELS[name]} {entry['after']:.3f}" + tail
    return f"{LABELS[name]} {entry['base']:.3f} → {entry['after']:.3f} ({entry['delta']:+.3f})" + tail


def metrics(record: dict[str, dict[str, Any]], when: str) -> dict[str, float]:
    """The logged metrics of a record: ``retention/<name>_base`` (``when="before"``), or ``retention/<name>`` and
    ``retention/<name>_delta`` (``when="after"``)."""
    out: dict[str, float] = {}
    for name, entry in record.items():
        if "skipped" in entry:
            continue
        if when == "before":
            out[f"retention/{name}_base"] = entry["after"]
        else:
            out[f"retention/{name}"] = entry["after"]
            if entry.get("delta") is not None:
                out[f"retention/{name}_delta"] = entry["delta"]
    return out


def read_base(path: str, prepared: dict[str, tuple[str, Pairs] | str], tokenizer: Any, max_length: Optional[int],
              option: str = "eval.retention.base") -> dict[str, dict[str, Any]]:
    """The base values of ``path`` (a record written by ``fit`` or ``evaluate``) as a record whose ``after`` is the
    base, for each measure of ``prepared`` that is not skipped. The measure's source and its number of response
    tokens (``encode_pairs`` here, no forward) must equal the record's: else the values would be of other data."""
    from sstoken_pl.loss import IGNORE_INDEX

    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{option}={path}: not a readable retention record ({err})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{option}={path}: a retention record is a mapping of measures")
    out: dict[str, dict[str, Any]] = {}
    for name, source in prepared.items():
        if isinstance(source, str):
            continue
        entry = record.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("base"), (int, float)):
            raise ConfigError(f"{option}={path}: no base value of {name} ({LABELS[name]})")
        where, pairs = source
        tokens = sum(sum(t != IGNORE_INDEX for t in labels[1:]) for _, labels in encode_pairs(pairs, tokenizer, max_length))
        if (entry.get("path"), entry.get("tokens")) != (where, tokens):
            raise ConfigError(f"{option}={path}: {name} was measured on {entry.get('path')} ({entry.get('tokens')} "
                              f"response tokens), this run measures {where} ({tokens}): not the same data")
        out[name] = {"base": None, "after": float(entry["base"]), "delta": None, "tokens": tokens, "path": where}
    return out


def write_record(path: str, record: dict[str, dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


class FitRetention:
    """The retention measures of one ``fit`` (driven by ``AnswerAccuracy``): the base at fit start, the trained
    model at fit end, ``retention.json`` in the run's log directory, logged metrics and one printed line each."""

    def __init__(self, config: RetentionConfig) -> None:
        self.config = config
        self.prepared: Optional[dict[str, tuple[str, Pairs] | str]] = None
        self.base: Optional[dict[str, dict[str, Any]]] = None
        self.record: Optional[dict[str, dict[str, Any]]] = None

    def _why_not(self, trainer: Any) -> Optional[str]:
        from sstoken_pl import sharding

        kind = sharding.strategy_kind(trainer.strategy)
        if kind == "fsdp1" or (kind == "deepspeed" and sharding.deepspeed_stage(trainer.strategy) >= 3):
            return "not implemented under FSDP1 / DeepSpeed ZeRO-3 (rank 0 cannot run the sharded model alone)"
        return None

    def _measure(self, trainer: Any, pl_module: Any, base: Optional[dict]) -> Optional[dict[str, dict[str, Any]]]:
        from sstoken_pl import sharding

        model = pl_module.model
        # under FSDP2 every rank runs the same forwards in lockstep; otherwise rank 0 alone
        if not (trainer.is_global_zero or sharding.is_sharded(model)):
            return None
        tokenizer = getattr(pl_module, "tokenizer", None) or trainer.datamodule.tokenizer
        config = self.config
        if config.max_length is None:
            config = RetentionConfig(**{**vars(config), "max_length": getattr(trainer.datamodule, "max_length", None)})
        return retention_record(model, tokenizer, config, base=base, prepared=self.prepared)

    def _read_base(self, trainer: Any, pl_module: Any) -> dict[str, dict[str, Any]]:
        tokenizer = getattr(pl_module, "tokenizer", None) or trainer.datamodule.tokenizer
        max_length = self.config.max_length or getattr(trainer.datamodule, "max_length", None) or 2048
        return read_base(self.config.base, self.prepared, tokenizer, max_length)

    def before(self, trainer: Any, pl_module: Any) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        if not self.config.enabled:
            return
        why = self._why_not(trainer)
        if why is not None:
            self.config = RetentionConfig(**{**vars(self.config), "enabled": False})
            rank_zero_info(f"Retention measures skipped: {why}")
            return
        dm = getattr(trainer, "datamodule", None)
        gsm8k = trains_on_gsm8k(getattr(dm, "format", None), getattr(dm, "path", None), self.config.other_path)
        self.prepared = sources(self.config, gsm8k, getattr(dm, "synthetic", None))
        for name, source in self.prepared.items():
            if isinstance(source, str):
                rank_zero_info(f"Retention: {LABELS[name]} skipped: {source}")
        if all(isinstance(s, str) for s in self.prepared.values()):
            return
        if self.config.base is not None:
            self.base = self._read_base(trainer, pl_module)
        else:
            self.base = self._measure(trainer, pl_module, None)
        if self.base is not None and trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(metrics(self.base, "before"), step=trainer.global_step)

    def after(self, trainer: Any, pl_module: Any, log_dir: Optional[str]) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        if not self.config.enabled or self.prepared is None or all(isinstance(s, str) for s in self.prepared.values()):
            return
        record = self._measure(trainer, pl_module, self.base)
        if record is None or not trainer.is_global_zero:
            return
        self.record = record
        if log_dir is not None:
            write_record(os.path.join(log_dir, "retention.json"), record)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics(record, "after"), step=trainer.global_step)
        for name, entry in record.items():
            if "skipped" not in entry:
                rank_zero_info(format_line(name, entry))
