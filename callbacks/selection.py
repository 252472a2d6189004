"""``TokenSelection``: turns named per-token inputs into the mask (or weights) ``sstoken_pl.token_loss`` applies."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from sstoken_pl import selection, sharding
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import StepTokenMean, check_loss_normalization, register_selector
from sstoken_pl.methods import CURRENT_INPUTS, PROVIDERS, RULES, get_method, resolve_options
from sstoken_pl.callbacks.provider import find_providers, prepare_providers
from sstoken_pl.callbacks.selection_samples import render_selection, write_samples  # noqa: F401 (public name)
from sstoken_pl.callbacks.threshold import global_threshold
from sstoken_pl.objectives import get_objective, resolve_objective_options

Rule = Literal["sample_top", "batch_top", "global_threshold", "weights", "all"]


class TokenSelection(Callback):
    """Keeps the response tokens a method scores highest, before backward (the loss is ``sstoken_pl.token_loss``).

    A method is *inputs → score → rule* (``sstoken_pl.methods``): its inputs come from the current forward
    (``nll``, ``entropy``) and from provider callbacks on the same trainer (``HistoryModel`` → ``history_nll``,
    ``ReferenceModel`` → ``reference_nll``, ``AttentionScore`` → ``attention``); a missing provider is one clear
    error at fit start.

    Args:
        method: ``sstoken`` (default), ``random``, ``rho1``, ``tokencleaning``, ``qtuning``, or a dotted path
            ``package.module:NAME`` to a ``sstoken_pl.methods.Method``.
        ratio: ρ, the share of (finite-scored) response tokens kept, in (0, 1]. For ``qtuning``, the share of
            tokens kept in the samples whose tokens are pruned.
        rule: how scores become the mask: ``sample_top`` (per-sample top ⌈ρR⌉), ``batch_top`` (top ⌈ρN⌉ of the
            batch), ``global_threshold`` (one threshold for the whole training set, from a scoring pass before the
            first step), ``weights`` (per-sample min-max of the score as loss weights), ``all`` (every response
            token); default: the method's.
        objective: what each counted token contributes to the loss (``sstoken_pl.objectives``): ``nll`` (plain
            SFT), ``dft``, ``prob``, ``eaft``, ``otr``, ``asft``, or a dotted path ``package.module:NAME``; default:
            the method's (``nll`` for the selection methods, its own for the weighting methods). Composes with any
            method: ``method: sstoken, objective: dft`` trains ssToken's kept tokens with DFT's loss.
        objective_options: the objective's options (``dft``: none; ``prob``: ``power`` 1, ``min_p`` 0, ``max_p`` 1;
            ``eaft``: ``k`` 20, ``normalizer`` 3.0, ``alpha`` 1; ``otr``: see ``sstoken_pl.objectives``; ``asft``:
            ``alpha`` 0.1).
        gamma: ssToken's γ, the weight of REL against attention, in [0, 1] (default 0.5); only for ``sstoken``.
        early_gamma: γ during the first ``early_fraction`` of the optimizer steps (the authors' released code
            selects by attention only, γ = 0, for the first 20% of training: ``early_gamma: 0, early_fraction: 0.2``).
        early_fraction: share of the run's optimizer steps (``trainer.estimated_stepping_batches``) that use
            ``early_gamma``.
        warmup_steps: optimizer steps of plain SFT (every response token) before selection starts.
        keep_end_of_turn: always train on the last token of each response span (the end-of-turn/EOS token), on top
            of the ρ share of the others.
        options: the method's own options (``qtuning``: ``sample_ratio`` 0.5, ``smoothing`` λ 0.5).
        threshold_batches: ``global_threshold`` only: batches of the (unshuffled) training set scored to find the
            threshold; default: all of it.
        seed: seeds the random tie-breaking and the ``random`` method (a draw per step, reproducible on resume).
        loss_normalization: ``step`` (default): the loss is the mean NLL over the kept tokens of the whole optimizer
            step — every micro-batch of gradient accumulation and every rank weigh each kept token alike, whatever
            each micro-batch kept (``sstoken_pl.loss.StepTokenMean``); ``micro_batch``: the mean over each
            micro-batch's kept tokens, as the authors' code trains (a token of a micro-batch that kept few tokens
            weighs more).
        log_samples_every: every this many optimizer steps, log a few decoded samples with dropped tokens marked
            ``[-like this-]`` (TensorBoard text, or ``selection_samples.txt``) and, token by token, to
            ``selection_samples.jsonl`` in the run directory; 0 turns it off.
        num_log_samples: how many samples of the batch to log each time.

    Logged every step: ``selection/kept_fraction``; ``selection/rel_mean`` and ``selection/attn_mean`` when those
    inputs are used; and, when the batch carries the ground truth of injected noise (``batch["noise"]``, the
    built-in task), ``selection/noise_dropped`` (share of noise tokens dropped) and ``selection/clean_kept`` (share
    of clean tokens kept).
    """

    def __init__(
        self,
        method: str = "sstoken",
        ratio: float = 0.6,
        rule: Optional[Rule] = None,
        gamma: Optional[float] = None,
        early_gamma: Optional[float] = None,
        early_fraction: float = 0.0,
        warmup_steps: int = 0,
        keep_end_of_turn: bool = False,
        options: Optional[dict[str, Any]] = None,
        objective: Optional[str] = None,
        objective_options: Optional[dict[str, Any]] = None,
        threshold_batches: Optional[int] = None,
        seed: int = 0,
        loss_normalization: Literal["step", "micro_batch"] = "step",
        log_samples_every: int = 0,
        num_log_samples: int = 2,
    ) -> None:
        self.method_name = method
        self.loss_normalization = check_loss_normalization(loss_normalization, "TokenSelection.loss_normalization")
        self.token_step = StepTokenMean()
        self.method = get_method(method)
        self.ratio = selection.check_ratio(ratio, "TokenSelection.ratio")
        self.rule = rule or self.method.rule
        self.objective_name = objective or self.method.objective
        self.objective = get_objective(self.objective_name)
        self.objective_options = resolve_objective_options(self.objective, objective_options)
        if self.rule not in RULES:
            raise ConfigError(f"TokenSelection.rule must be one of {', '.join(RULES)}, got {rule!r}")
        options = dict(options or {})
        for name, value in (("gamma", gamma), ("early_gamma", early_gamma)):
            if value is not None and "gamma" not in self.method.options:
                raise ConfigError(f"TokenSelection.{name} applies to method sstoken only, not {method!r}")
        if gamma is not None:
            options["gamma"] = gamma
        self.options = resolve_options(self.method, options)
        self.early_options = None
        if early_gamma is not None:
            self.early_options = resolve_options(self.method, {**options, "gamma": early_gamma})
        if not (0.0 <= early_fraction < 1.0):
            raise ConfigError(f"TokenSelection.early_fraction must be in [0, 1), got {early_fraction!r}")
        if early_fraction > 0 and early_gamma is None:
            raise ConfigError("TokenSelection.early_fraction needs early_gamma (the γ of the early phase)")
        for name, value, low in (
            ("warmup_steps", warmup_steps, 0),
            ("log_samples_every", log_samples_every, 0),
            ("num_log_samples", num_log_samples, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ConfigError(f"TokenSelection.{name} must be an integer ≥ {low}, got {value!r}")
        if threshold_batches is not None and (int(threshold_batches) != threshold_batches or threshold_batches < 1):
            raise ConfigError(f"TokenSelection.threshold_batches must be a positive integer, got {threshold_batches!r}")
        self.gamma = self.options.get("gamma")
        self.early_gamma = early_gamma
        self.early_fraction = float(early_fraction)
        self.warmup_steps = int(warmup_steps)
        self.keep_end_of_turn = bool(keep_end_of_turn)
        self.threshold_batches = threshold_batches
        self.seed = int(seed)
        self.log_samples_every = int(log_samples_every)
        self.num_log_samples = int(num_log_samples)
        self.threshold: float | None = None  # global_threshold: found by the scoring pass, saved in checkpoints
        self._providers: dict[str, Any] = {}
        self._early_steps = 0
        self._called = False
        self._last: tuple[Any, ...] | None = None
        self._log_dir: str | None = None
        self._logged_step = -1  # under gradient accumulation, log each optimizer step's samples once
        self._empty: torch.Tensor | None = None  # batches that trained on no token (on the device: no host sync)
        self._empty_loaded = 0  # ... counted before a resume

    # ------------------------------------------------------------------ the token-selector protocol
    @property
    def current_inputs(self) -> frozenset[str]:
        """Inputs ``token_loss`` computes from the current forward for this method (``entropy`` only if needed)."""
        needs = self.method.needs(self.options) | self.method.needs(self.early_options or self.options)
        logits = {"logits"} if self.objective.needs_logits else set()
        return frozenset(n for n in CURRENT_INPUTS if n in needs) | {"nll"} | logits

    def _options_at(self, step: int) -> Mapping[str, Any]:
        return self.early_options if self.early_options is not None and step < self._early_steps else self.options

    def _needs_at(self, step: int) -> frozenset[str]:
        return frozenset() if step < self.warmup_steps else self.method.needs(self._options_at(step))

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_dir = trainer.log_dir  # on every rank: under DDP, log_dir is a collective call
        sharding.check_step_mean_supported(trainer, self.loss_normalization, "TokenSelection.loss_normalization")
        providers = find_providers(trainer.callbacks)
        needed = self.method.needs(self.options) | self.method.needs(self.early_options or self.options)
        needed = needed | self.objective.provider_inputs
        what = f"TokenSelection(method={self.method_name!r}" + (f", gamma={self.gamma})" if self.gamma is not None else ")")
        if self.objective.name != self.method.objective:
            what = what[:-1] + f", objective={self.objective.name!r})"
        fused = getattr(pl_module, "fused_cross_entropy", None)
        if self.objective.needs_logits and fused is not None:
            raise ConfigError(
                f"{what}: objective {self.objective.name!r} needs the response rows of logits, which "
                f"model.fused_cross_entropy={fused} never holds; set model.fused_cross_entropy: null"
            )
        missing = sorted(n for n in needed if n not in CURRENT_INPUTS and n not in providers)
        if missing:
            adds = ", ".join(f"{PROVIDERS.get(n, '?')} (for {n})" for n in missing)
            raise ConfigError(f"{what} needs {adds}: add it to trainer.callbacks")
        if self.rule == "global_threshold" and "attention" in needed:
            raise ConfigError(f"{what}: rule global_threshold cannot use the attention input (no scoring pass for it)")
        for name, cb in providers.items():
            if name not in needed and not set(getattr(cb, "provides", ())) & needed:
                rank_zero_warn(f"{what} does not use {type(cb).__name__} ({name}); remove it to save its cost")
        self._providers = {n: cb for n, cb in providers.items() if n in needed}
        for cb in set(self._providers.values()):  # the probes it uses are armed by it, in the fixed order below
            if getattr(cb, "from_training_forward", False) and hasattr(cb, "arm"):
                cb.driven = True
        register_selector(trainer, self)
        module_step = getattr(pl_module, "token_step", None)
        if isinstance(module_step, StepTokenMean):  # one step-wide token mean per fit: the module's, shared
            self.token_step = module_step
        self._early_steps = 0
        if self.early_options is not None and self.early_fraction > 0:
            total = trainer.estimated_stepping_batches
            self._early_steps = int(self.early_fraction * total) if total != float("inf") else 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_attention_active(trainer.global_step)  # after a resume has restored global_step

    def _set_attention_active(self, step: int) -> None:
        """The attention probe captures only for batches whose selection uses attention."""
        attention = self._providers.get("attention")
        if attention is not None:
            attention.active = "attention" in self._needs_at(step)

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._called = False
        if self.rule == "global_threshold" and self.threshold is None and trainer.global_step >= self.warmup_steps:
            self.threshold = global_threshold(self, trainer, pl_module)
        # The providers this step uses, in the fixed order of prepare_providers: other models' forwards, then probes.
        names = sorted(self._needs_at(trainer.global_step) | self.objective.provider_inputs)
        used = [(n, self._providers[n]) for n in names if n not in CURRENT_INPUTS and n in self._providers]
        prepare_providers(pl_module, batch, used, self._providers.values())

    def select(
        self,
        pl_module: pl.LightningModule,
        batch: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The kept-token mask (or, for the ``weights`` rule, the weights) of this training batch; called by
        ``sstoken_pl.token_loss`` with the current forward's inputs (``nll``, and ``entropy`` if needed)."""
        self._called = True
        trainer = pl_module.trainer
        step = trainer.global_step
        if step < self.warmup_steps:
            self._log(pl_module, {"train/empty_batches": self._count_empty(response_mask, response_mask)})
            self._log(pl_module, {"selection/kept_fraction": torch.ones((), device=response_mask.device)})
            return response_mask
        options = self._options_at(step)
        values = self._gather(pl_module, batch, inputs, self.method.needs(options))
        generator = self._generator(trainer)
        scores = self.method.score(values, response_mask, {**options, "ratio": self.ratio}, generator)
        if self.keep_end_of_turn:
            scores = torch.where(selection.end_of_turn_mask(response_mask), torch.inf, scores)
        kept = self._apply_rule(scores, response_mask, generator)
        self._log(pl_module, {"train/empty_batches": self._count_empty(kept, response_mask)})
        self._log(pl_module, selection.selection_stats(values, response_mask, kept, batch.get("noise")))
        if self.log_samples_every:
            self._last = (batch["input_ids"].detach(), response_mask.detach(), kept.detach() > 0, batch.get("index"), batch.get("noise"))
        return kept

    def objective_loss(
        self,
        pl_module: pl.LightningModule,
        batch: Mapping[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        counted: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Each token's loss ``ℓ`` under the objective (``sstoken_pl.objectives``), from the current forward's
        ``nll`` (with its graph) and, when the objective needs them, the response rows of ``logits``; called by
        ``token_loss`` after ``select``. Returns ``ℓ``, or ``(ℓ, keep)`` when the objective narrows the counted
        tokens. Logs the objective's statistics under ``objective/``."""
        if self.objective.name == "nll":
            return inputs["nll"]
        values = dict(inputs)
        labels = batch["labels"]
        values["targets"] = labels[response_mask]
        for name in self.objective.provider_inputs:
            values[name] = self._providers[name].token_input(name, pl_module, batch)
        trainer = pl_module.trainer
        if self.objective.draws:
            values["draw_keys"] = self._draw_keys(trainer, batch, response_mask)
        generator = torch.Generator(device=response_mask.device).manual_seed(self._seed_key(trainer, salt=1))
        out = self.objective.loss(values, response_mask, self.objective_options, generator)
        loss, stats, keep = out if len(out) == 3 else (*out, None)
        self._log(pl_module, {f"objective/{k}": v for k, v in stats.items()})
        return loss if keep is None else (loss, keep)

    def _gather(self, pl_module, batch, inputs: Mapping[str, torch.Tensor], names: frozenset[str]) -> dict[str, torch.Tensor]:
        values = {}
        for name in sorted(names):
            if name in CURRENT_INPUTS:
                if name not in inputs:
                    raise RuntimeError(f"TokenSelection: token_loss did not compute {name!r}")
                values[name] = inputs[name].detach()
            else:
                values[name] = self._providers[name].token_input(name, pl_module, batch)
        return values

    def _draw_keys(self, trainer: pl.Trainer, batch: Mapping[str, torch.Tensor], response_mask: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, T]``: one key per token from (seed, optimizer step, sample index, position), for objectives
        that draw (OTR): the same draws whatever the batching, accumulation or rank. Without ``batch["index"]``
        (a module of your own) the row in the batch stands in for it."""
        B, T = response_mask.shape
        index = batch.get("index")
        index = torch.arange(B, device=response_mask.device) if index is None else index.to(response_mask.device)
        base = ((self.seed * 1_000_003 + trainer.global_step) * 2_147_483_647) % 2**40
        return (base + index.long()[:, None]) * 65_537 + torch.arange(T, device=response_mask.device)[None, :]

    def _seed_key(self, trainer: pl.Trainer, salt: int = 0) -> int:
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        key = self.seed * 1_000_003 + batches * 7_919 + trainer.global_rank * 15_485_863 + salt * 104_729
        return key % (2**63 - 1)

    def _generator(self, trainer: pl.Trainer) -> torch.Generator:
        """A generator seeded by (seed, training batch count, rank): reproducible, also after a resume."""
        return torch.Generator().manual_seed(self._seed_key(trainer))

    def _apply_rule(self, scores: torch.Tensor, response_mask: torch.Tensor, generator) -> torch.Tensor:
        if self.rule == "sample_top":
            return selection.top_ratio_mask(scores, response_mask, self.ratio, generator)
        if self.rule == "batch_top":
            return selection.batch_top_ratio_mask(scores, response_mask, self.ratio, generator)
        if self.rule == "weights":
            return selection.weights_from_scores(scores, response_mask)
        if self.rule == "all":
            return response_mask.clone()
        if self.threshold is None:
            raise RuntimeError("TokenSelection: the global threshold was not computed before the first selection")
        return selection.threshold_mask(scores, response_mask, self.threshold) | (
            response_mask & (scores == torch.inf)
        )

    def _count_empty(self, kept: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """The running count of batches that train on no token — every response token truncated away, or none kept
        (their loss is 0, never NaN) — including this one; logged as ``train/empty_batches``."""
        empty = ((kept.float() * response_mask).sum() == 0).to(torch.int64)
        self._empty = empty + (self._empty_loaded if self._empty is None else self._empty.to(empty.device))
        return self._empty

    @property
    def empty_batches(self) -> int:
        """Training batches so far (resumed runs included) that trained on no token."""
        return self._empty_loaded if self._empty is None else int(self._empty)

    @staticmethod
    def _log(pl_module: pl.LightningModule, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            pl_module.log(name, value.float(), on_step=True, on_epoch=False, prog_bar=name.endswith("kept_fraction"))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.token_step.finish(trainer, optimizer)  # the step's token-weighted mean (loss_normalization: step)

    # ------------------------------------------------------------------ checks and decoded samples
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._called:
            raise ConfigError(
                f"TokenSelection is on the trainer but {type(pl_module).__name__}.training_step did not compute its "
                f"loss with sstoken_pl.token_loss, so no token was selected (this would silently train plain SFT)"
            )
        step = trainer.global_step  # after this batch's optimizer step (if any): the next batch's step
        self._set_attention_active(step)
        last, self._last = self._last, None
        if last is None or step % self.log_samples_every or step == self._logged_step or not trainer.is_global_zero:
            return
        self._logged_step = step
        tokenizer = getattr(pl_module, "tokenizer", None) or getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        write_samples(trainer, tokenizer, last, self.num_log_samples, self._log_dir)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method_name,
            "objective": self.objective_name,
            "objective_options": dict(self.objective_options),
            "ratio": self.ratio,
            "rule": self.rule,
            "gamma": self.gamma,
            "early_gamma": self.early_gamma,
            "early_fraction": self.early_fraction,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,  # with Lightning's restored batch count, it gives each step's generator (_generator)
            "threshold": self.threshold,
            "empty_batches": self.empty_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method", "sstoken") != self.method_name:
            raise ConfigError(
                f"TokenSelection: the checkpoint was trained with method {state_dict.get('method')!r}, this run asks "
                f"for {self.method_name!r}"
            )
        if state_dict.get("rule", self.rule) == self.rule and state_dict.get("ratio") == self.ratio:
            self.threshold = state_dict.get("threshold")  # the global threshold is not recomputed on resume
        self._empty, self._empty_loaded = None, int(state_dict.get("empty_batches", 0))
        if state_dict.get("objective", self.objective_name) != self.objective_name:
            raise ConfigError(
                f"TokenSelection: the checkpoint was trained with objective {state_dict.get('objective')!r}, this run "
                f"asks for {self.objective_name!r}"
            )
        settings = {k: v for k, v in state_dict.items() if k not in ("threshold", "method", "empty_batches", "objective")}
        changed = {k: (v, getattr(self, k)) for k, v in settings.items() if getattr(self, k, v) != v}
        if changed:
            rank_zero_warn(f"TokenSelection: resuming with other settings than the checkpoint's (was, now): {changed}")
