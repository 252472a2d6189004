"""``SFTDataModule``: SFT data from local files, a hub dataset or the built-in synthetic task, as padded batches (the
record formats, sources and batches are described in ``sstoken_pl.data``)."""

from __future__ import annotations

import random
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from sstoken_pl.data.collate import SFTCollator, noise_flags
from sstoken_pl.data.formats import FORMAT_FIELDS, Format, detect_format, normalise, sample_weight
from sstoken_pl.data.sampler import ResumableDataLoader, ResumableSampler
from sstoken_pl.data.sources import Record, load_splits
from sstoken_pl.errors import ConfigError, DataError
from sstoken_pl.loss import IGNORE_INDEX
from sstoken_pl.synthetic import SyntheticTask
from sstoken_pl.templates import encode_weighted_messages, to_messages


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
        packing: run the model on packed rows (``sstoken_pl.packing``): each training and validation batch's samples
            laid end to end in rows of at most ``max_length`` tokens (best-fit decreasing), positions restarting at
            each sample, no attention across samples (checked on the model at fit start). The same samples per
            batch as without packing, and every method sees the same per-sample tensors: only the padding's compute
            goes.
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
        packing: bool = False,
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
        if not isinstance(packing, bool):
            raise ConfigError(f"data.packing must be true or false, got {packing!r}")
        self.packing = packing
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
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def collator(self) -> SFTCollator:
        """The batches' collator: padded, and packed into rows of ``max_length`` tokens with ``packing``."""
        return SFTCollator(self.pad_token_id, pack_length=self.max_length if self.packing else None)

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
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    # ------------------------------------------------------------------ evaluation
    def eval_problems(self, limit: Optional[int] = None, split: str = "validation") -> list[dict[str, Any]]:
        """Held-out problems of ``split`` (``validation`` or ``test``) for generation-based accuracy, in file order:
        ``{"prompt_ids", "prompt", "answer", "index"}`` (``sstoken_pl.evaluation.eval_problems``)."""
        from sstoken_pl.evaluation import eval_problems

        return eval_problems(self, limit, split)
