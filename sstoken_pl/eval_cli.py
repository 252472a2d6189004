"""``python -m sstoken_pl evaluate``: exact match of the final answer by greedy generation, on any dataset's held-out
split, from an exported model, a run directory, a checkpoint, or a base model.

    python -m sstoken_pl evaluate --model runs/quickstart --num_problems 64
    python -m sstoken_pl evaluate --model runs/gsm8k --data.path ../shared/data/gsm8k --data.format gsm8k \\
        --split test --num_problems 200 --max_new_tokens 256

Answer extraction: the text after the last ``####`` (its first number, else its first line), else the last number
in the output; commas are removed and numbers compare by value (``19.0`` matches ``19``); anything else must match
exactly. The problems are the first ``num_problems`` of the split, in file order (a fixed subset).

Writes one JSON line per problem to ``--output`` (default: ``eval_<split>.jsonl`` beside the model: in the run's
version folder, the exported model's folder, or the checkpoint's folder; the current folder for a hub/package
model): ``{"index", "prompt", "output", "gold", "extracted", "correct"}``, and a summary next to it
(``<output>.summary.json``).

Retention (``--retention true``; ``sstoken_pl.retention``): the general-instruction NLL (Alpaca seed tasks,
``--general_path``) and another domain's NLL (GSM8K test answers, ``--other_path``; the synthetic task's validation
answers when ``--data.format gsm8k``) of the model, rendered with ``data.max_length``, written to
``<output>.retention.json`` (the record of ``sstoken_pl.retention``) and printed. Their base values come from
``--base`` (a base model, computed), else from the ``retention.json`` that ``fit`` wrote beside the model (when the
same data gave the same token counts: pass the run's ``--config``), else from the model named by the run's
``config.yaml`` (``model.model_name_or_path``); otherwise the absolute values are reported. ``--num_problems 0``
measures retention only.

    python -m sstoken_pl evaluate --model runs/quickstart --config configs/quickstart.yaml --retention true --num_problems 0
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from sstoken_pl.errors import ConfigError, SSTokenError


def load_for_eval(model: str, gguf_file: Optional[str] = None, dtype: str = "float32") -> tuple[Any, Any, str]:
    """``(model, tokenizer, folder for outputs)`` from an exported model directory, a run directory (its newest
    exported ``hf_model``), a ``.ckpt`` of ``SFTModule``, or any source ``model_name_or_path`` accepts."""
    from sstoken_pl.models import find_exported_model, load_causal_lm
    from sstoken_pl.tokenizer import load_tokenizer

    path = os.path.expanduser(model)
    if path.endswith(".ckpt"):
        if not os.path.isfile(path):
            raise ConfigError(f"--model: no checkpoint file {model}")
        import torch

        from sstoken_pl.module import SFTModule

        try:
            hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters")
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise ConfigError(f"--model: {model} is not a readable Lightning checkpoint ({type(err).__name__}: {first})") from None
        if not hparams or ("model_name_or_path" not in hparams and "model_config" not in hparams):
            raise ConfigError(f"--model: {model} is not a checkpoint of sstoken_pl.SFTModule (no model hyper-parameters)")
        module = SFTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        return module.model.eval(), module.tokenizer, os.path.dirname(os.path.abspath(path))
    source = find_exported_model(path) if os.path.isdir(path) else model
    if os.path.isdir(path) and source == path and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"--model: {model} holds no model (no config.json) and no exported hf_model of a run")
    loaded = load_causal_lm(source, gguf_file=gguf_file, dtype=dtype)
    tokenizer = load_tokenizer(source, gguf_file=gguf_file)
    out_dir = os.path.dirname(source) if os.path.basename(source.rstrip("/")) == "hf_model" else (source if os.path.isdir(source) else ".")
    return loaded.eval(), tokenizer, out_dir


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: list[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy generation and exact match for each problem: the JSONL rows."""
    from sstoken_pl.evaluation import generate_answers, score_answers

    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(problems), desc="Generating", unit="problem", file=sys.stderr)
    try:
        outputs = generate_answers(
            model, tokenizer, [p["prompt_ids"] for p in problems], max_new_tokens, batch_size,
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    return score_answers(problems, outputs)


def _parser():
    import argparse
    from typing import Literal

    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.retention import GENERAL_PATH, OTHER_PATH

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the description's paragraphs and examples as written."""

    parser = ArgumentParser(
        prog="python -m sstoken_pl evaluate",
        description=__doc__.replace("``", "`"),
        default_config_files=[],
        formatter_class=Formatter,
    )
    parser.add_argument("--config", type=Optional[str], default=None, nargs="?",
                        help="a fit config (YAML): its data: section is used, and its model: when --model is absent; "
                             "other keys are ignored. Command-line options override it.")
    parser.add_argument("--model", type=Optional[str], default=None,
                        help="exported model dir, run dir (newest hf_model), .ckpt of SFTModule, hub name or pkg:NAME")
    parser.add_argument("--gguf_file", type=Optional[str], default=None, help="a GGUF file inside --model's folder")
    parser.add_argument("--dtype", type=str, default="float32", help="parameter dtype (float32, bfloat16, float16)")
    parser.add_class_arguments(SFTDataModule, "data", skip={"tokenizer"})
    parser.add_argument("--split", type=Literal["validation", "test"], default="validation",
                        help="validation: what fit validates on; test: the source's test split")
    parser.add_argument("--num_problems", type=int, default=200, help="the first N problems of the split")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="generation budget per problem")
    parser.add_argument("--batch_size", type=int, default=16, help="problems generated together")
    parser.add_argument("--output", type=Optional[str], default=None, help="per-problem JSONL (default: beside the model)")
    parser.add_argument("--retention", type=bool, default=False, help="also measure the retention NLLs (see above)")
    parser.add_argument("--base", type=Optional[str], default=None,
                        help="base model for the retention deltas (any --model source)")
    parser.add_argument("--base_gguf_file", type=Optional[str], default=None, help="a GGUF file inside --base's folder")
    parser.add_argument("--general_path", type=str, default=GENERAL_PATH, help="the Alpaca seed tasks (retention)")
    parser.add_argument("--other_path", type=str, default=OTHER_PATH, help="the GSM8K test file (retention)")
    parser.add_argument("--retention_samples", type=int, default=200, help="at most this many samples per measure")
    return parser


def _fit_config_defaults(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path}")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"--config: {path} is not a YAML mapping")
    return dict(config.get("data") or {}), dict(config.get("model") or {})


def main(argv: list[str]) -> None:
    try:
        run(argv)
    except SSTokenError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run(argv: list[str]) -> dict[str, Any]:
    flag = "--lm_eval_tasks"  # lm-evaluation-harness instead of exact match: sstoken_pl.harness, docs/evaluation.md
    if any(a.split("=", 1)[0] == flag for a in argv):
        from sstoken_pl.harness import run_cli

        return run_cli(["--tasks" + a[len(flag):] if a.split("=", 1)[0] == flag else a for a in argv])
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.evaluation import write_jsonl
    from sstoken_pl.synthetic import SyntheticTask

    parser = _parser()
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    model_defaults: dict[str, Any] = {}
    if config_path:
        data_defaults, model_defaults = _fit_config_defaults(config_path)
        parser.set_defaults({f"data.{k}": v for k, v in data_defaults.items() if k != "tokenizer"})
    args = parser.parse_args(argv)
    source = args.model or model_defaults.get("model_name_or_path")
    if not source:
        raise ConfigError("give --model (an exported model, a run dir, a .ckpt, a hub name) or a --config with model:")
    gguf = args.gguf_file or (model_defaults.get("gguf_file") if not args.model else None)
    if args.num_problems < (0 if args.retention else 1) or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--num_problems, --max_new_tokens and --batch_size must be positive "
                          "(--num_problems 0 only with --retention true)")
    if args.retention_samples < 1:
        raise ConfigError(f"--retention_samples must be positive, got {args.retention_samples}")
    model, tokenizer, out_dir = load_for_eval(source, gguf_file=gguf, dtype=args.dtype)
    data = args.data.as_dict() if hasattr(args.data, "as_dict") else dict(vars(args.data))
    synthetic = data.pop("synthetic", None)
    if isinstance(synthetic, dict):
        data["synthetic"] = SyntheticTask(**synthetic)
    elif synthetic is not None:
        data["synthetic"] = synthetic
    output = args.output or os.path.join(out_dir, f"eval_{args.split}.jsonl")
    retention = _retention(args, model, tokenizer, data, out_dir, output) if args.retention else None
    if args.num_problems == 0:
        return {"model": source, "retention": retention}
    datamodule = SFTDataModule(tokenizer=tokenizer, **data)
    problems = datamodule.eval_problems(limit=args.num_problems, split=args.split)
    rows = evaluate(model, tokenizer, problems, args.max_new_tokens, args.batch_size)
    write_jsonl(output, rows)
    correct = sum(r["correct"] for r in rows)
    summary = {
        "model": source, "data": data.get("path") or "synthetic", "split": args.split, "n": len(rows),
        "correct": correct, "accuracy": correct / len(rows), "max_new_tokens": args.max_new_tokens, "output": output,
        **({"retention": retention} if retention is not None else {}),
    }
    with open(os.path.splitext(output)[0] + ".summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"exact match: {correct}/{len(rows)} = {100 * correct / len(rows):.1f}%  ({output})")
    return summary


def _recorded_base(out_dir: str, record: dict[str, Any]) -> tuple[dict[str, float], str]:
    """Base values from the ``retention.json`` of ``fit`` in ``out_dir`` for the measures whose data and token count
    are the same as in ``record``, and a note on those that are not."""
    path = os.path.join(out_dir, "retention.json")
    if not os.path.isfile(path):
        return {}, ""
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    base, differ = {}, []
    for name, entry in record.items():
        old = saved.get(name) if isinstance(saved, dict) else None
        if not isinstance(old, dict) or old.get("base") is None or "skipped" in entry:
            continue
        if (old.get("path"), old.get("tokens")) == (entry["path"], entry["tokens"]):
            base[name] = old["base"]
        else:
            differ.append(name)
    note = f"; {path} has other data or token counts for {', '.join(differ)} (pass the run's --config)" if differ else ""
    return base, note


def _run_base_model(out_dir: str) -> Optional[tuple[str, Optional[str]]]:
    """``(model_name_or_path, gguf_file)`` of the run's ``config.yaml`` in ``out_dir``, when it names one."""
    import yaml

    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        model = (yaml.safe_load(f) or {}).get("model") or {}
    name = model.get("model_name_or_path") if isinstance(model, dict) else None
    return (name, model.get("gguf_file")) if name else None


def _retention(args: Any, model: Any, tokenizer: Any, data: dict[str, Any], out_dir: str, output: str) -> dict[str, Any]:
    """The retention record of ``model`` (module docstring), printed and written to ``<output>.retention.json``."""
    from sstoken_pl.retention import (RetentionConfig, format_line, retention_record, trains_on_gsm8k, with_base,
                                      write_record)

    config = RetentionConfig(general_path=args.general_path, other_path=args.other_path,
                             max_samples=args.retention_samples, max_length=data.get("max_length") or 2048)
    gsm8k = trains_on_gsm8k(data.get("format"), data.get("path"), args.other_path)
    record = retention_record(model, tokenizer, config, gsm8k_run=gsm8k, synthetic=data.get("synthetic"), strict=True,
                              option="--{}")
    base: dict[str, Any] = {}
    note = ""
    base_source = (args.base, args.base_gguf_file) if args.base else None
    if base_source is None:
        run_dir = os.path.dirname(out_dir) if os.path.basename(out_dir) == "checkpoints" else out_dir
        base, note = _recorded_base(run_dir, record)
        if len(base) < len(record):
            base_source = _run_base_model(run_dir)
    if base_source is not None:
        base_model, base_tokenizer, _ = load_for_eval(base_source[0], gguf_file=base_source[1], dtype=args.dtype)
        base = retention_record(base_model, base_tokenizer, config, gsm8k_run=gsm8k, synthetic=data.get("synthetic"))
        note = f"; base: {base_source[0]}"
    record = with_base(record, base)
    path = os.path.splitext(output)[0] + ".retention.json"
    write_record(path, record)
    for name, entry in record.items():
        print(format_line(name, entry))
    print(f"retention: {path}" + (note or ("" if base else "; no base values (give --base for the deltas)")))
    return record
