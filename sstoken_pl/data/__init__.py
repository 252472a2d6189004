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

Submodules: ``sources`` reads the records (``load_splits``, ``read_file``); ``formats`` detects and normalises their
format (``detect_format``, ``normalise``, ``extract_final_answer``) and checks the weights in them (``check_weight``,
``sample_weight``); ``collate`` pads samples into batches (``SFTCollator``; with ``data.packing`` also into the packed rows
the forward runs on: ``sstoken_pl.packing``) and places the synthetic task's noise on
tokens (``noise_flags``); ``sampler`` holds the resumable training sampler and loader (``ResumableSampler``,
``ResumableDataLoader``: usable in any Lightning project); ``module`` holds ``SFTDataModule``. Every public name is
importable from ``sstoken_pl.data`` itself. The held-out problems for answer accuracy (``SFTDataModule.eval_problems``)
are built by ``sstoken_pl.evaluation.eval_problems``.
"""

from sstoken_pl.data.collate import SFTCollator, noise_flags
from sstoken_pl.data.formats import (
    FORMAT_FIELDS,
    Format,
    check_weight,
    detect_format,
    extract_final_answer,
    normalise,
    sample_weight,
)
from sstoken_pl.data.module import SFTDataModule
from sstoken_pl.data.sampler import ResumableDataLoader, ResumableSampler
from sstoken_pl.data.sources import DATA_EXTENSIONS, Record, load_splits, read_file

__all__ = [
    "DATA_EXTENSIONS",
    "FORMAT_FIELDS",
    "Format",
    "Record",
    "ResumableDataLoader",
    "ResumableSampler",
    "SFTCollator",
    "SFTDataModule",
    "check_weight",
    "detect_format",
    "extract_final_answer",
    "load_splits",
    "noise_flags",
    "normalise",
    "read_file",
    "sample_weight",
]
