"""lm-evaluation-harness as an optional evaluation backend: the paper's general-ability benchmarks on an exported model.

    pip install -e '.[eval]'
    python -m sstoken_pl.harness --model runs/x/lightning_logs/version_0/hf_model --tasks paper
    python -m sstoken_pl.harness --model runs/x --tasks mmlu arc_easy --base_results base/lm_eval_results.json
    python -m sstoken_pl.harness --model runs/x --tasks sstoken_arith --include_path tests/data/lm_eval_task --limit 8

(also ``python -m sstoken_pl evaluate --model ... --lm_eval_tasks ...``). The model goes through lm-eval's Hugging
Face wrapper (``model="hf"``, ``pretrained=<folder>``) exactly as ``lm_eval --model hf`` would load it. ``--tasks``
takes lm-eval task, group or tag names, the names of YAML tasks under ``--include_path``, the paper's names
(``PAPER_TASKS``: each runs with the paper's few-shot count unless ``--num_fewshot`` is given) and ``paper`` (all
of them but TyDiQA, which the paper ran with a separate script).

Writes a compact JSON (default: ``lm_eval_results.json`` beside the model: in the run's version folder for an
exported ``hf_model``, else in the model folder): per task its few-shot count, number of items and every metric's
value and stderr, plus ``base`` and ``delta`` (this model minus the base) when ``--base_results`` names an earlier
result (this module's JSON or an ``lm_eval --output_path`` results JSON). Prints a table of the same.

The environment is not changed: lm-eval downloads hub datasets on first use and caches them; offline, set
``HF_DATASETS_OFFLINE=1`` with a filled cache. A task whose dataset cannot be loaded fails with one line naming it.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sstoken_pl.errors import ConfigError, SSTokenError

INSTALL_HINT = "pip install -e '.[eval]'"
RESULTS_FILE = "lm_eval_results.json"


@dataclass(frozen=True)
class PaperTask:
    """One benchmark of the paper's general-ability table (jianke0604/ssToken, eval.sh / eval_tydiqa.sh)."""

    num_fewshot: int
    lm_eval_tasks: tuple[str, ...]  # the lm-eval task/group/tag names it runs
    datasets: tuple[str, ...]  # the Hugging Face hub datasets lm-eval downloads (network on first use, then cached)
    separate: bool = False  # not part of the paper's lm-eval run (`--tasks paper` leaves it out)
    note: str = ""


# Every one of them reads hub datasets: the first run needs the network (or a filled HF_DATASETS_CACHE).
PAPER_TASKS: dict[str, PaperTask] = {
    "mmlu": PaperTask(5, ("mmlu",), ("cais/mmlu",), note="group of 57 subjects; acc"),
    "arc_challenge": PaperTask(0, ("arc_challenge",), ("allenai/ai2_arc",)),
    "arc_easy": PaperTask(0, ("arc_easy",), ("allenai/ai2_arc",)),
    "hellaswag": PaperTask(0, ("hellaswag",), ("Rowan/hellaswag",)),
    "winogrande": PaperTask(0, ("winogrande",), ("allenai/winogrande",)),
    "logiqa": PaperTask(0, ("logiqa",), ("EleutherAI/logiqa",)),
    "truthfulqa": PaperTask(0, ("truthfulqa",), ("truthfulqa/truthful_qa",),
                            note="tag: truthfulqa_mc1, truthfulqa_mc2 and truthfulqa_gen (generation, BLEU/ROUGE)"),
    "triviaqa": PaperTask(0, ("triviaqa",), ("mandarjoshi/trivia_qa",), note="generation, exact_match"),
    "agieval": PaperTask(0, ("agieval",), ("hails/agieval-*",), note="group of 21 subtasks (English and Chinese)"),
    "tydiqa": PaperTask(1, ("tydiqa_goldp",), ("google-research-datasets/tydiqa",), separate=True,
                        note="the paper used open-instruct's TyDiQA script (1-shot, gold passage, 200 per language); "
                             "lm-eval's tydiqa_goldp is the nearest lm-eval task, not the same protocol"),
}


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"lm-evaluation-harness (lm_eval) is not installed: {INSTALL_HINT}") from None
    return lm_eval


def resolve_model_dir(model: str) -> str:
    """The Hugging Face model folder for ``model``: an exported model folder, or a run directory (its newest
    exported ``hf_model``)."""
    from sstoken_pl.models import find_exported_model

    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise ConfigError(f"--model: no such folder {model} (give an exported hf_model folder or a run directory)")
    found = find_exported_model(path)
    if not os.path.isfile(os.path.join(found, "config.json")):
        raise ConfigError(f"--model: {model} is not a Hugging Face model folder (no config.json) and holds no "
                          "exported hf_model of a run")
    if not any(os.path.isfile(os.path.join(found, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"--model: {found} has no tokenizer (tokenizer.json / tokenizer_config.json); "
                          "save one next to the model")
    return os.path.abspath(found)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def expand_tasks(tasks: Sequence[str], num_fewshot: Optional[int] = None) -> list[tuple[str, Optional[int]]]:
    """``(lm-eval name, few-shot count or None for the task's own)`` for each requested name: ``paper`` is every
    paper task but the separate ones; a paper name runs its lm-eval tasks with the paper's count; ``num_fewshot``,
    when given, overrides every count. Duplicates are dropped, order kept."""
    out: dict[str, Optional[int]] = {}
    for name in tasks:
        paper = [k for k, t in PAPER_TASKS.items() if not t.separate] if name == "paper" else [name]
        for key in paper:
            spec = PAPER_TASKS.get(key)
            for lm_name in spec.lm_eval_tasks if spec else (key,):
                out.setdefault(lm_name, num_fewshot if num_fewshot is not None else (spec.num_fewshot if spec else None))
    return list(out.items())


def _unknown_task_error(name: str, manager) -> ConfigError:
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
    hint = f" (close: {', '.join(close)})" if close else ""
    return ConfigError(
        f"--tasks: unknown task {name!r}{hint}: not an lm-eval task/group/tag nor a YAML task under --include_path; "
        f"the paper's tasks are {', '.join(['paper', *PAPER_TASKS])}; list all with `lm_eval ls tasks`"
    )


def _load_tasks(names: Sequence[str], include_path: Sequence[str]) -> tuple[Any, dict[str, list[Any]], dict[str, list[str]]]:
    """The task manager and, per name, the lm-eval Task/Group objects to run (their datasets loaded) and their
    names (a tag's tasks; a group or task itself)."""
    include = tuple(os.path.abspath(os.path.expanduser(p)) for p in include_path)
    for path in include:
        if not os.path.isdir(path):
            raise ConfigError(f"--include_path: no such folder {path}")
    manager = _task_manager(include, False) if include else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = _task_manager(include, True)  # indexing lm-eval's ~15k built-in tasks takes seconds: only if needed
    for name in names:
        if name not in manager.all_tasks:
            raise _unknown_task_error(name, manager)
    loaded: dict[str, list[Any]] = {}
    expanded: dict[str, list[str]] = {}
    for name in names:
        try:
            got = manager.load([name])
        except Exception as err:  # noqa: BLE001 - a dataset lm-eval cannot load (offline hub, missing file) is input
            raise ConfigError(f"--tasks: task {name!r} could not load its dataset ({_one_line(err)}); lm-eval downloads "
                              "hub datasets on first use (offline: HF_DATASETS_OFFLINE=1 with a filled cache); a local "
                              "task's relative data_files are read from the current folder") from None
        if name in got["groups"]:
            loaded[name], expanded[name] = [got["groups"][name]], [name]
        elif name in got["tasks"]:
            loaded[name], expanded[name] = [got["tasks"][name]], [name]
        else:  # a tag: its tasks
            loaded[name], expanded[name] = list(got["tasks"].values()), list(got["tasks"])
    return manager, loaded, expanded


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compact_results(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task of an lm-eval results dict (``simple_evaluate``'s return or an ``--output_path`` JSON):
    ``{"num_fewshot", "n", "subtasks", "metrics": {metric: {"value", "stderr", "higher_is_better"}}}``.
    A metric is named ``metric`` for lm-eval's ``none`` filter, else ``metric,filter``; ``n`` is the number of items
    evaluated (summed over a group's tasks)."""
    results = raw.get("results")
    if not isinstance(results, dict):
        raise ConfigError("lm-eval results have no 'results' mapping")
    n_samples = raw.get("n-samples") or {}
    n_shot = raw.get("n-shot") or {}
    subtasks = raw.get("group_subtasks") or {}
    better = raw.get("higher_is_better") or {}

    def count(task: str, seen: frozenset = frozenset()) -> Optional[int]:
        if isinstance(n_samples.get(task), dict) and "effective" in n_samples[task]:
            return int(n_samples[task]["effective"])
        children = [c for c in subtasks.get(task) or [] if c not in seen]
        counts = [count(c, seen | {task}) for c in children]
        return sum(counts) if counts and None not in counts else None

    out: dict[str, dict[str, Any]] = {}
    for task, values in results.items():
        metrics: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr") or _number(value) is None:
                continue
            name = metric if filt == "none" else key
            metrics[name] = {"value": _number(value), "stderr": _number(values.get(f"{metric}_stderr,{filt}")),
                             "higher_is_better": (better.get(task) or {}).get(metric)}
        shots = n_shot.get(task)
        out[task] = {"num_fewshot": shots if isinstance(shots, int) else None, "n": count(task),
                     "subtasks": list(subtasks.get(task) or []), "metrics": metrics}
    return out


def load_results(path: str) -> dict[str, Any]:
    """A results file: this module's JSON, or lm-eval's own results JSON (converted with ``compact_results``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--base_results: no such file {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--base_results: {path} is not readable JSON ({_one_line(err)})") from None
    if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
        return data
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        return {"model": (data.get("config") or {}).get("model_args"), "tasks": compact_results(data)}
    raise ConfigError(f"--base_results: {path} holds neither this tool's results ('tasks') nor lm-eval's ('results')")


def add_delta(result: dict[str, Any], base: dict[str, Any]) -> int:
    """Adds ``base`` and ``delta`` (this minus base) to each metric that both results have; returns how many."""
    matched = 0
    for task, entry in result["tasks"].items():
        base_metrics = ((base.get("tasks") or {}).get(task) or {}).get("metrics") or {}
        for metric, values in entry["metrics"].items():
            base_value = _number((base_metrics.get(metric) or {}).get("value"))
            if base_value is None or values["value"] is None:
                continue
            values["base"] = base_value
            values["delta"] = values["value"] - base_value
            matched += 1
    return matched


def run_harness(
    model: str,
    tasks: Sequence[str],
    include_path: Sequence[str] = (),
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int | str = 1,
    dtype: str = "auto",
    device: Optional[str] = None,
    base_results: Optional[str] = None,
    bootstrap_iters: int = 100000,
) -> dict[str, Any]:
    """Runs lm-eval's Hugging Face wrapper on the model folder ``model`` over ``tasks`` and returns the compact
    result: ``{"model", "lm_eval_version", "limit", "requested": {name: the tasks/groups it ran as},
    "tasks": compact_results(...), ...}``."""
    lm_eval = _require_lm_eval()
    if not tasks:
        raise ConfigError(f"--tasks: name at least one task (e.g. {', '.join(['paper', *PAPER_TASKS])})")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and not (limit > 0):
        raise ConfigError(f"--limit must be positive (items per task, or a fraction below 1), got {limit}")
    batch = _batch_size(batch_size)
    model_dir = resolve_model_dir(model)
    base = load_results(base_results) if base_results else None
    plan = expand_tasks(tasks, num_fewshot)
    manager, loaded, expanded = _load_tasks([name for name, _ in plan], include_path)
    if base is not None and not any(n in base["tasks"] for names in expanded.values() for n in names):
        raise ConfigError(f"--base_results: {base_results} has none of the tasks {', '.join(expanded)} "
                          f"(it has {', '.join(list(base['tasks'])[:10]) or 'none'})")

    import torch
    from lm_eval.api.registry import get_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        lm = get_model("hf").create_from_arg_string(f"pretrained={model_dir},dtype={dtype}",
                                                    {"batch_size": batch, "device": device})
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"--model: lm-eval could not load {model_dir} ({_one_line(err)})") from None

    by_shots: dict[Optional[int], list[Any]] = {}
    for name, shots in plan:
        by_shots.setdefault(shots, []).extend(loaded[name])
    merged: dict[str, dict[str, Any]] = {}
    for shots, objects in by_shots.items():  # simple_evaluate takes one few-shot count: one call per count
        raw = lm_eval.simple_evaluate(model=lm, tasks=objects, num_fewshot=shots, limit=limit, task_manager=manager,
                                      log_samples=False, bootstrap_iters=bootstrap_iters)
        merged.update(compact_results(raw))
    result = {
        "model": model_dir, "lm_eval_version": lm_eval.__version__, "dtype": dtype, "device": device, "limit": limit,
        "requested": {name: expanded[name] for name, _ in plan}, "tasks": merged,
    }
    if base is not None:
        result["base_results"] = os.path.abspath(base_results)
        result["base_model"] = base.get("model")
        add_delta(result, base)
    return result


def _batch_size(value: int | str) -> int | str:
    text = str(value)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ConfigError(f"--batch_size must be a positive integer, 'auto' or 'auto:N', got {value!r}")


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """``(task, metric, value, stderr[, base, delta])`` rows for the requested tasks (a group: its aggregate row,
    or its subtasks where lm-eval gives no aggregate; a tag: its tasks)."""
    tasks = result["tasks"]
    with_delta = "base_results" in result
    names: list[str] = []

    def visit(name: str) -> None:
        if name in names:
            return
        entry = tasks.get(name)
        if entry is not None and entry["metrics"]:
            names.append(name)
        elif entry is not None:
            for child in entry["subtasks"]:
                visit(child)

    for members in result["requested"].values():
        for name in members:
            visit(name)
    rows = []
    for name in names:
        for metric, v in tasks[name]["metrics"].items():
            row = (name, metric, f"{v['value']:.4f}", "" if v["stderr"] is None else f"{v['stderr']:.4f}")
            if with_delta:
                row += ("", "") if "delta" not in v else (f"{v['base']:.4f}", f"{v['delta']:+.4f}")
            rows.append(row)
    return rows


def format_table(result: dict[str, Any]) -> str:
    header = ("task", "metric", "value", "stderr") + (("base", "delta") if "base_results" in result else ())
    rows = [header] + table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def default_output(model_dir: str) -> str:
    parent = os.path.dirname(model_dir.rstrip("/"))
    return os.path.join(parent if os.path.basename(model_dir.rstrip("/")) == "hf_model" else model_dir, RESULTS_FILE)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sstoken_pl.harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported hf_model folder, or a run directory (newest hf_model)")
    parser.add_argument("--tasks", nargs="+", required=True,
                        help="lm-eval task/group/tag names, local task names, paper names, or 'paper'")
    parser.add_argument("--include_path", nargs="+", default=[], help="folders of local lm-eval task YAMLs")
    parser.add_argument("--num_fewshot", type=int, default=None,
                        help="few-shot examples for every task (default: the paper's count, else the task's own)")
    parser.add_argument("--limit", type=float, default=None,
                        help="items per task (for quick checks; the paper's numbers use all)")
    parser.add_argument("--batch_size", default="1", help="a positive integer, 'auto' or 'auto:N' (the paper: auto)")
    parser.add_argument("--dtype", default="auto", help="lm-eval's dtype model arg: auto, bfloat16, float16, float32")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--base_results", default=None, help="a base model's results JSON: adds base and delta")
    parser.add_argument("--output", default=None, help=f"the results JSON (default: {RESULTS_FILE} beside the model)")
    return parser


def run_cli(argv: Sequence[str]) -> dict[str, Any]:
    args = _parser().parse_args(list(argv))
    limit = args.limit
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)
    result = run_harness(args.model, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                         limit=limit, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                         base_results=args.base_results)
    output = args.output or default_output(result["model"])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(format_table(result))
    print(f"({output})")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        run_cli(sys.argv[1:] if argv is None else argv)
    except SSTokenError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
