"""``ReferenceModel``: the per-token NLL of a frozen reference model (Rho-1, TokenCleaning) for each training batch."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from sstoken_pl import packing, sharding
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll, training_precision
from sstoken_pl.models import dtype_name, find_exported_model, load_causal_lm, response_logits
from sstoken_pl.callbacks.provider import TokenInputProvider
from sstoken_pl.token_cache import SampleCache


def missing_local_path(path: str) -> Optional[str]:
    """Why ``path`` is a local path that does not exist, or None (it exists, or it may be a hub name ``org/name``).

    Local: absolute, ``./``/``../``/``~``, more than one ``/``, or a first component that is a local folder or this
    project's run root ``runs`` (a fresh clone has no ``runs/`` yet). Checked at once, so that a reference not yet
    trained is not looked up on the hub (network retries) before the error."""
    import os

    if path.startswith("pkg:") or os.path.exists(os.path.expanduser(path)):
        return None
    first = path.split("/", 1)[0]
    local = (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or path.endswith("/")
             or (("/" in path or os.sep in path) and (first == "runs" or os.path.isdir(first))))
    return f"{os.path.abspath(os.path.expanduser(path))} does not exist" if local else None


class ReferenceModel(TokenInputProvider):
    """Provides ``reference_nll``: a frozen reference model's per-token NLL of each training batch (no grad, eval).

    Rho-1 and TokenCleaning score tokens against a reference model: the base model fine-tuned on a small clean,
    trusted subset. Train one with this project (README, *Reference model*) and point ``path`` at the run.

    Args:
        path: what ``SFTModule`` loads a model from — a hub name, a local model directory, ``pkg:NAME`` — or a run
            directory of this project (its newest exported ``lightning_logs/version_N/hf_model`` is used).
        gguf_file: a GGUF file inside ``path`` (as ``model.gguf_file``).
        dtype: parameter dtype of the reference; default: the trained model's.
        model_attr: the attribute of the LightningModule that holds the trained Hugging Face model (for its
            device, dtype and vocabulary).
        check_tokenizer: refuse a reference whose tokenizer differs from the trained model's (when the reference
            ships one); the vocabulary sizes are always checked.
        cache: keep each training sample's reference NLL (CPU, 4 bytes per response token) for the rest of the
            fit, so that later epochs (and the first, after TokenCleaning's scoring pass) skip the reference
            forward (``sstoken_pl.token_cache``; needs ``batch["index"]``, which ``SFTDataModule`` provides).
        scores: a score store of the reference (``python -m sstoken_pl score --source <path>``) to read each batch's
            NLL from, by ``batch["index"]``: no model is loaded and no forward runs. ``path`` may then be left out;
            given, it must be the store's source. Refused when the store was made for other data, tokenizer,
            template, length or precision.

    The model is loaded at fit start onto the trained model's device and freed at teardown. Its weights are not
    saved in checkpoints (they are frozen and reloaded from ``path``); the path is, and a resume with another path
    warns.
    """

    provides = ("reference_nll",)

    def __init__(
        self,
        path: Optional[str] = None,
        gguf_file: Optional[str] = None,
        dtype: Optional[str] = None,
        model_attr: str = "model",
        check_tokenizer: bool = True,
        cache: bool = True,
        scores: Optional[str] = None,
    ) -> None:
        super().__init__(model_attr)
        self.scores = scores
        self._store = None
        if path is None and scores is not None:
            path = ""
        elif not isinstance(path, str) or not path:
            raise ConfigError(f"ReferenceModel.path must be a model path or name (or give scores), got {path!r}")
        missing = missing_local_path(path) if path else None
        if missing:
            raise ConfigError(
                f"ReferenceModel.path={path!r}: no such folder ({missing}). Train the reference first (README, "
                f"*Reference model*): python -m sstoken_pl fit --config <your config> --trainer.callbacks=[] "
                f"--data.max_samples=256 --trainer.default_root_dir {path}; or give a model directory or a hub name"
            )
        self.path = path
        self.gguf_file = gguf_file
        self.dtype = dtype
        self.check_tokenizer = check_tokenizer
        self.model: torch.nn.Module | None = None
        self.cache = bool(cache)
        self._samples: SampleCache | None = None  # per training sample, refilled at each fit start

    # ------------------------------------------------------------------ life cycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scores is not None:
            self._store = self._open_store(trainer, pl_module)
            return
        trained = getattr(pl_module, self.model_attr, None)
        if not isinstance(trained, torch.nn.Module):
            raise ConfigError(
                f"ReferenceModel: {type(pl_module).__name__}.{self.model_attr} is not a torch module; set model_attr"
            )
        param = next(trained.parameters())
        source = find_exported_model(self.path)
        where = f"ReferenceModel(path={self.path!r})"
        try:
            model = load_causal_lm(source, gguf_file=self.gguf_file, dtype=self.dtype or dtype_name(param.dtype))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        ours = sharding.num_rows(trained.get_output_embeddings().weight, trained)
        theirs = model.get_output_embeddings().weight.shape[0]
        if ours != theirs:
            raise ConfigError(
                f"{where}: its vocabulary has {theirs} tokens, the trained model's {ours}; a reference must share the "
                f"trained model's tokenizer"
            )
        if self.check_tokenizer:
            self._check_tokenizer(trainer, pl_module, source, where)
        model.requires_grad_(False)
        if sharding.is_sharded(trained):  # FSDP2: the frozen reference is sharded as the trained model is
            self.model = sharding.shard_model(model, sharding.mesh_of(trained), reshard_root=True).eval()
        else:
            self.model = model.to(param.device).eval()
        if getattr(trainer.datamodule, "packing", False):
            packing.check_model(self.model, where)
        rank_zero_info(f"ReferenceModel: loaded {source}")

    def _open_store(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        from sstoken_pl.score_store import ScoreStore, check_store, run_fingerprint

        stored = ScoreStore(self.scores).fingerprint
        if "reference" not in (stored.get("model") or {}):
            raise ConfigError(f"ReferenceModel.scores: {self.scores} holds a base model's scores, not a reference's")
        fingerprint = run_fingerprint(pl_module, trainer.datamodule, trainer.precision,
                                      find_exported_model(self.path) if self.path else stored["model"]["reference"])
        if not self.path:  # the store names its reference: everything else is checked against this run
            fingerprint["model"] = stored["model"]
        return check_store(self.scores, fingerprint, "ReferenceModel.scores")

    def _check_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: str, where: str) -> None:
        ours = getattr(pl_module, "tokenizer", None) or getattr(trainer.datamodule, "tokenizer", None)
        if ours is None:
            return
        from sstoken_pl.tokenizer import load_tokenizer

        try:
            theirs = load_tokenizer(source, gguf_file=self.gguf_file)
        except (ConfigError, ValueError, OSError):
            return  # the reference ships no tokenizer: the vocabulary size check is all we can do
        a, b = ours.get_vocab(), theirs.get_vocab()
        if a != b:
            differ = sorted(set(a.items()) ^ set(b.items()), key=str)
            raise ConfigError(
                f"{where}: its tokenizer differs from the trained model's ({len(differ)} token entries differ, e.g. "
                f"{differ[:2]}); a reference must share the trained model's tokenizer (train it with this project "
                f"from the same base model)"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.model = None
        self._samples = None

    # ------------------------------------------------------------------ the provided quantity
    def reference_nll(self, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``FloatTensor[B, T]``: the reference model's per-token NLL of this batch (aligned with ``labels``),
        computed once per batch and cached until the batch ends."""
        return self.token_input("reference_nll", pl_module, batch)

    @torch.no_grad()
    def compute(self, name: str, pl_module: pl.LightningModule, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self._store is not None:
            from sstoken_pl.callbacks.history import _index
            from sstoken_pl.loss import response_mask

            return self._store.lookup(_index(batch, "ReferenceModel.scores"), response_mask(batch["labels"]))
        if self.model is None:
            raise RuntimeError("ReferenceModel: no model loaded (it is loaded at fit start)")
        if self.cache and self._samples is None:
            self._samples = SampleCache()
        def compute() -> torch.Tensor:  # in the training step's precision (autocast), as the current model's NLL
            with training_precision(pl_module):
                return per_token_nll(response_logits(self.model, batch), batch["labels"])

        if self._samples is not None:  # FSDP2: the forward is skipped only if every rank hits
            return self._samples.fetch(batch, compute, lambda hit: sharding.everywhere(hit, sharding.is_sharded(self.model)))
        return compute()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"path": self.path, "gguf_file": self.gguf_file}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("path") != self.path:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"ReferenceModel: the checkpoint was trained against reference {state_dict.get('path')!r}, this run "
                f"uses {self.path!r}"
            )
