"""The run configs of ``tools/compare.py``: each method's config with the comparison's logging, seed and reference
filled in, and what a comparison needs to know about a method (its reference, its score stores, its clean subset)."""

from __future__ import annotations

import glob
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS_DIR = os.path.join(ROOT, "configs", "methods")


def method_file(method: str) -> str:
    """The config of a method: ``configs/methods/<method>.yaml``, or ``method`` itself when it is a ``.yaml`` path (a
    method of your own, or a variant with other arguments; its row and run folder are named after the file)."""
    if method.endswith((".yaml", ".yml")):
        if not os.path.isfile(method):
            sys.exit(f"error: --methods: no file {method}")
        return os.path.abspath(method)
    path = os.path.join(METHODS_DIR, f"{method}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(METHODS_DIR) if f.endswith(".yaml"))
        sys.exit(f"error: no method config {path}; known methods: {', '.join(known)} (or give a .yaml path)")
    return path


def method_name(method: str) -> str:
    return os.path.splitext(os.path.basename(method))[0] if method.endswith((".yaml", ".yml")) else method


def method_config(path: str, seed: int, save_dir: str, reference: str | None, log_samples_every: int,
                  scores: dict | None = None) -> dict:
    """The method config ``path`` (see ``method_file``) with a CSV logger into ``save_dir``, a step timer, the seed of
    the selection's draws, the samples log, and the reference path filled in."""
    with open(path) as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            sys.exit(f"error: {path} is not valid YAML: {e}")
    if not isinstance(config, dict):
        sys.exit(f"error: {path}: a method config is a mapping (trainer: callbacks+: [...]), got {type(config).__name__}")
    return with_logging(config, seed, save_dir, reference, log_samples_every, scores)


def stores_used(config: dict) -> set[str]:
    """Which fixed-model stores a method config can read: ``base`` (a ``HistoryModel`` of mode base, unless its
    objective needs the history's logits, as ``asft`` does) and ``reference`` (a ``ReferenceModel``)."""
    callbacks = (config.get("trainer") or {}).get("callbacks+") or []
    kinds = set()
    for cb in callbacks:
        name, args = cb["class_path"].rsplit(".", 1)[-1], cb.get("init_args") or {}
        if name == "ReferenceModel":
            kinds.add("reference")
        if name == "HistoryModel" and args.get("mode", "base") == "base" and not needs_history_logits(callbacks):
            kinds.add("base")
    return kinds


def needs_history_logits(callbacks: list) -> bool:
    sys.path.insert(0, ROOT)
    from sstoken_pl.methods import get_method
    from sstoken_pl.objectives import get_objective

    for cb in callbacks:
        if cb["class_path"].endswith("TokenSelection"):
            args = cb.get("init_args") or {}
            objective = args.get("objective") or get_method(args.get("method", "sstoken")).objective
            return "history_logits" in get_objective(objective).provider_inputs
    return False


def with_logging(config: dict, seed: int, save_dir: str, reference: str | None, log_samples_every: int,
                 scores: dict | None = None) -> dict:
    """``config`` (a method config's mapping; ``{}`` for the reference run) as ``method_config`` describes it; with
    ``scores`` (``--score-once``), its fixed models read their stores."""
    callbacks = list((config.get("trainer") or {}).get("callbacks+") or [])
    use = stores_used(config) & set(scores or {})
    for cb in callbacks:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("HistoryModel") and "base" in use:
            args["scores"] = scores["base"]
        if cb["class_path"].endswith("ReferenceModel"):
            args["path"] = reference
            if "reference" in use:
                args["scores"] = scores["reference"]
        if cb["class_path"].endswith("TokenSelection"):
            args["seed"] = seed
            args["log_samples_every"] = log_samples_every
            args["num_log_samples"] = 4
    callbacks.append({"class_path": "sstoken_pl.callbacks.timing.StepTimer", "init_args": {"warmup": 2}})
    trainer = dict(config.get("trainer") or {})
    trainer["callbacks+"] = callbacks
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": save_dir}}
    return {**config, "trainer": trainer}


def option(args: list[str], key: str) -> str | None:
    """The last value of ``--key=value`` or ``--key value`` in a list of ``fit`` arguments."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{key}="):
            found = arg.split("=", 1)[1]
        elif arg == f"--{key}" and i + 1 < len(args):
            found = args[i + 1]
    return found


def clean_subset(config: str, extra: list[str], reference_args: list[str]) -> tuple[int | None, str]:
    """How many of the first training problems the reference trains on without noise — its clean subset, which the
    ``full+clean`` row mixes into the noisy data (``data.synthetic.clean_copies``) — or None and why not: it is
    defined for the built-in task with the reference's noise off (``noise=0``, ``label_noise=0``) and a
    ``data.max_samples``."""
    try:
        with open(config) as f:
            data = (yaml.safe_load(f) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError) as e:
        return None, f"cannot read the data settings of {config} ({e})"
    args = extra + reference_args
    if option(args, "data.path") not in (None, "null", "None") or (option(args, "data.path") is None and data.get("path")):
        return None, "the data is not the built-in task, so the reference's clean subset is not known"
    for key in ("data.synthetic.noise", "data.synthetic.label_noise"):
        value = option(reference_args, key)
        try:
            if value is None or float(value) != 0.0:
                return None, f"--reference-args does not set --{key}=0"
        except ValueError:
            return None, f"--reference-args: --{key}={value} is not a number"
    value = option(reference_args, "data.max_samples")
    if value is None or not value.isdigit() or int(value) < 1:
        return None, "--reference-args sets no --data.max_samples=N (the reference's first N problems)"
    return int(value), ""


def needs_reference(path: str) -> bool:
    with open(path) as f:
        return "ReferenceModel" in f.read()


def newest_model(run_dir: str) -> str | None:
    """The newest exported ``hf_model`` under a run directory."""
    found = glob.glob(os.path.join(run_dir, "**", "hf_model", "config.json"), recursive=True)
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None
