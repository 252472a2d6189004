"""Token-selection methods by name: which inputs each needs, its score function and its default rule.

A method is *inputs → score → rule* (see ``sstoken_pl.selection``):

- **inputs** are per-token tensors aligned with ``labels``, each under a name. From the current training forward
  (computed by ``sstoken_pl.token_loss``): ``nll`` and ``entropy`` (the latter only when a method asks for it).
  From provider callbacks: ``history_nll`` (``HistoryModel``), ``reference_nll`` (``ReferenceModel``),
  ``attention`` (``AttentionScore``).
- a **score** is a pure function ``score(inputs, response_mask, options, generator) -> FloatTensor[B, T]``;
  ``options`` carries the method's options and ``ratio`` (ρ, ``TokenSelection.ratio``).
- a **rule** turns scores into the kept mask or weights: ``sample_top`` (per-sample top ⌈ρR⌉), ``batch_top``
  (top ⌈ρN⌉ over the batch's response tokens), ``global_threshold`` (a dataset-wide threshold from a scoring pass
  before training), ``weights`` (per-sample min-max of the score as loss weights), ``all`` (every response token:
  the weighting methods, whose objective does the work).

A method may also name an **objective** (``sstoken_pl.objectives``): what each counted token contributes to the loss
(the NLL by default; ``dft``, ``eaft``, ``prob``, ``otr``, ``asft``). The weighting methods are rule ``all`` with
their objective; ``TokenSelection(objective=...)`` composes any objective with any selection method.

A new method is one ``Method`` and a config: ``register_method(Method(...))`` from your code, or
``TokenSelection(method="my_package.my_module:MY_METHOD")`` with a dotted path to a ``Method`` object.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from sstoken_pl import qtuning, selection
from sstoken_pl.errors import ConfigError

# Inputs computed from the current forward by ``token_loss``; every other input comes from a provider callback.
CURRENT_INPUTS = ("nll", "entropy")
# Which callback provides each input, for error messages.
PROVIDERS = {
    "history_nll": "sstoken_pl.callbacks.HistoryModel",
    "history_logits": "sstoken_pl.callbacks.HistoryModel",
    "reference_nll": "sstoken_pl.callbacks.ReferenceModel",
    "attention": "sstoken_pl.callbacks.AttentionScore",
    "sequence_entropy": "sstoken_pl.callbacks.SequenceEntropy",
    "attended": "sstoken_pl.callbacks.SequenceEntropy",
}
RULES = ("sample_top", "batch_top", "global_threshold", "weights", "all")

Inputs = Mapping[str, torch.Tensor]
ScoreFn = Callable[[Inputs, torch.Tensor, Mapping[str, Any], "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A token-selection method.

    Args:
        name: the name configs use (``TokenSelection(method=name)``).
        inputs: the names of the per-token inputs the score needs, as a function of the options (ssToken needs
            no history at γ = 0 and no attention at γ = 1).
        score: ``score(inputs, response_mask, options, generator) -> FloatTensor[B, T]``; ``±inf`` as in
            ``sstoken_pl.selection``. ``generator`` is a seeded ``torch.Generator`` for methods that draw.
        rule: the default rule (one of ``RULES``).
        options: the method's own options and their defaults (``TokenSelection(options={...})``).
        summary: one line for ``--help`` and docs.
        objective: the default objective (``sstoken_pl.objectives``): ``nll`` for the selection methods.
    """

    name: str
    inputs: Callable[[Mapping[str, Any]], frozenset[str]]
    score: ScoreFn
    rule: str = "sample_top"
    options: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    objective: str = "nll"

    def needs(self, options: Mapping[str, Any]) -> frozenset[str]:
        return frozenset(self.inputs(options))


def _sstoken_inputs(options: Mapping[str, Any]) -> frozenset[str]:
    gamma = options["gamma"]
    return frozenset((["nll", "history_nll"] if gamma > 0 else []) + (["attention"] if gamma < 1 else []))


def _sstoken(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator) -> torch.Tensor:
    return selection.sstoken_scores(
        inputs.get("nll"), inputs.get("history_nll"), inputs.get("attention"), resp, options["gamma"]
    )


def _random(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator) -> torch.Tensor:
    return selection.random_scores(resp, generator)


def _rho1(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator) -> torch.Tensor:
    return selection.excess_loss_scores(inputs["nll"], inputs["reference_nll"], resp)


def _tokencleaning(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator) -> torch.Tensor:
    return selection.influence_scores(inputs["history_nll"], inputs["reference_nll"], resp)


def _qtuning(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator) -> torch.Tensor:
    return qtuning.qtuning_scores(
        inputs["nll"], inputs["sequence_entropy"], inputs["attended"], resp,
        options["sample_ratio"], options["ratio"], options["smoothing"], generator,
    )


def _qtuning_paper(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator) -> torch.Tensor:
    return selection.qtuning_scores(
        inputs["nll"], inputs["entropy"], resp, options["sample_ratio"], options["smoothing"]
    )


def _all(inputs: Inputs, resp: torch.Tensor, options: Mapping[str, Any], generator) -> torch.Tensor:
    return torch.where(resp, 1.0, 0.0)


def _fixed(*names: str) -> Callable[[Mapping[str, Any]], frozenset[str]]:
    return lambda options: frozenset(names)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` available by name to ``TokenSelection(method=...)``; returns it."""
    if method.rule not in RULES:
        raise ConfigError(f"Method {method.name!r}: rule must be one of {RULES}, got {method.rule!r}")
    METHODS[method.name] = method
    return method


for _m in (
    Method(
        "sstoken", _sstoken_inputs, _sstoken, "sample_top", {"gamma": 0.5},
        "ssToken: γ·minmax(L_history − L_current) + (1 − γ)·attention on the prompt; per-sample top ⌈ρR⌉",
    ),
    Method("random", _fixed(), _random, "sample_top", {}, "a seeded random ⌈ρR⌉ of each response"),
    Method(
        "rho1", _fixed("nll", "reference_nll"), _rho1, "batch_top", {},
        "Rho-1: excess loss L_current − L_reference; top ρ of the batch's response tokens",
    ),
    Method(
        "tokencleaning", _fixed("history_nll", "reference_nll"), _tokencleaning, "global_threshold", {},
        "TokenCleaning (fixed model): L_base − L_reference; one dataset-wide threshold keeping the top ρ",
    ),
    Method(
        "qtuning", _fixed("nll", "sequence_entropy", "attended"), _qtuning, "sample_top",
        {"sample_ratio": 0.25, "smoothing": 0.5},
        "Q-Tuning as the authors' code runs it: keep Q2 ∪ Q4 samples of the perplexity × entropy plane, drop the "
        "highest smoothed-PPL tokens of Q2 samples to a per-batch budget of ρ·sample_ratio of the attended tokens",
    ),
    Method(
        "qtuning_paper", _fixed("nll", "entropy"), _qtuning_paper, "sample_top", {"sample_ratio": 0.5, "smoothing": 0.5},
        "Q-Tuning, our reading of the paper: drop the Q1/Q3 corners, keep the highest smoothed-PPL tokens of Q2 samples",
    ),
    *(
        Method(name, _fixed(), _all, "all", {}, f"{summary}; every response token", objective=name)
        for name, summary in (
            ("dft", "DFT: sg(p)·NLL"),
            ("prob", "probability objective (1 − p^k)/k"),
            ("eaft", "EAFT: NLL weighted by the normalised top-k entropy"),
            ("otr", "One-Token Rollout: a one-step policy gradient over K sampled tokens and the ground truth"),
            ("asft", "Anchored SFT: DFT plus a KL anchor to the base model"),
        )
    ),
):
    register_method(_m)


def registered(name: str, registry: Mapping[str, Any], kind: type, key: str) -> Any:
    """The object registered under ``name``, or the ``kind`` object at a dotted path ``package.module:NAME``; else
    one ``ConfigError`` on ``key`` naming what is known (methods and objectives alike)."""
    if name in registry:
        return registry[name]
    what = kind.__name__.lower()
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{key}: cannot import {name!r} ({err})") from None
        if not isinstance(obj, kind):
            raise ConfigError(f"{key}: {name!r} is a {type(obj).__name__}, not a sstoken_pl {kind.__name__}")
        return obj
    raise ConfigError(
        f"{key}: unknown {what} {name!r}; known: {', '.join(sorted(registry))} "
        f"(or a dotted path package.module:NAME to a {kind.__module__}.{kind.__name__})"
    )


def get_method(name: str) -> Method:
    """The method registered under ``name``, or the ``Method`` object at a dotted path ``package.module:NAME``."""
    return registered(name, METHODS, Method, "TokenSelection.method")


def resolve_options(method: Method, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's defaults updated with ``options``; unknown keys are one clear error."""
    options = dict(options or {})
    unknown = sorted(set(options).difference(method.options))
    if unknown:
        known = ", ".join(sorted(method.options)) or "none"
        raise ConfigError(f"TokenSelection.options: {unknown} are not options of method {method.name!r} (known: {known})")
    merged = {**method.options, **options}
    if "gamma" in merged:
        merged["gamma"] = selection.check_gamma(merged["gamma"], "TokenSelection.gamma")
    if "sample_ratio" in merged:
        merged["sample_ratio"] = selection.check_ratio(merged["sample_ratio"], "TokenSelection.options.sample_ratio")
    if "smoothing" in merged:
        merged["smoothing"] = selection.check_gamma(merged["smoothing"], "TokenSelection.options.smoothing")
    return merged
