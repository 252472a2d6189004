"""Compare token-selection methods on one model/data config: the same data order, seeds and step budget for all.

    python tools/compare.py --config configs/quickstart.yaml --methods full random sstoken rho1 --seeds 0 1 2 \\
        --out runs/compare/synthetic --extra "--data.synthetic.noise=0.5 --data.synthetic.label_noise=0.2"

Each (method, seed) is one `python -m sstoken_pl fit` run in its own process: the model/data config, then
`--trainer.callbacks=[]` and the method's config `configs/methods/<method>.yaml` or a `.yaml` path (rewritten into `<out>/configs/`
with a CSV logger, a step timer, the reference model's path and the seed), then `--extra`. Methods that need a
reference model (Rho-1, TokenCleaning) share one, trained first by `fit` with `--reference-args` (default: the
built-in task with its noise off, the first 256 training problems). The data order is the config's (`data.seed`),
the same for every method; `--seeds` change the model's randomness (LoRA initialisation, dropout) and the
selection's draws.

Writes into `--out`:
  results.md     the table: kept fraction, noise dropped / clean kept (built-in task), final train loss (over the
                 kept tokens: not comparable across methods), held-out loss (all response tokens) and answer
                 exact match (mean ± std over seeds), step time relative to full SFT (of the same seed, median over seeds)
  results.json   the same per method and per seed
  val_loss.png   held-out loss against step, one line per method (mean over seeds; band: min–max)
  samples.html   a few training samples with each method's kept and dropped tokens (and the injected noise)
  runs/<method>/seed<S>/   each run (log.txt, CSV metrics, selection samples, exported model)

Runs write no Lightning checkpoint (`--trainer.enable_checkpointing=false`; each would be a full copy of the model and
its optimizer state, ~0.7 GB for SmolLM2-135M): a run's result is its exported `hf_model` and its logs.
`--keep-checkpoints` keeps them.

A finished run (its `done.json`) is not redone when the command is repeated; an unfinished one is redone from
scratch. `--dry-run` prints the commands; `--report-only` writes the report from the runs finished so far (e.g. while another
invocation is still running the rest) and runs nothing.
"""

from __future__ import annotations

import argparse
import csv
import glob
import html
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS_DIR = os.path.join(ROOT, "configs", "methods")
REFERENCE_ARGS = "--data.synthetic.noise=0 --data.synthetic.label_noise=0 --data.max_samples=256 --eval.num_problems=0"


# ---------------------------------------------------------------------------------------------------- configs
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


def method_config(path: str, seed: int, save_dir: str, reference: str | None, log_samples_every: int) -> dict:
    """The method config ``path`` (see ``method_file``) with a CSV logger into ``save_dir``, a step timer, the seed of
    the selection's draws, the samples log, and the reference path filled in."""
    with open(path) as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            sys.exit(f"error: {path} is not valid YAML: {e}")
    if not isinstance(config, dict):
        sys.exit(f"error: {path}: a method config is a mapping (trainer: callbacks+: [...]), got {type(config).__name__}")
    callbacks = list((config.get("trainer") or {}).get("callbacks+") or [])
    for cb in callbacks:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("ReferenceModel"):
            args["path"] = reference
        if cb["class_path"].endswith("TokenSelection"):
            args["seed"] = seed
            args["log_samples_every"] = log_samples_every
            args["num_log_samples"] = 4
    callbacks.append({"class_path": "sstoken_pl.callbacks.timing.StepTimer", "init_args": {"warmup": 2}})
    trainer = dict(config.get("trainer") or {})
    trainer["callbacks+"] = callbacks
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": save_dir}}
    return {**config, "trainer": trainer}


def needs_reference(path: str) -> bool:
    with open(path) as f:
        return "ReferenceModel" in f.read()


def newest_model(run_dir: str) -> str | None:
    """The newest exported ``hf_model`` under a run directory."""
    found = glob.glob(os.path.join(run_dir, "**", "hf_model", "config.json"), recursive=True)
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


# ---------------------------------------------------------------------------------------------------- runs
def run(cmd: list[str], run_dir: str, dry_run: bool) -> None:
    """Runs ``cmd`` with its output in ``<run_dir>/log.txt``; a failure stops the comparison with one line."""
    print("$ " + shlex.join(cmd), flush=True)
    if dry_run:
        return
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "log.txt")
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        text = open(log, errors="replace").read()
        tail = text.strip().splitlines()[-1:] or [""]
        if "No space left on device" in text:
            tail = [f"no space left on device ({free_gib(run_dir):.1f} GiB free under {run_dir}); free some, then repeat "
                    "the command: finished runs are kept"]
        sys.exit(f"error: run {run_dir} failed (exit {code}): {tail[0]}\n  full log: {log}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def free_gib(path: str) -> float:
    return shutil.disk_usage(path).free / 2**30


def portable(cmd: list[str]) -> str:
    """The command as a user would type it from the repository root (recorded in ``done.json``)."""
    def one(arg: str) -> str:
        if arg == sys.executable:
            return "python"
        key, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
        return key + eq + (os.path.relpath(value, ROOT) if os.path.isabs(value) else value)

    return shlex.join([one(c) for c in cmd])


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
    }


# ---------------------------------------------------------------------------------------------------- reports
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def aggregate(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per method: means over seeds, the held-out loss's and exact match's std, and the step time relative to full."""
    rows: dict[str, dict[str, Any]] = {}
    for method, seeds in results.items():
        runs = list(seeds.values())
        mean = lambda k: statistics.fmean([r[k] for r in runs if r[k] is not None]) if any(r[k] is not None for r in runs) else None
        acc = [r["accuracy_after"] for r in runs if r["accuracy_after"] is not None]
        val = [r["val_loss"] for r in runs if r["val_loss"] is not None]
        rows[method] = {
            "kept_fraction": mean("kept_fraction") if mean("kept_fraction") is not None else (1.0 if method == "full" else None),
            "noise_dropped": mean("noise_dropped"),
            "clean_kept": mean("clean_kept"),
            "train_loss": mean("train_loss"),
            "val_loss": mean("val_loss"),
            "val_std": statistics.stdev(val) if len(val) > 1 else None,
            "acc_mean": statistics.fmean(acc) if acc else None,
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0 if acc else None,
            "n": len(acc),
            "step_time": mean("step_time"),
        }
    if "full" in rows and any(r["noise_dropped"] is not None for r in rows.values()):
        rows["full"].update(noise_dropped=0.0, clean_kept=1.0)  # full SFT keeps every token, noise included
    # Step time relative to full SFT of the same seed (the runs of one seed ran back to back), median over seeds:
    # runs of different sessions may have shared the machine with other work.
    full = results.get("full", {})
    for method, row in rows.items():
        ratios = [r["step_time"] / full[s]["step_time"] for s, r in results[method].items()
                  if r["step_time"] and s in full and full[s]["step_time"]]
        row["time_ratio"] = statistics.median(ratios) if ratios else None
    return rows


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | kept fraction | noise dropped | clean kept | final train loss (kept tokens) | held-out loss | exact match | step time vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in rows.items():
        acc = "—" if r["acc_mean"] is None else f"{100 * r['acc_mean']:.1f}% ± {100 * r['acc_std']:.1f} (n={r['n']})"
        ratio = "—" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}×"
        val = _fmt(r["val_loss"]) + ("" if r.get("val_std") is None else f" ± {r['val_std']:.3f}")
        lines.append(
            f"| {method} | {_fmt(r['kept_fraction'])} | {_fmt(r['noise_dropped'])} | {_fmt(r['clean_kept'])} | "
            f"{_fmt(r['train_loss'])} | {val} | {acc} | {ratio} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    colors = plt.get_cmap("tab20").colors if len(results) > 10 else plt.get_cmap("tab10").colors
    styles = ["-", "--", "-.", ":"]
    for i, (method, seeds) in enumerate(results.items()):
        curves = [dict(r["val_curve"]) for r in seeds.values() if r["val_curve"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        color = colors[(2 * i if i < 10 else 2 * (i - 10) + 1) % 20] if len(colors) == 20 else colors[i % len(colors)]
        ax.plot(steps, [statistics.fmean(v) for v in values], marker="osD^v<>ph*"[i % 10], linestyle=styles[i % 4],
                color=color, label=method)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15, color=color)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (all response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # outside: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_samples(run_dir: str) -> list[dict]:
    files = glob.glob(os.path.join(run_dir, "**", "selection_samples.jsonl"), recursive=True)
    if not files:
        return []
    with open(max(files, key=os.path.getmtime), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pick_samples(per_method: dict[str, list[dict]], count: int) -> list[tuple[int, int]]:
    """(step, index) pairs logged by every selective method, samples with injected noise first."""
    logged = [m for m, s in per_method.items() if s]
    if not logged:
        return []
    keys = set.intersection(*({(s["step"], s["index"]) for s in per_method[m]} for m in logged))
    first = per_method[logged[0]]
    noisy = {(s["step"], s["index"]) for s in first if s.get("noise") and any(s["noise"])}
    return sorted(keys, key=lambda k: (k not in noisy, k))[:count]


KINDS = ("end of turn", "answer marker", "digits", "words", "other")


def token_kind(token: str) -> str:
    """A response token's kind, for the kept-by-kind table."""
    t = token.strip()
    if t.startswith("<|") and t.endswith("|>") or t in ("</s>", "<eos>", "<|endoftext|>"):
        return "end of turn"
    if t and set(t) <= {"#"}:
        return "answer marker"
    if t and t.isdigit():
        return "digits"
    if t and t.isalpha():
        return "words"
    return "other"


def kept_by_kind(samples: list[dict]) -> dict[str, tuple[float | None, int]]:
    """Share of the *clean* response tokens of each kind that a method kept, over its logged samples, and how many
    tokens of that kind there were."""
    kept = {k: [0, 0] for k in KINDS}
    for s in samples:
        noise = s.get("noise") or [0] * len(s["tokens"])
        for tok, k, n in zip(s["tokens"], s["kept"], noise):
            if not n:
                kept[token_kind(tok)][0] += k
                kept[token_kind(tok)][1] += 1
    return {k: (a / b if b else None, b) for k, (a, b) in kept.items()}


def kinds_table(per_method: dict[str, list[dict]]) -> str:
    rows = {m: kept_by_kind(s) for m, s in per_method.items() if s}
    if not rows:
        return ""
    counts = next(iter(rows.values()))
    lines = ["| method | " + " | ".join(f"{k} (n={counts[k][1]})" for k in KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for method, r in rows.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(r[k][0], ".2f") for k in KINDS) + " |")
    return "\n".join(lines)


def render_tokens(tokens: list[str], kept: list[int], noise: list[int] | None) -> str:
    spans = []
    for i, tok in enumerate(tokens):
        classes = ["kept" if kept[i] else "dropped"] + (["noise"] if noise and noise[i] else [])
        text = html.escape(tok).replace("\n", "↵<br>")
        spans.append(f'<span class="{" ".join(classes)}">{text}</span>')
    return "".join(spans)


def samples_html(per_method: dict[str, list[dict]], methods: list[str], count: int, title: str) -> str:
    """``per_method``: the logged samples of each *finished* run (empty for a method that selects nothing, which keeps
    every token); a method not in it (not run yet) gets no row."""
    methods = [m for m in methods if m in per_method]
    picked = pick_samples(per_method, count)
    has_noise = any(any(s.get("noise") or []) for samples in per_method.values() for s in samples)
    style = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin-bottom: 1.5em; }
.row { display: grid; grid-template-columns: 11em 1fr; gap: 0.8em; padding: 0.35em 0; border-top: 1px solid #eee; }
.method { font-weight: 600; overflow-wrap: anywhere; }
.tokens { font-family: ui-monospace, monospace; font-size: 0.9em; line-height: 1.7; white-space: pre-wrap; }
.kept { color: #111; }
.dropped { color: #aaa; text-decoration: line-through; }
.noise { background: #ffd8b0; border-bottom: 2px solid #e8590c; }
.legend span { margin-right: 1.5em; padding: 0 0.3em; }
"""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p class='legend'>Legend: <span class='kept tokens'>kept token</span><span class='dropped tokens'>dropped token</span>"
             + ("<span class='noise tokens'>injected noise (ground truth)</span>" if has_noise else "")
             + " — the same training samples at the same step for every method.</p>"]
    if not picked:
        parts.append("<p>No run logged selection samples (selection_samples.jsonl): nothing to show.</p>")
    for step, index in picked:
        parts.append(f"<div class='sample'><div><b>training sample {index}</b>, step {step}</div>")
        base = next(s for m in methods for s in per_method.get(m, []) if (s["step"], s["index"]) == (step, index))
        for method in methods:
            line = next((s for s in per_method.get(method, []) if (s["step"], s["index"]) == (step, index)), None)
            if line is None and per_method.get(method):
                continue
            kept = line["kept"] if line else [1] * len(base["tokens"])  # full SFT keeps every token
            parts.append(f"<div class='row'><div class='method'>{html.escape(method)}</div><div class='tokens'>"
                         f"{render_tokens(base['tokens'], kept, base.get('noise'))}</div></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the model/data config (e.g. configs/quickstart.yaml)")
    parser.add_argument("--methods", nargs="+", required=True, help="names of configs/methods/*.yaml, or paths of method configs of your own (*.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", required=True, help="output folder (reused: finished runs are kept)")
    parser.add_argument("--max-steps", type=int, help="override trainer.max_steps for every run")
    parser.add_argument("--extra", default="", help="more `fit` arguments for every run, e.g. noise levels; a single one as --extra=\"--data.x=1\"")
    parser.add_argument("--reference-args", default=REFERENCE_ARGS, help=f"`fit` arguments of the reference run (default: {REFERENCE_ARGS})")
    parser.add_argument("--log-samples-every", type=int, default=10, help="log selection samples every N steps")
    parser.add_argument("--html-samples", type=int, default=4, help="training samples shown in samples.html")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's Lightning checkpoint (default: none is written; the exported hf_model is)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the finished runs only (while a comparison is still running)")
    args = parser.parse_args(argv)
    files = {method_name(m): method_file(m) for m in args.methods}
    if len(files) < len(args.methods):
        sys.exit(f"error: --methods names a method twice: {' '.join(args.methods)}")
    args.methods = list(files)

    out = os.path.abspath(args.out)
    config = os.path.abspath(args.config)
    base = [sys.executable, "-m", "sstoken_pl", "fit", "--config", config]
    no_ckpt = [] if args.keep_checkpoints else ["--trainer.enable_checkpointing=false"]
    steps = [f"--trainer.max_steps={args.max_steps}"] if args.max_steps else []
    extra = shlex.split(args.extra)
    os.makedirs(os.path.join(out, "configs"), exist_ok=True)

    reference = None
    if any(needs_reference(f) for f in files.values()) and not args.report_only:
        ref_dir = os.path.join(out, "reference")
        if os.path.isfile(os.path.join(ref_dir, "done.json")) and newest_model(ref_dir):
            print(f"reference: reusing {ref_dir}")
        else:
            cmd = base + ["--trainer.callbacks=[]", "--seed_everything=0", f"--trainer.default_root_dir={ref_dir}",
                          "--eval.num_problems=0"] + no_ckpt + steps + extra + shlex.split(args.reference_args)
            run(cmd, ref_dir, args.dry_run)
            if not args.dry_run:
                json.dump({"command": portable(cmd)}, open(os.path.join(ref_dir, "done.json"), "w"))
        reference = newest_model(ref_dir) or ref_dir

    results: dict[str, dict[int, dict]] = {}
    first = True
    for seed in args.seeds:
        for method in args.methods:
            run_dir = os.path.join(out, "runs", method, f"seed{seed}")
            done = os.path.join(run_dir, "done.json")
            if os.path.isfile(done):
                print(f"{method} seed {seed}: reusing {run_dir}")
                results.setdefault(method, {})[seed] = json.load(open(done))["summary"]
                first = False
                continue
            if args.report_only:
                print(f"{method} seed {seed}: not run yet")
                continue
            cfg_path = os.path.join(out, "configs", f"{method}_seed{seed}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(method_config(files[method], seed, run_dir, reference, args.log_samples_every), f, sort_keys=False)
            cmd = base + ["--trainer.callbacks=[]", "--config", cfg_path, f"--seed_everything={seed}",
                          f"--trainer.default_root_dir={run_dir}", f"--eval.before={'true' if first else 'false'}"] + no_ckpt + steps + extra
            run(cmd, run_dir, args.dry_run)
            first = False
            if args.dry_run:
                continue
            summary = summarise(read_metrics(run_dir))
            json.dump({"command": portable(cmd), "summary": summary}, open(done, "w"))
            results.setdefault(method, {})[seed] = summary
    if args.dry_run:
        return

    rows = aggregate(results)
    finished, expected = sum(map(len, results.values())), len(args.seeds) * len(args.methods)
    before = next((r["accuracy_before"] for s in results.values() for r in s.values() if r["accuracy_before"] is not None), None)
    title = f"{os.path.relpath(config, ROOT)}: {', '.join(args.methods)}"
    header = [
        f"# Token selection compared: {os.path.relpath(config, ROOT)}",
        "",
        *([f"- **partial report**: {finished} of {expected} runs finished"] if finished < expected else []),
        f"- seeds: {' '.join(map(str, args.seeds))}; extra arguments: `{args.extra or '—'}`; max steps: {args.max_steps or 'from the config'}",
        f"- answer exact match of the base model before training: {_fmt(before and 100 * before, '.1f')}%",
        f"- command: `python tools/compare.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "",
    ]
    per_method = {m: read_samples(os.path.join(out, "runs", m, f"seed{args.seeds[0]}")) for m in args.methods if m in results}
    kinds = kinds_table(per_method)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(header) + markdown_table(rows) + "\n")
        if kinds:
            f.write(f"\nShare of the clean response tokens of each kind kept (the samples logged every "
                    f"{args.log_samples_every} steps, seed {args.seeds[0]}):\n\n{kinds}\n")
    json.dump({"rows": rows, "runs": results}, open(os.path.join(out, "results.json"), "w"), indent=1)
    plot(results, os.path.join(out, "val_loss.png"), f"Held-out loss, {os.path.relpath(config, ROOT)}, seeds {' '.join(map(str, args.seeds))}")
    with open(os.path.join(out, "samples.html"), "w", encoding="utf-8") as f:
        f.write(samples_html(per_method, args.methods, args.html_samples, title))
    print("\n" + markdown_table(rows) + ("\n\n" + kinds if kinds else ""))
    print(f"\nwritten: {out}/results.md, results.json, val_loss.png, samples.html")


if __name__ == "__main__":
    main()
