"""A store of per-token scores of a fixed model (its NLL of each training sample's response tokens), on disk.

The authors' release computes the base model's per-token losses once, offline, before training. ``python -m
sstoken_pl score`` does the same into a store; ``HistoryModel(mode="base", scores=DIR)`` and
``ReferenceModel(scores=DIR)`` then read each batch's values by ``batch["index"]`` with no forward at all, and every
method and seed of a comparison reads the one store.

Layout of a store directory:

- ``meta.json``: ``{"version", "fingerprint", "dtype", "num_samples", "complete"}``;
- ``shard-RRR-000000.f32``, …: the values of the samples of one shard (rank RRR's), float32, back to back (only
  the response positions, in order);
- ``shard-RRR-000000.idx.npy``: ``int64 [n, 3]``: per sample its index, offset and length in the shard's values;
- ``index.npy`` (a finished store): every shard's rows with their shard number, sorted by sample index.

Why NumPy memory maps: the values are ragged (one run of response tokens per sample) and read by sample index in
the training order, so reading must be random access without loading the store (memory flat in the dataset size:
the OS pages in what a batch touches); a shard becomes visible only when its index file is renamed into place, so an
interrupted pass loses at most the shard being written and resumes with the samples no finished shard holds.
safetensors cannot be appended to or read ragged by index without a table of our own; Arrow via ``datasets`` can,
but adds a copy of the dataset's machinery for what is two flat arrays.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from sstoken_pl.errors import ConfigError

VERSION = 1


class ScoreReader:
    """Per-sample values by sample index, read into a batch's layout: what ``HistoryModel`` and ``ReferenceModel``
    read their fixed model's values from. Two cases: ``ScoreStore`` (on disk, made once by ``python -m sstoken_pl
    score``, shared by every run) and ``sstoken_pl.token_cache.SampleCache`` (in memory, filled by the first forward
    over each sample, for one fit). Subclasses give ``values(index)``; ``lookup`` is common."""

    path: str = "memory"

    def values(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def lookup(self, index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[B, T]`` on ``positions``' device: each sample's stored values scattered into its ``True``
        positions (the response positions of its labels), 0 elsewhere. A sample whose stored length differs from its
        number of positions is one clear error (a store of other data or another tokenizer)."""
        rows = []
        counts = positions.sum(dim=1).tolist()
        for b, i in enumerate(index.tolist()):
            values = self.values(i)
            if len(values) != counts[b]:
                raise ConfigError(
                    f"scores: {self.path} holds {len(values)} values for sample {i}, whose batch has {counts[b]} "
                    f"response tokens: the store was made from other data, tokenizer or max_length"
                )
            rows.append(values.float() if isinstance(values, torch.Tensor) else torch.from_numpy(np.array(values)))
        flat = torch.cat(rows) if rows else torch.zeros(0)
        out = torch.zeros(positions.shape, dtype=torch.float32)
        out[positions.cpu()] = flat
        return out.to(positions.device)


class ScoreStore(ScoreReader):
    """Per-sample float32 values, by sample index. Open with ``ScoreStore(path)``; write with ``ScoreStore.create``."""

    def __init__(self, path: str) -> None:
        meta = os.path.join(path, "meta.json")
        if not os.path.isfile(meta):
            raise ConfigError(f"scores: {path} is not a score store (no meta.json); make one with `python -m sstoken_pl score`")
        with open(meta) as f:
            self.meta = json.load(f)
        if self.meta.get("version") != VERSION:
            raise ConfigError(f"scores: {path} is a store of version {self.meta.get('version')}, this code reads {VERSION}")
        self.path = path
        self._open()

    def _open(self) -> None:
        # the index: one table sorted by sample index (index, offset, length, shard); a finished store keeps it in
        # index.npy, memory-mapped like the values, so opening a store costs no memory whatever its size
        self._values: list[np.ndarray] = []
        names = self.shards(self.path)
        for name in names:
            values = os.path.join(self.path, name + ".f32")
            size = os.path.getsize(values) // 4
            self._values.append(np.memmap(values, dtype=np.float32, mode="r", shape=(size,)) if size else np.zeros(0, np.float32))
        merged = os.path.join(self.path, "index.npy")
        if self.meta.get("complete") and os.path.isfile(merged) and self.meta.get("shards") == names:
            table = np.load(merged, mmap_mode="r")
        else:
            table = build_index(self.path, names)
        self._table = table
        self._index = table[:, 0]

    def indices(self) -> np.ndarray:
        """The sample indices the store holds, sorted."""
        return np.asarray(self._index)

    def _row(self, index: int) -> int:
        i = int(np.searchsorted(self._index, index))
        return i if i < len(self._index) and self._index[i] == index else -1

    @staticmethod
    def shards(path: str) -> list[str]:
        """The finished shards of a store (those whose index file exists), in order."""
        if not os.path.isdir(path):
            return []
        return sorted(n[: -len(".idx.npy")] for n in os.listdir(path) if n.endswith(".idx.npy"))

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.meta["fingerprint"]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def __contains__(self, index: int) -> bool:
        return self._row(int(index)) >= 0

    def __len__(self) -> int:
        return len(self._index)

    def values(self, index: int) -> np.ndarray:
        """The stored values of sample ``index`` (a read-only view)."""
        i = self._row(int(index))
        if i < 0:
            raise ConfigError(f"scores: {self.path} holds no values for sample {int(index)}")
        _, offset, length, shard = (int(v) for v in self._table[i])
        return self._values[shard][offset : offset + length]

    # ------------------------------------------------------------------ writing
    @classmethod
    def create(cls, path: str, fingerprint: Mapping[str, Any], num_samples: int, rank: int = 0) -> "ScoreWriter":
        """A writer into ``path``: a new store, or the continuation of an interrupted one with the same fingerprint
        (its finished shards are kept; ``ScoreWriter.done`` says which samples they hold). Under data parallelism
        each rank writes shards of its own (``rank`` in their names)."""
        return ScoreWriter(path, dict(fingerprint), num_samples, rank)


def build_index(path: str, names: list[str]) -> np.ndarray:
    """``int64 [n, 4]``: (sample index, offset, length, shard number) of every sample of the shards, by index."""
    tables = []
    for k, name in enumerate(names):
        table = np.load(os.path.join(path, name + ".idx.npy"))
        tables.append(np.concatenate([table, np.full((len(table), 1), k, dtype=np.int64)], axis=1))
    table = np.concatenate(tables) if tables else np.zeros((0, 4), dtype=np.int64)
    return table[np.argsort(table[:, 0], kind="stable")]


class ScoreWriter:
    """Appends shards to a store; ``finish()`` marks it complete."""

    def __init__(self, path: str, fingerprint: dict[str, Any], num_samples: int, rank: int = 0) -> None:
        os.makedirs(path, exist_ok=True)
        meta_path = os.path.join(path, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("fingerprint") != fingerprint:
                diff = describe_mismatch(meta.get("fingerprint") or {}, fingerprint)
                raise ConfigError(f"scores: {path} holds scores of something else ({diff}); choose another --out or delete it")
        self.path, self.fingerprint, self.num_samples, self.rank = path, fingerprint, int(num_samples), int(rank)
        self._write_meta(complete=False)
        existing = ScoreStore.shards(path)
        self.done: set[int] = set(ScoreStore(path).indices().tolist()) if existing else set()
        mine = [n for n in existing if n.startswith(f"shard-{self.rank:03d}-")]
        self._next = (int(mine[-1].rsplit("-", 1)[1]) + 1) if mine else 0
        for name in os.listdir(path):  # a shard of this rank whose index never landed was interrupted: its values go
            if name.startswith(f"shard-{self.rank:03d}-") and name.endswith(".f32") and name[:-4] not in existing:
                os.remove(os.path.join(path, name))

    def _write_meta(self, complete: bool, shards: Optional[list[str]] = None) -> None:
        meta = {"version": VERSION, "fingerprint": self.fingerprint, "dtype": "float32",
                "num_samples": self.num_samples, "complete": complete, "shards": shards}
        tmp = os.path.join(self.path, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.path, "meta.json"))

    def write(self, samples: Iterable[tuple[int, Sequence[float] | np.ndarray]]) -> int:
        """One shard of ``(sample index, values)``; samples already stored are skipped. Returns how many it wrote."""
        rows, chunks, offset = [], [], 0
        for index, values in samples:
            index = int(index)
            if index in self.done:
                continue
            values = np.asarray(values, dtype=np.float32)
            rows.append((index, offset, len(values)))
            chunks.append(values)
            offset += len(values)
            self.done.add(index)
        if not rows:
            return 0
        name = f"shard-{self.rank:03d}-{self._next:06d}"
        self._next += 1
        np.concatenate(chunks).tofile(os.path.join(self.path, name + ".f32"))
        tmp = os.path.join(self.path, name + ".idx.tmp.npy")
        np.save(tmp, np.asarray(rows, dtype=np.int64))
        os.replace(tmp, os.path.join(self.path, name + ".idx.npy"))  # the shard exists from here on
        return len(rows)

    def finish(self) -> None:
        """Marks the store complete once every sample is in it (under data parallelism: call it on one rank after
        all have written; it counts what is on disk)."""
        names = ScoreStore.shards(self.path)
        table = build_index(self.path, names)
        self.done = set(table[:, 0].tolist())
        missing = self.num_samples - len(self.done)
        if missing > 0:
            raise RuntimeError(f"scores: {missing} of {self.num_samples} samples were not scored")
        tmp = os.path.join(self.path, "index.tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, os.path.join(self.path, "index.npy"))
        self._write_meta(complete=True, shards=names)


def describe_mismatch(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """Which fingerprint fields differ, ``field: stored → wanted``, for one error line."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, Mapping) or not d:
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(stored), flat(wanted)
    diffs = [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) if diffs else "nothing"


def check_store(path: str, fingerprint: Mapping[str, Any], key: str, num_samples: Optional[int] = None) -> ScoreStore:
    """The store at ``path`` if it was made for exactly this run (model, tokenizer, data, template, length) and is
    complete; else one ``ConfigError`` saying what differs."""
    store = ScoreStore(path)
    if store.fingerprint != dict(fingerprint):
        raise ConfigError(f"{key}: the store {path} was made for another run ({describe_mismatch(store.fingerprint, fingerprint)})")
    if not store.complete:
        raise ConfigError(f"{key}: the store {path} is unfinished ({len(store)} samples); run `python -m sstoken_pl score` again to finish it")
    if num_samples is not None and len(store) < num_samples:
        raise ConfigError(f"{key}: the store {path} holds {len(store)} samples, the training data {num_samples}")
    return store


# ---------------------------------------------------------------------------------------------------- fingerprints
def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _files_identity(path: Optional[str]) -> Any:
    """A data source's identity: the content hashes of its local files, else its name (a hub dataset)."""
    if path is None:
        return None
    if os.path.isfile(path):
        return {os.path.basename(path): _sha256(path)}
    if os.path.isdir(path):
        return {n: _sha256(os.path.join(path, n)) for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))}
    return path


def _model_identity(source: str) -> Any:
    """A model directory's identity: its config and the sizes and hashes of its weight files; else the name."""
    if not os.path.isdir(source):
        return source
    files = sorted(n for n in os.listdir(source) if n.endswith((".safetensors", ".bin", ".gguf")) or n == "config.json")
    return {n: _sha256(os.path.join(source, n)) for n in files}


def run_fingerprint(pl_module: Any, datamodule: Any, precision: str, source: str = "base") -> dict[str, Any]:
    """What a store's values depend on — the scoring model, the tokenizer, the data, its rendering and length, the
    precision — as a JSON-able dict. ``source``: ``base`` (the run's model before training: with LoRA the adapters
    off) or a reference model directory."""
    import dataclasses
    import hashlib

    hp = dict(getattr(pl_module, "hparams", {}) or {})
    if source == "base":
        model = {k: hp.get(k) for k in ("model_name_or_path", "gguf_file", "model_config", "dtype", "init_seed")}
    else:
        model = {"reference": os.path.abspath(source) if os.path.isdir(source) else source,
                 "files": _model_identity(source)}
    tok = getattr(datamodule, "tokenizer", None) or getattr(pl_module, "tokenizer", None)
    template = getattr(tok, "chat_template", None) or ""
    synthetic = getattr(datamodule, "synthetic", None)
    data = {
        "path": getattr(datamodule, "path", None),
        "files": _files_identity(getattr(datamodule, "path", None)),
        "hub_config": getattr(datamodule, "hub_config", None),
        "synthetic": dataclasses.asdict(synthetic) if dataclasses.is_dataclass(synthetic) and datamodule.path is None else None,
        "format": getattr(datamodule, "format", None),
        "system_prompt": getattr(datamodule, "system_prompt", None),
        "max_length": getattr(datamodule, "max_length", None),
        "max_samples": getattr(datamodule, "max_samples", None),
        "strip_calculator_annotations": getattr(datamodule, "strip_calculator_annotations", None),
    }
    return json.loads(json.dumps({
        "model": model,
        "precision": str(precision),
        "tokenizer": {"name": getattr(tok, "name_or_path", None), "vocab": len(tok) if tok is not None else None,
                      "template": hashlib.sha256(template.encode()).hexdigest()[:16]},
        "data": data,
    }, default=str))
