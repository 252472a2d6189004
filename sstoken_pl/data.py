"""``SFTDataModule``: SFT data from local files, a hub dataset or the built-in synthetic task, as padded batches.

Record formats (``data.format``; ``auto`` picks one from the first record's fields):

- ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``; every
  assistant turn is trained on.
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``.
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``; a non-empty ``input`` is appended to the
  instruction after a blank line.
- ``gsm8k``: ``{"question": ..., "answer": ...}``; the answer's last line is ``#### <final answer>``, and its
  calculator annotations (``<<48/2=24>>``) are removed by default.

Sources (``data.path``): a ``.json`` (an array of records, or one record per line), ``.jsonl`` or ``.parquet``
file; a directory of them, whose splits are inferred from file names as Hugging Face ``datasets`` does
(``train*``; ``validation*``, ``valid*``, ``val*``, ``dev*``; ``test*``; any other file is training data); or a
hub dataset name. Without ``data.val_path`` the validation records are the source's validation split, else its test
split, else a seeded ``val_size`` share held out of the training records.

On the built-in task, training batches also carry ``noise`` (``BoolTensor[B, T]``, aligned with ``labels``, padded
with False): True on the response tokens whose text overlaps injected noise (the ground truth of the synthetic task's
``noise_spans``: filler pieces, and the wrong result and answer under label noise), for measuring what a selection
method drops. Validation batches and file datasets have no such key.

Samples are rendered and labelled by ``sstoken_pl.templates`` (the tokenizer's chat template, or the plain
``### Instruction:`` / ``### Response:`` template). Batches are dicts of ``LongTensor``: ``input_ids``,
``attention_mask``, ``labels`` (``[B, T]``, right-padded to the longest sample; ``labels`` is ``-100`` on prompt
and padding) and ``index`` (``[B]``: the record's position in its file or split, stable across runs).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from typing import Any, Literal, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from sstoken_pl.errors import ConfigError, DataError
from sstoken_pl.loss import IGNORE_INDEX
from sstoken_pl.synthetic import SyntheticTask
from sstoken_pl.templates import ROLES, Messages, encode_weighted_messages, prompt_ids, to_messages

Format = Literal["auto", "prompt_completion", "messages", "alpaca", "gsm8k"]
# Each format's required fields, in the order ``auto`` tries them.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
}
DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")
# A file name's split, from its first word (as Hugging Face datasets infers splits): train, validation or test.
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_FIRST_WORD = re.compile(r"^([a-z]+)(?=[-._ 0-9])")

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

# A raw record and where it comes from ("train.jsonl line 3"), for error messages.
Record = tuple[str, dict[str, Any]]


def extract_final_answer(text: str) -> Optional[str]:
    """The final answer of a solution: after the last ``####`` (its first number, else its first line), else the
    last number in the text; commas removed. ``None`` when there is none.
    """
    if "####" in text:
        lines = text.rsplit("####", 1)[1].strip().splitlines()
        tail = lines[0].strip() if lines else ""
        found = _NUMBER.search(tail)
        answer = found.group() if found else tail.rstrip(".")
    else:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else ""
    answer = answer.replace(",", "")
    return answer or None


# ---------------------------------------------------------------------------------------------------- reading
def _read_jsonl(file: str) -> list[Record]:
    records: list[Record] = []
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((f"{file} line {line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{file} line {line_no}: malformed JSON ({err.msg})") from None
    return records


def _read_json(file: str) -> list[Record]:
    with open(file, encoding="utf-8") as f:
        text = f.read()
    if not text.lstrip().startswith("["):
        return _read_jsonl(file)  # JSON Lines under a .json name, as Hugging Face datasets accepts
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{file} line {err.lineno}: malformed JSON ({err.msg})") from None
    return [(f"{file} record {i}", row) for i, row in enumerate(rows, 1)]


def _read_parquet(file: str) -> list[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(file).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{file}: not a readable Parquet file ({err})") from None
    return [(f"{file} row {i}", row) for i, row in enumerate(rows, 1)]


def read_file(file: str) -> list[Record]:
    """The records of one ``.json``/``.jsonl``/``.parquet`` file, each with its location; never empty."""
    ext = os.path.splitext(file)[1].lower()
    if ext not in DATA_EXTENSIONS:
        expected = ", ".join(DATA_EXTENSIONS)
        raise DataError(f"{file}: unsupported file type {ext or '(none)'!r}; expected one of {expected}")
    records = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[ext](file)
    if not records:
        raise DataError(f"{file}: the dataset is empty (no records)")
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return records


def _split_of(file_name: str) -> str:
    word = _FIRST_WORD.match(file_name.lower())
    return _SPLIT_NAMES.get(word.group(1), "train") if word else "train"


def _read_hub(name: str, config: Optional[str] = None) -> dict[str, list[Record]]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, config)
    except (OSError, ValueError) as err:
        raise DataError(
            f"data.path {name!r}: no such local file or directory, and it could not be loaded from the Hugging Face "
            f"hub ({err}); give a local .json/.jsonl/.parquet file or directory, or a reachable hub dataset"
        ) from None
    return {
        split: [(f"{name}[{split}] row {i}", row) for i, row in enumerate(rows, 1)]
        for split, rows in loaded.items()
    }


def load_splits(path: str, hub_config: Optional[str] = None) -> dict[str, list[Record]]:
    """The records of a data source by split (``train``, ``validation``, ``test``); a single file is ``train``.
    ``hub_config``: the configuration of a hub dataset (``openai/gsm8k`` has ``main`` and ``socratic``)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return {"train": read_file(path)}
    if os.path.isdir(path):
        splits: dict[str, list[Record]] = {}
        for name in sorted(os.listdir(path)):
            file = os.path.join(path, name)
            if os.path.isfile(file) and name.lower().endswith(DATA_EXTENSIONS):
                splits.setdefault(_split_of(name), []).extend(read_file(file))
        if not splits:
            raise DataError(f"{path}: the directory holds no {'/'.join(DATA_EXTENSIONS)} files")
        return splits
    if path.lower().endswith(DATA_EXTENSIONS) or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or directory")
    return _read_hub(path, hub_config)


# ---------------------------------------------------------------------------------------------------- records
def detect_format(record: Mapping[str, Any], where: str) -> str:
    """The format whose required fields the record has (``FORMAT_FIELDS`` order)."""
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in record for f in fields):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(fields)}" for fmt, fields in FORMAT_FIELDS.items())
    raise DataError(
        f"{where}: cannot detect the data format from the fields {sorted(record)}; expected the fields of one of "
        f"({expected}), or set data.format"
    )


def _text(record: Mapping[str, Any], field: str, where: str, fmt: str, optional: bool = False) -> str:
    if field not in record or (optional and record[field] is None):
        if optional:
            return ""
        raise DataError(f"{where}: the record has no {field!r} field (format {fmt})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def check_weight(value: Any, where: str) -> float:
    """A training weight from the data: a finite number ≥ 0 (0: not trained), else one ``DataError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where} must be a number ≥ 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{where} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def sample_weight(record: Mapping[str, Any], where: str) -> float:
    """The record's ``weight`` field (every format): multiplies the weight of each of its trained tokens; 1 if absent."""
    return check_weight(record["weight"], f"{where}: field 'weight'") if record.get("weight") is not None else 1.0


def _messages(record: Mapping[str, Any], where: str, system_prompt: Optional[str]) -> Messages:
    if "messages" not in record:
        raise DataError(f"{where}: the record has no 'messages' field (format messages)")
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    messages: Messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(
                f"{where}: messages[{i}] must be an object with a role in {ROLES} and a string content, got {turn!r}"
            )
        message = {"role": turn["role"], "content": turn["content"]}
        if "weight" in turn:
            weight = check_weight(turn["weight"], f"{where}: messages[{i}].weight")
            if weight and turn["role"] != "assistant":
                raise DataError(
                    f"{where}: messages[{i}].weight is {turn['weight']!r} on a {turn['role']} turn; only assistant "
                    f"turns are trained (give it weight 0 or none)"
                )
            if turn["role"] == "assistant":
                message["weight"] = weight
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn, so nothing to train on")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def normalise(
    record: Mapping[str, Any], fmt: str, where: str, system_prompt: Optional[str] = None, strip_calculator: bool = True
) -> tuple[Messages, str]:
    """A record of format ``fmt`` as chat messages and its gold answer (see ``SFTDataModule.eval_problems``)."""
    if fmt == "messages":
        messages = _messages(record, where, system_prompt)
        return messages, next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    if fmt == "prompt_completion":
        prompt, completion = _text(record, "prompt", where, fmt), _text(record, "completion", where, fmt)
        return to_messages(prompt, completion, system_prompt), completion
    if fmt == "alpaca":
        instruction, output = _text(record, "instruction", where, fmt), _text(record, "output", where, fmt)
        extra = _text(record, "input", where, fmt, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return to_messages(prompt, output, system_prompt), output
    if fmt == "gsm8k":
        question, answer = _text(record, "question", where, fmt), _text(record, "answer", where, fmt)
        if strip_calculator:
            answer = _CALCULATOR.sub("", answer)
        return to_messages(question, answer, system_prompt), extract_final_answer(answer) or answer.strip()
    raise ConfigError(f"data.format must be one of auto, {', '.join(FORMAT_FIELDS)}; got {fmt!r}")


# ---------------------------------------------------------------------------------------------------- batches
class SFTCollator:
    """Pads samples (``input_ids``, ``labels`` lists and an ``index``) on the right to the longest one.

    Returns ``input_ids``, ``attention_mask``, ``labels`` as ``LongTensor[B, T]`` (padding: ``pad_token_id``, 0
    and -100) and ``index`` as ``LongTensor[B]``; ``noise`` as ``BoolTensor[B, T]`` (padding: False) when every
    sample carries a ``noise`` list (the built-in task's training samples); ``token_weights`` as ``FloatTensor[B, T]``
    (padding: 0) when every sample carries them (training data with a ``weight`` field: ``sstoken_pl.token_loss``
    multiplies each token's loss by its weight).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

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


class SFTDataModule(pl.LightningDataModule):
    """SFT data: records from files, a hub dataset or the built-in synthetic task, tokenised with their labels.

    Args:
        path: a ``.json``/``.jsonl``/``.parquet`` file, a directory of them, or a hub dataset name; ``null`` uses
            the built-in synthetic arithmetic task (``synthetic``).
        format: record format; ``auto`` detects it from the first record's fields.
        val_path: validation records (file, directory or hub name); default: the source's validation (else test)
            split, else ``val_size`` held out of the training records.
        val_size: share of the training records held out for validation when there is no validation source.
        tokenizer: tokenizer source (``byte``, ``byte-chat``, a directory or hub name); default: the model's
            (``model.tokenizer``). A tokenizer object may also be given in Python.
        max_length: samples are truncated to this many tokens; those left with no response token are dropped.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size; default: ``batch_size``.
        num_workers: DataLoader worker processes.
        seed: seed of the training shuffle and of the validation hold-out.
        max_samples: use only the first this many records of each split (quick runs).
        system_prompt: a system message put first in every sample that has none.
        synthetic: the built-in task's settings (used when ``path`` is ``null``).
        strip_calculator_annotations: remove GSM8K calculator annotations (``<<48/2=24>>``) from the answers.
        hub_config: the configuration of a hub dataset given as ``path`` (``datasets.load_dataset(path,
            hub_config)``), e.g. ``main`` for ``openai/gsm8k``; also used for a hub ``val_path``.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        format: Format = "auto",
        val_path: Optional[str] = None,
        val_size: float = 0.05,
        tokenizer: Optional[str] = None,
        max_length: int = 2048,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        max_samples: Optional[int] = None,
        system_prompt: Optional[str] = None,
        synthetic: SyntheticTask = SyntheticTask(),
        strip_calculator_annotations: bool = True,
        hub_config: Optional[str] = None,
    ) -> None:
        super().__init__()
        if format not in ("auto", *FORMAT_FIELDS):
            raise ConfigError(f"data.format must be one of auto, {', '.join(FORMAT_FIELDS)}; got {format!r}")
        if not 0.0 <= val_size < 1.0:
            raise ConfigError(f"data.val_size must be in [0, 1), got {val_size!r}")
        if max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {max_length!r}")
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "max_samples": max_samples}
        for name, value in sizes.items():
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be ≥ 0, got {num_workers!r}")
        if path is None and val_path is not None:
            raise ConfigError("data.val_path needs data.path (the synthetic task has its own validation split)")
        self.path = path
        self.format = format
        self.val_path = val_path
        self.val_size = val_size
        self.tokenizer_source = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_samples = max_samples
        self.system_prompt = system_prompt
        self.synthetic = SyntheticTask(**synthetic) if isinstance(synthetic, dict) else synthetic
        self.strip_calculator_annotations = strip_calculator_annotations
        self.hub_config = hub_config
        self.tokenizer: Any = None
        self.train_samples: list[dict[str, Any]] = []
        self.val_samples: list[dict[str, Any]] = []
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.dropped: dict[str, int] = {}
        self.weighted = False  # some record carries a weight (per message or per sample): batches get token_weights
        self.noise_unplaced: dict[str, int] = {}
        self._train_sampler: Optional[ResumableSampler] = None
        self._resume_position: Optional[dict[str, Any]] = None  # from a checkpoint, applied to the next loader

    # ------------------------------------------------------------------ tokenizer
    def _resolve_tokenizer(self) -> Any:
        source = self.tokenizer_source
        if source is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            tokenizer = getattr(module, "tokenizer", None)
            if tokenizer is None:
                raise ConfigError(
                    "data.tokenizer is not set and there is no model with a `tokenizer` attribute to take it from"
                )
        elif isinstance(source, str):
            from sstoken_pl.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(source)
        else:
            tokenizer = source
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        return tokenizer

    @property
    def pad_token_id(self) -> int:
        """The id right padding uses: the tokenizer's pad token, else its EOS token."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    # ------------------------------------------------------------------ records
    def _samples(self, records: list[Record], role: str) -> list[dict[str, Any]]:
        """Normalised samples ``{messages, answer, index, where}``; ``index`` is the position in ``records``."""
        records = records[: self.max_samples] if self.max_samples else records
        if not records:
            raise DataError(f"the {role} data is empty (no records)")
        fmt = self.format if self.format != "auto" else detect_format(records[0][1], records[0][0])
        samples, user_last, empty = [], [], []
        for index, (where, record) in enumerate(records):
            messages, answer = normalise(record, fmt, where, self.system_prompt, self.strip_calculator_annotations)
            sample = {"messages": messages, "answer": answer, "index": index, "where": where}
            weight = sample_weight(record, where)
            if weight != 1.0 or any("weight" in m for m in messages):
                sample["weight"] = weight
                self.weighted = True
            samples.append(sample)
            if messages[-1]["role"] == "user":
                user_last.append(where)
            if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
                empty.append(where)
        for found, what in ((user_last, "end with a user turn, which no answer follows (trained on the earlier "
                                        "answers only; the last turn is context for nothing)"),
                            (empty, "have an empty response (only the end-of-turn token is trained on)")):
            if found:
                rank_zero_warn(f"data: {len(found)} of {len(records)} {role} records {what}; the first: {found[0]}")
        return samples

    def _load_samples(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Training and validation samples."""
        if self.path is None:
            def synthetic(split: str) -> list[dict[str, Any]]:
                return [
                    {
                        "messages": to_messages(r["prompt"], r["completion"], self.system_prompt),
                        "answer": r["answer"],
                        "index": i,
                        "where": f"synthetic {split} problem {i + 1}",
                        "completion": r["completion"],
                        "noise_spans": r["noise_spans"],
                    }
                    for i, r in enumerate(self.synthetic.records(split))
                ][: self.max_samples]

            return synthetic("train"), synthetic("val")
        splits = load_splits(self.path, self.hub_config)
        if "train" not in splits:
            raise DataError(f"{self.path}: no training data (only the splits {sorted(splits)})")
        train = self._samples(splits["train"], f"training ({self.path})")
        if self.val_path is not None:
            val_splits = load_splits(self.val_path, self.hub_config)
            records = next(val_splits[s] for s in ("validation", "test", "train") if s in val_splits)
            return train, self._samples(records, f"validation ({self.val_path})")
        for split in ("validation", "test"):
            if split in splits:
                return train, self._samples(splits[split], f"{split} ({self.path})")
        n_val = round(self.val_size * len(train))
        if self.val_size > 0 and not 1 <= n_val < len(train):
            raise DataError(
                f"{self.path}: {len(train)} records are too few to hold out data.val_size={self.val_size} "
                "for validation; add records, change val_size, or give data.val_path"
            )
        held_out = set(random.Random(self.seed).sample(range(len(train)), n_val))
        return [s for s in train if s["index"] not in held_out], [s for s in train if s["index"] in held_out]

    # ------------------------------------------------------------------ tokenising
    def _tokenise(self, samples: list[dict[str, Any]], split: str) -> Any:
        """A ``datasets.Dataset`` of ``input_ids``, ``labels``, ``index`` (and, for the built-in task's training
        split, ``noise``: per token, 1 on response tokens overlapping injected noise), without the samples left with
        no response token after truncation (their number is warned about once, and kept in ``self.dropped``).

        Samples whose noise cannot be placed on their tokens (``noise_flags`` gives None) get an all-zero ``noise``;
        their number is warned about once, and kept in ``self.noise_unplaced``.
        """
        import datasets

        known_noise = split == "train" and bool(samples) and "noise_spans" in samples[0]
        weighted = split == "train" and self.weighted

        def encode(sample: dict[str, Any]) -> dict[str, Any]:
            try:
                ids, labels, weights = encode_weighted_messages(sample["messages"], self.tokenizer, self.max_length)
            except DataError as err:
                raise DataError(f"{sample['where']}: {err}") from None
            if weighted:
                scale = sample.get("weight", 1.0)
                labels = labels if scale > 0 else [IGNORE_INDEX] * len(labels)
            out = {"input_ids": ids, "labels": labels, "n_response": sum(l != IGNORE_INDEX for l in labels[1:])}
            if weighted:
                out["token_weights"] = [w * scale for w in weights]
            if known_noise:
                flags = noise_flags(ids, labels, sample["completion"], sample["noise_spans"], self.tokenizer)
                out["noise"] = [0] * len(ids) if flags is None else flags
                out["noise_placed"] = flags is not None
            return out

        # The synthetic task's completion and noise spans are needed only to place the noise of training samples.
        keep = ("messages", "where", "index") + (("completion", "noise_spans") if known_noise else ())
        keep += ("weight",) if weighted else ()
        rows = [{k: s.get(k, 1.0) if k == "weight" else s[k] for k in keep} for s in samples]
        dataset = datasets.Dataset.from_list(rows).map(
            encode,
            remove_columns=[c for c in keep if c != "index"],
            keep_in_memory=True,
            new_fingerprint=f"sstoken-{split}",  # no hashing of the tokenizer; nothing is cached
            desc=f"Tokenising {split} data",
        )
        if known_noise:
            unplaced = sum(not placed for placed in dataset["noise_placed"])
            self.noise_unplaced[split] = unplaced
            dataset = dataset.remove_columns("noise_placed")
            if unplaced:
                rank_zero_warn(
                    f"data: the noise labels of {unplaced} of {len(dataset)} {split} samples could not be placed on "
                    f"their tokens (the tokenizer's pieces do not decode back to the text); they count as clean"
                )
        kept = [i for i, n in enumerate(dataset["n_response"]) if n > 0]
        self.dropped[split] = len(dataset) - len(kept)
        why = f"after truncation to data.max_length={self.max_length}" + (" or weight 0" if weighted else "")
        if not kept:
            raise DataError(
                f"all {len(dataset)} {split} samples have no response token left {why}; "
                + ("raise max_length or give some a weight" if weighted else "raise max_length")
            )
        if self.dropped[split]:
            rank_zero_warn(
                f"data: dropped {self.dropped[split]} of {len(dataset)} {split} samples with no response token left {why}"
            )
        return dataset.select(kept, keep_in_memory=True).remove_columns("n_response")

    def prepare_data(self) -> None:
        """Reads the data here already: Lightning calls this before its loggers make the run's folder, so that a data
        error leaves no empty ``version_N`` behind (``setup`` is then a no-op on this process)."""
        self.setup()

    def setup(self, stage: Optional[str] = None) -> None:
        """Resolves the tokenizer, reads and tokenises the data (once)."""
        if self.train_dataset is not None:
            return
        self.tokenizer = self._resolve_tokenizer()
        self.train_samples, self.val_samples = self._load_samples()
        self.train_dataset = self._tokenise(self.train_samples, "train")
        self.val_dataset = self._tokenise(self.val_samples, "validation") if self.val_samples else None

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled by ``data.seed`` (``ResumableSampler``); a resumed run continues the epoch where its checkpoint
        left it (the position is in the checkpoint: ``state_dict``)."""
        self._check_val_interval()
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(
            len(self.train_dataset), self.seed, num_replicas=replicas, rank=rank, batch_size=self.batch_size
        )
        if self._resume_position is not None:
            self._apply_position(sampler, self._resume_position)
            self._resume_position = None
        self._train_sampler = sampler
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # the sampler shuffles; this generator only feeds the iterators' worker base seed (which would otherwise
            # be drawn from torch's global RNG and shift dropout and everything else seeded by it)
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=SFTCollator(self.pad_token_id),
            num_workers=self.num_workers,
        )

    # ------------------------------------------------------------------ resuming
    def _position_key(self, num_replicas: int) -> dict[str, int]:
        """What a saved position depends on: resuming it under other values would skip the wrong samples."""
        return {
            "num_samples": len(self.train_dataset),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_replicas": num_replicas,
        }

    def state_dict(self) -> dict[str, Any]:
        """The training data position, saved in checkpoints: the epoch of the order and the batches of it this rank
        has trained on (Lightning's count of processed batches: the loader itself has already prefetched more)."""
        trainer, sampler = self.trainer, self._train_sampler
        if trainer is None or sampler is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        position = {"epoch": sampler.epoch, "batches": batches, **self._position_key(sampler.num_replicas)}
        return {"train_position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_position")

    def _apply_position(self, sampler: ResumableSampler, position: Mapping[str, Any]) -> None:
        expected = self._position_key(sampler.num_replicas)
        saved = {k: position.get(k) for k in expected}
        if saved != expected:
            changed = {k: (saved[k], expected[k]) for k in expected if saved[k] != expected[k]}
            rank_zero_warn(
                f"data: the checkpoint's training data position does not fit this run's data (was, now: {changed}); "
                f"the epoch restarts from its first batch in the new order"
            )
            return
        start = int(position["batches"]) * self.batch_size
        epoch = int(position["epoch"])
        if start >= sampler.num_samples:  # saved at the end of an epoch: the next one starts from its beginning
            epoch, start = epoch + 1, 0
        sampler.resume(epoch, start)

    def _check_val_interval(self) -> None:
        """A ``trainer.val_check_interval`` (in batches) longer than an epoch is one clear error, not a traceback."""
        trainer = self.trainer
        interval = getattr(trainer, "val_check_interval", None) if trainer is not None else None
        if not isinstance(interval, int) or isinstance(interval, bool) or trainer.check_val_every_n_epoch is None:
            return
        batches = -(-len(self.train_dataset) // self.batch_size)
        if trainer.limit_val_batches != 0 and interval > batches:
            raise DataError(
                f"the training data has {len(self.train_dataset)} samples = {batches} batches of {self.batch_size}, "
                f"fewer than trainer.val_check_interval={interval}; lower val_check_interval, add data, or set "
                f"trainer.check_val_every_n_epoch: null to count it across epochs"
            )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=SFTCollator(self.pad_token_id),
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    # ------------------------------------------------------------------ evaluation
    def eval_problems(self, limit: Optional[int] = None, split: str = "validation") -> list[dict[str, Any]]:
        """Held-out problems for generation-based accuracy, in file order: ``{"prompt_ids", "prompt", "answer",
        "index"}``.

        ``split``: ``validation`` — what the module validates on (the source's validation split, else its test
        split, else the held-out share; the synthetic task's validation problems); ``test`` — the source's test
        split (a file or folder with a ``test*`` file). ``prompt_ids`` prompts the model for the last assistant
        turn; ``prompt`` is that turn's user message; ``answer`` is the gold final answer (the synthetic task's
        number, the text after GSM8K's ``####`` without commas, else the whole reference response).
        """
        if split not in ("validation", "test"):
            raise ConfigError(f"split must be 'validation' or 'test', got {split!r}")
        if self.tokenizer is None:
            self.tokenizer = self._resolve_tokenizer()
        if split == "validation":
            samples = self.val_samples or self._load_samples()[1]  # no tokenising of the training data
        else:
            if self.path is None:
                raise DataError("the built-in synthetic task has no test split; use split 'validation'")
            splits = load_splits(self.path, self.hub_config)
            if "test" not in splits:
                raise DataError(f"{self.path}: no test split (only {sorted(splits)}); name a file test*.jsonl")
            samples = self._samples(splits["test"], f"test ({self.path})")
        if not samples:
            raise DataError("the held-out split is empty")
        problems = []
        for sample in samples[:limit]:
            messages = sample["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            problems.append({
                "prompt_ids": prompt_ids(messages[:last], self.tokenizer),
                "prompt": messages[last - 1]["content"] if last else "",
                "answer": sample["answer"],
                "index": sample["index"],
            })
        return problems

