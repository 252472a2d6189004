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
    if args.num_problems < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--num_problems, --max_new_tokens and --batch_size must be positive")
    model, tokenizer, out_dir = load_for_eval(source, gguf_file=gguf, dtype=args.dtype)
    data = args.data.as_dict() if hasattr(args.data, "as_dict") else dict(vars(args.data))
    synthetic = data.pop("synthetic", None)
    if isinstance(synthetic, dict):
        data["synthetic"] = SyntheticTask(**synthetic)
    elif synthetic is not None:
        data["synthetic"] = synthetic
    datamodule = SFTDataModule(tokenizer=tokenizer, **data)
    problems = datamodule.eval_problems(limit=args.num_problems, split=args.split)
    rows = evaluate(model, tokenizer, problems, args.max_new_tokens, args.batch_size)
    output = args.output or os.path.join(out_dir, f"eval_{args.split}.jsonl")
    write_jsonl(output, rows)
    correct = sum(r["correct"] for r in rows)
    summary = {
        "model": source, "data": data.get("path") or "synthetic", "split": args.split, "n": len(rows),
        "correct": correct, "accuracy": correct / len(rows), "max_new_tokens": args.max_new_tokens, "output": output,
    }
    with open(os.path.splitext(output)[0] + ".summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"exact match: {correct}/{len(rows)} = {100 * correct / len(rows):.1f}%  ({output})")
    return summary
