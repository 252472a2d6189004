"""Compare token-selection methods on one model/data config: the same data order, seeds and step budget for all.

    python tools/compare.py --config configs/quickstart.yaml --methods full random sstoken rho1 --seeds 0 1 2 \\
        --out runs/compare/synthetic --extra "--data.synthetic.noise=0.5 --data.synthetic.label_noise=0.2"

Each (method, seed) is one `python -m sstoken_pl fit` run in its own process: the model/data config, then
`--trainer.callbacks=[]` and the method's config `configs/methods/<method>.yaml` or a `.yaml` path (rewritten into `<out>/configs/`
with a CSV logger, a step timer, the reference model's path and the seed), then `--extra`. Methods that need a
reference model (Rho-1, TokenCleaning) share one, trained first by `fit` with `--reference-args` (default: the
built-in task with its noise off, the first 256 training problems) and evaluated like every method: it is the row
`reference (clean subset)`, and the row `full+clean` (added unless `--no-full-clean`; also a name for `--methods`)
is full SFT on the noisy data with that clean subset mixed in (`--data.synthetic.clean_copies=N`), so that a
reference-based method is seen against what its clean data alone gives. The data order is the config's (`data.seed`),
the same for every method; `--seeds` change the model's randomness (LoRA initialisation, dropout) and the
selection's draws, and with `--data-order-seeds` also the data order (seed S passes `--data.seed=S`; runs in
`seed<S>-order<S>/`; on a file dataset without a validation split data.seed also picks the held-out share).

Writes into `--out`:
  results.md     the table: kept fraction, noise dropped / clean kept (built-in task), final train loss (over the
                 kept tokens: not comparable across methods), held-out loss (all response tokens) and answer
                 exact match (mean ± std over seeds), step time relative to full SFT (of the same seed, median over
                 seeds), and the retention measures general / other-domain NLL Δ (each run's `retention.json`)
  results.json   the same per method and per seed
  val_loss.png   held-out loss against step, one line per method (mean over seeds; band: min–max)
  target_vs_retention.png   exact-match gain over the base model against general NLL Δ, one point per method
  samples.html   a few training samples with each method's kept and dropped tokens (and the injected noise)
  runs/<method>/seed<S>/   each run (log.txt, CSV metrics, selection samples, exported model)

Runs write no Lightning checkpoint (`--trainer.enable_checkpointing=false`; each would be a full copy of the model and
its optimizer state, ~0.7 GB for SmolLM2-135M): a run's result is its exported `hf_model` and its logs.
`--keep-checkpoints` keeps them.

A finished run (its `done.json`) is not redone when the command is repeated; an unfinished one is redone from
scratch. `--jobs N` runs N at once (CPU threads: cores // N each); step times of runs that shared the machine are not costs, and
the report says so. `--dry-run` prints the commands; `--report-only` writes the report from the runs finished so far (e.g. while another
invocation is still running the rest) and runs nothing.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shlex
import statistics
import sys
from typing import Any

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # compare_report, also when loaded from a path
from compare_report import (  # noqa: E402  (re-exported: the report builders)
    FULL_CLEAN, KINDS, REFERENCE_ROW, _fmt, aggregate, kept_by_kind, kinds_table, markdown_table, pick_samples, place_labels, plot,
    read_samples, render_tokens, samples_html, target_vs_retention, token_kind, write_report,
)
from compare_configs import (  # noqa: E402  (re-exported: the run configs)
    METHODS_DIR, ROOT, method_file, method_name, method_config, stores_used, needs_history_logits, with_logging, option, clean_subset, needs_reference, newest_model,
)
from compare_runs import free_gib, portable, run, run_many  # noqa: E402  (re-exported: running the fits)

REFERENCE_ARGS = "--data.synthetic.noise=0 --data.synthetic.label_noise=0 --data.max_samples=256"


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged scalar of the newest CSV log under ``run_dir``: name → [(step, value)]."""
    files = glob.glob(os.path.join(run_dir, "**", "metrics.csv"), recursive=True)
    if not files:
        return {}
    metrics: dict[str, list[tuple[int, float]]] = {}
    with open(max(files, key=os.path.getmtime), newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    metrics.setdefault(key, []).append((step, float(value)))
    return metrics


def summarise(metrics: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The numbers of one run, from its metrics."""
    values = lambda k: [v for _, v in metrics.get(k, [])]
    mean = lambda k: statistics.fmean(values(k)) if values(k) else None
    last = lambda k: values(k)[-1] if values(k) else None
    train = values("train/loss")
    return {
        "kept_fraction": mean("selection/kept_fraction"),
        "noise_dropped": mean("selection/noise_dropped"),
        "clean_kept": mean("selection/clean_kept"),
        "train_loss": statistics.fmean(train[-5:]) if train else None,
        "val_loss": last("val/loss"),
        "val_curve": metrics.get("val/loss", []),
        "accuracy_before": last("eval/accuracy_before"),
        "accuracy_after": last("eval/accuracy_after"),
        "step_time": statistics.median(values("time/step")) if values("time/step") else None,
        "general_delta": last("retention/general_nll_delta"),  # retention.json, when there is one, overrides these
        "other_delta": last("retention/other_nll_delta"),
    }


def read_retention(run_dir: str) -> dict[str, float | None]:
    """The retention measures of a run from its newest ``retention.json`` (``{"general_nll": {"base", "after",
    "delta", ...}, "other_nll": {...}}``; positive delta: forgot): ``general_delta`` and ``other_delta``, None for a
    measure it lacks (absent, ``{"skipped": ...}``, or no base value); ``{}`` when the run has no such file. A file
    that is not such a record is one clear error."""
    files = glob.glob(os.path.join(run_dir, "**", "retention.json"), recursive=True)
    if not files:
        return {}
    path = max(files, key=os.path.getmtime)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path} is not a readable JSON retention record: {e}")
    if not isinstance(record, dict):
        sys.exit(f"error: {path}: a retention record is a mapping of measures, got {type(record).__name__}")
    out: dict[str, float | None] = {}
    for measure, key in (("general_nll", "general_delta"), ("other_nll", "other_delta")):
        m = record.get(measure)
        if m is not None and not isinstance(m, dict):
            sys.exit(f"error: {path}: {measure} is a mapping (base, after, delta, ...), got {m!r}")
        m = m or {}
        delta = m.get("delta")
        if delta is None and _finite(m.get("after")) and _finite(m.get("base")):
            delta = m["after"] - m["base"]
        if delta is not None and not _finite(delta):
            sys.exit(f"error: {path}: {measure}'s delta is not a finite number: {delta!r}")
        out[key] = None if delta is None else float(delta)  # a skipped measure, or one without a base value: "—"
    return out


def retention_base(out: str) -> list[str]:
    """``--eval.retention.base=<file>`` from a finished run of this comparison whose ``retention.json`` holds the base
    model's values of every measure it took (each run of a comparison starts from the same base model and measures
    the same data; ``fit`` checks both), so that only the first run pays for the base pass; ``[]`` when none has."""
    for path in sorted(glob.glob(os.path.join(out, "reference", "**", "retention.json"), recursive=True)
                       + glob.glob(os.path.join(out, "runs", "*", "*", "**", "retention.json"), recursive=True)):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        taken = [m for m in record.values() if isinstance(m, dict) and "skipped" not in m] if isinstance(record, dict) else []
        if taken and all(_finite(m.get("base")) for m in taken):
            return [f"--eval.retention.base={path}"]
    return []


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def base_accuracy(out: str, data_order: bool) -> float | None:
    """The base model's exact match before training from any finished run of this comparison (of the same kind of
    run folder, listed in this command or not): measured once per comparison, not again for a method added later."""
    kind = r"seed\d+-order\d+" if data_order else r"seed\d+"
    for path in sorted(glob.glob(os.path.join(out, "runs", "*", "seed*", "done.json"))):
        if not re.fullmatch(kind, os.path.basename(os.path.dirname(path))):
            continue
        try:
            with open(path) as f:
                value = (json.load(f).get("summary") or {}).get("accuracy_before")
        except (OSError, ValueError, AttributeError):
            continue
        if _finite(value):
            return float(value)
    return None


def run_summary(run_dir: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's numbers: ``summary`` (from its ``done.json``; else read from its metrics), with the retention measures
    of its ``retention.json``, the source of truth (a file written after the run, e.g. by a later fill, counts)."""
    summary = dict(summary) if summary is not None else summarise(read_metrics(run_dir))
    summary.setdefault("general_delta", None)
    summary.setdefault("other_delta", None)
    return {**summary, **read_retention(run_dir)}


# ---------------------------------------------------------------------------------------------------- main
def run_folder(seed: int, data_order: bool) -> str:
    """A run's folder under ``runs/<method>/``: ``seed<S>`` trains on the config's data order, ``seed<S>-order<S>``
    on the order shuffled by seed S (``--data-order-seeds``), so a finished run of one kind is never reused for the
    other."""
    return f"seed{seed}-order{seed}" if data_order else f"seed{seed}"


def train_reference(args, base: list[str], ref_dir: str, out: str, tail: list[str]) -> str:
    """Trains the reference model once (a CSV-logged, evaluated run like any method's) and returns its model."""
    if os.path.isfile(os.path.join(ref_dir, "done.json")) and newest_model(ref_dir):
        print(f"reference: reusing {ref_dir}")
        return newest_model(ref_dir)
    cfg_path = os.path.join(out, "configs", "reference.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(with_logging({}, 0, ref_dir, None, args.log_samples_every), f, sort_keys=False)
    cmd = base + ["--trainer.callbacks=[]", "--config", cfg_path, "--seed_everything=0", f"--trainer.default_root_dir={ref_dir}",
                  "--eval.before=false"] + tail + shlex.split(args.reference_args) + retention_base(out)
    run(cmd, ref_dir, args.dry_run)
    if not args.dry_run:
        json.dump({"command": portable(cmd), "summary": summarise(read_metrics(ref_dir))}, open(os.path.join(ref_dir, "done.json"), "w"))
    return newest_model(ref_dir) or ref_dir


def score_once(args, config: str, out: str, extra: list[str], reference: str | None, files: dict) -> dict:
    """``--score-once``: one ``python -m sstoken_pl score`` pass per fixed model the methods use (the base model, the
    reference), into ``<out>/scores/<kind>``; every method and seed then reads the store. Reused when complete."""
    kinds: set[str] = set()
    for path in files.values():
        with open(path) as f:
            kinds |= stores_used(yaml.safe_load(f) or {})
    stores, passes = {}, 0
    for kind in sorted(kinds):
        store = os.path.join(out, "scores", kind)
        stores[kind] = store
        meta = os.path.join(store, "meta.json")
        if os.path.isfile(meta) and json.load(open(meta)).get("complete"):
            print(f"scores ({kind}): reusing {store}")
            continue
        source = ["--source", reference] if kind == "reference" else []
        run([sys.executable, "-m", "sstoken_pl", "score", "--config", config, "--out", store] + source + extra, store,
            args.dry_run)
        passes += 1
    print(f"scoring passes: {passes}")
    return stores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the model/data config (e.g. configs/quickstart.yaml)")
    parser.add_argument("--methods", nargs="+", required=True,
                        help=f"names of configs/methods/*.yaml, paths of method configs of your own (*.yaml), or {FULL_CLEAN}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data-order-seeds", action="store_true",
                        help="seed S also shuffles the training data by S (--data.seed=S); default: every seed trains on the config's order")
    parser.add_argument("--no-full-clean", action="store_true",
                        help=f"with a reference-based method, do not add the {FULL_CLEAN} row (full SFT with the reference's clean subset mixed in)")
    parser.add_argument("--out", required=True, help="output folder (reused: finished runs are kept)")
    parser.add_argument("--max-steps", type=int, help="override trainer.max_steps for every run")
    parser.add_argument("--extra", default="", help="more `fit` arguments for every run, e.g. noise levels; a single one as --extra=\"--data.x=1\"")
    parser.add_argument("--reference-args", default=REFERENCE_ARGS, help=f"`fit` arguments of the reference run (default: {REFERENCE_ARGS})")
    parser.add_argument("--log-samples-every", type=int, default=10, help="log selection samples every N steps")
    parser.add_argument("--score-once", action="store_true",
                        help="score the base and reference models once (`python -m sstoken_pl score`) and let every run read the stores")
    parser.add_argument("--html-samples", type=int, default=4, help="training samples shown in samples.html")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's Lightning checkpoint (default: none is written; the exported hf_model is)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (default 1), each with cores // jobs CPU threads unless OMP_NUM_THREADS is set: "
                             "on a CPU two one-thread runs do more than one two-thread run; their step times are not costs")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the finished runs only (while a comparison is still running)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        sys.exit(f"error: --jobs {args.jobs}: at least 1 run at a time")
    files = {method_name(m): (method_file("full") if m == FULL_CLEAN else method_file(m)) for m in args.methods}
    if len(files) < len(args.methods):
        sys.exit(f"error: --methods names a method twice: {' '.join(args.methods)}")
    args.methods = list(files)

    out = os.path.abspath(args.out)
    config = os.path.abspath(args.config)
    base = [sys.executable, "-m", "sstoken_pl", "fit", "--config", config, "--eval.retention.enabled=true"]
    no_ckpt = [] if args.keep_checkpoints else ["--trainer.enable_checkpointing=false"]
    steps = [f"--trainer.max_steps={args.max_steps}"] if args.max_steps else []
    if args.max_steps and 0 < args.max_steps < args.log_samples_every:  # else samples.html would hold no sample
        print(f"note: --log-samples-every {args.log_samples_every} is beyond --max-steps {args.max_steps}: "
              f"logging selection samples every {args.max_steps} steps instead")
        args.log_samples_every = args.max_steps
    extra = shlex.split(args.extra)
    uses_reference = any(needs_reference(f) for m, f in files.items() if m != FULL_CLEAN)
    clean, why_not = clean_subset(config, extra, shlex.split(args.reference_args))
    if FULL_CLEAN in files and clean is None:
        sys.exit(f"error: --methods {FULL_CLEAN}: {why_not}")
    if uses_reference and FULL_CLEAN not in files and not args.no_full_clean:
        if clean is None:
            print(f"note: no {FULL_CLEAN} row: {why_not}")
        else:
            files[FULL_CLEAN] = method_file("full")
            args.methods.append(FULL_CLEAN)
    os.makedirs(os.path.join(out, "configs"), exist_ok=True)

    ref_dir = os.path.join(out, "reference")
    reference = None
    if uses_reference and not args.report_only:
        reference = train_reference(args, base, ref_dir, out, no_ckpt + steps + extra)

    scores = score_once(args, config, out, extra, reference, {m: f for m, f in files.items() if m != FULL_CLEAN}) \
        if args.score_once and not args.report_only else None

    results: dict[str, dict[int, dict]] = {}
    args.base_accuracy = base_accuracy(out, args.data_order_seeds)
    first = args.base_accuracy is None  # the first run that starts evaluates the base model, unless one already has
    jobs: list = []
    args.shared_runs = 1  # the most runs that shared the machine, for the report

    def finish(method: str, seed: int, run_dir: str, order_seed: int | None, cmd: list[str]) -> None:
        summary = run_summary(run_dir)
        record = {"command": portable(cmd), "data_order_seed": order_seed, "summary": summary}
        shared = {"parallel_runs": min(args.jobs, len(jobs))} if min(args.jobs, len(jobs)) > 1 else {}  # step times: not costs
        json.dump({**record, **shared}, open(os.path.join(run_dir, "done.json"), "w"))
        results.setdefault(method, {})[seed] = summary

    for seed in args.seeds:
        order_seed = seed if args.data_order_seeds else None
        for method in args.methods:
            folder = run_folder(seed, args.data_order_seeds)
            run_dir = os.path.join(out, "runs", method, folder)
            done = os.path.join(run_dir, "done.json")
            if os.path.isfile(done):
                record = json.load(open(done))
                if record.get("data_order_seed") != order_seed:
                    sys.exit(f"error: {done} records data order seed {record.get('data_order_seed')}, this comparison "
                             f"{order_seed}; move the run away or use another --out")
                print(f"{method} seed {seed}: reusing {run_dir}")
                results.setdefault(method, {})[seed] = run_summary(run_dir, record["summary"])
                args.shared_runs = max(args.shared_runs, record.get("parallel_runs", 1))
                first = False
                continue
            if args.report_only:
                print(f"{method} seed {seed}: not run yet")
                continue
            cfg_path = os.path.join(out, "configs", f"{method}_{folder}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(method_config(files[method], seed, run_dir, reference, args.log_samples_every, scores), f,
                               sort_keys=False)
            head = base + ["--trainer.callbacks=[]", "--config", cfg_path, f"--seed_everything={seed}",
                           f"--trainer.default_root_dir={run_dir}", f"--eval.before={'true' if first else 'false'}"] + no_ckpt + steps + extra
            tail = [f"--data.synthetic.clean_copies={clean}"] if method == FULL_CLEAN else []
            tail += [f"--data.seed={seed}"] if order_seed is not None else []
            # the base model's retention values of a run finished by the time this one starts (none in a dry run)
            command = (lambda h=head, t=tail: h + t) if args.dry_run else (lambda h=head, t=tail: h + retention_base(out) + t)
            jobs.append((command, run_dir, lambda cmd, m=method, s=seed, d=run_dir, o=order_seed: finish(m, s, d, o, cmd)))
            first = False
    args.shared_runs = max(args.shared_runs, min(args.jobs, len(jobs)))
    run_many(jobs, args.jobs, args.dry_run)
    if args.dry_run:
        return
    if uses_reference and os.path.isfile(os.path.join(ref_dir, "done.json")):
        results[REFERENCE_ROW] = {0: run_summary(ref_dir, json.load(open(os.path.join(ref_dir, "done.json"))).get("summary"))}
    folder = run_folder(args.seeds[0], args.data_order_seeds)
    per_method = {m: read_samples(os.path.join(out, "runs", m, folder)) for m in args.methods if m in results}
    command = f"python tools/compare.py {shlex.join(argv if argv is not None else sys.argv[1:])}"
    write_report(args, out, os.path.relpath(config, ROOT), command, results, per_method)


if __name__ == "__main__":
    main()
