"""Data sources: the records of a ``.json``/``.jsonl``/``.parquet`` file, of a directory of them (splits inferred from
the file names) or of a hub dataset, each with where it comes from (for error messages)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from sstoken_pl.errors import ConfigError, DataError

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

# A raw record and where it comes from ("train.jsonl line 3"), for error messages.
Record = tuple[str, dict[str, Any]]


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
    import datasets.config

    from sstoken_pl.hub import offline_kwargs

    try:
        cached_only = bool(offline_kwargs(name, "data.path", kind="dataset"))
    except ConfigError as err:
        raise DataError(str(err)) from None
    # Offline with a cached copy: datasets reads its cache when its offline flag is set. It reads HF_DATASETS_OFFLINE
    # once, at import, into datasets.config.HF_HUB_OFFLINE, so the flag is set there, for this call only.
    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = was or cached_only
    try:
        loaded = datasets.load_dataset(name, config)
    except (OSError, ValueError) as err:
        raise DataError(
            f"data.path {name!r}: no such local file or directory, and it could not be loaded from the Hugging Face "
            f"hub ({err}); give a local .json/.jsonl/.parquet file or directory, or a reachable hub dataset"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was
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
