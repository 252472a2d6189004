"""The report of ``tools/compare.py``: the table (``aggregate``, ``markdown_table``), the plots (``plot``:
held-out loss against step; ``target_vs_retention``: the exact-match gain against the general NLL Δ) and
``samples.html`` (``samples_html``, with the kept-by-kind table)."""

from __future__ import annotations

import glob
import html
import json
import os
import statistics
from typing import Any

FULL_CLEAN = "full+clean"  # full SFT on the noisy data with the reference's clean subset mixed in
REFERENCE_ROW = "reference (clean subset)"  # the reference model itself, evaluated like every method
KEEP_ALL = ("full", FULL_CLEAN, REFERENCE_ROW)  # rows that train on every response token
RETENTION = (("general_delta", "general NLL Δ"), ("other_delta", "other-domain NLL Δ"))


# ---------------------------------------------------------------------------------------------------- reports
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def aggregate(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per method: means over seeds, the std of the held-out loss, exact match and retention measures (``*_std``;
    None with one seed), and the step time relative to full SFT of the same seed. A run's retention measure may be
    missing (``general_delta``/``other_delta`` absent or None): the mean is over the runs that have it."""
    rows: dict[str, dict[str, Any]] = {}
    for method, seeds in results.items():
        runs = list(seeds.values())
        have = lambda k: [r[k] for r in runs if r.get(k) is not None]
        mean = lambda k: statistics.fmean(have(k)) if have(k) else None
        acc = have("accuracy_after")
        rows[method] = {
            "kept_fraction": mean("kept_fraction") if mean("kept_fraction") is not None else (1.0 if method in KEEP_ALL else None),
            "noise_dropped": mean("noise_dropped"),
            "clean_kept": mean("clean_kept"),
            "train_loss": mean("train_loss"),
            "val_loss": mean("val_loss"),
            "val_std": _spread(have("val_loss")),
            "acc_mean": statistics.fmean(acc) if acc else None,
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0 if acc else None,
            "n": len(acc),
            "step_time": mean("step_time"),
        }
        for key, _ in RETENTION:
            rows[method].update({key: mean(key), f"{key}_std": _spread(have(key)), f"{key}_n": len(have(key))})
    if any(r["noise_dropped"] is not None for r in rows.values()):
        for method in ("full", FULL_CLEAN):  # full SFT keeps every token, noise included
            if method in rows:
                rows[method].update(noise_dropped=0.0, clean_kept=1.0)
    # Step time relative to full SFT of the same seed (the runs of one seed ran back to back), median over seeds:
    # runs of different sessions may have shared the machine with other work.
    full = results.get("full", {})
    for method, row in rows.items():
        ratios = [r["step_time"] / full[s]["step_time"] for s, r in results[method].items()
                  if r["step_time"] and s in full and full[s]["step_time"]]
        row["time_ratio"] = statistics.median(ratios) if ratios else None
    return rows


def _delta(row: dict[str, Any], key: str) -> str:
    """A retention Δ with its sign (positive: forgot) and its std over seeds."""
    if row.get(key) is None:
        return "—"
    std = row.get(f"{key}_std")
    return f"{row[key]:+.3f}" + ("" if std is None else f" ± {std:.3f}")


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | kept fraction | noise dropped | clean kept | final train loss (kept tokens) | held-out loss | exact match "
        "| step time vs full | " + " | ".join(label for _, label in RETENTION) + " |",
        "|---" * (8 + len(RETENTION)) + "|",
    ]
    for method, r in rows.items():
        acc = "—" if r["acc_mean"] is None else f"{100 * r['acc_mean']:.1f}% ± {100 * r['acc_std']:.1f} (n={r['n']})"
        ratio = "—" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}×"
        val = _fmt(r["val_loss"]) + ("" if r.get("val_std") is None else f" ± {r['val_std']:.3f}")
        lines.append(
            f"| {method} | {_fmt(r['kept_fraction'])} | {_fmt(r['noise_dropped'])} | {_fmt(r['clean_kept'])} | "
            f"{_fmt(r['train_loss'])} | {val} | {acc} | {ratio} | " + " | ".join(_delta(r, k) for k, _ in RETENTION) + " |"
        )
    return "\n".join(lines)


def palette(plt: Any, n: int, i: int) -> Any:
    """The colour of item ``i`` of ``n``: tab10's, and beyond 10 items tab20's dark shades, then its light ones, so
    that no two items of a plot share a colour up to 20."""
    if n <= 10:
        return plt.get_cmap("tab10").colors[i % 10]
    return plt.get_cmap("tab20").colors[(2 * i if i < 10 else 2 * (i - 10) + 1) % 20]


def _final_loss_bars(ax: Any, results: dict[str, dict[int, dict]], colors: Any) -> None:
    """The held-out loss of each method as a bar (mean over seeds, whiskers: min–max), for runs that logged it once."""
    names, means, lows, highs = [], [], [], []
    for method, seeds in results.items():
        values = [r["val_curve"][-1][1] for r in seeds.values() if r["val_curve"]]
        if values:
            names.append(method)
            means.append(statistics.fmean(values))
            lows.append(means[-1] - min(values))
            highs.append(max(values) - means[-1])
    ax.bar(range(len(names)), means, yerr=[lows, highs], capsize=4, color=[colors[i % len(colors)] for i in range(len(names))])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("held-out loss (all response tokens), the one logged value")
    ax.grid(alpha=0.3, axis="y")
    if not names:
        ax.text(0.5, 0.5, "no held-out loss was logged (trainer.val_check_interval beyond the run's steps?)",
                ha="center", va="center", transform=ax.transAxes)


def plot(results: dict[str, dict[int, dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    colors = [palette(plt, len(results), i) for i in range(len(results))]
    styles = ["-", "--", "-.", ":"]
    if max((len(r["val_curve"]) for seeds in results.values() for r in seeds.values()), default=0) <= 1:
        _final_loss_bars(ax, results, colors)  # one logged step: a line of one point is a dot on an empty axis
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    for i, (method, seeds) in enumerate(results.items()):
        curves = [dict(r["val_curve"]) for r in seeds.values() if r["val_curve"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        color = colors[i]
        ax.plot(steps, [statistics.fmean(v) for v in values], marker="osD^v<>ph*"[i % 10], linestyle=styles[i % 4],
                color=color, label=method)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15, color=color)
    ax.set_xlabel("optimizer steps done")
    ax.set_ylabel("held-out loss (all response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # outside: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def target_vs_retention(rows: dict[str, dict[str, Any]], before: float | None, path: str, title: str) -> list[str]:
    """The scatter plot of what each method gained on the target task against what it forgot: x = exact-match gain
    (points: the method's exact match − the base model's), y = general NLL Δ (positive: forgot), one point per method
    (mean over seeds; error bars: the std over seeds). Returns a note per method left out (no exact match, no
    retention measure, or no base-model exact match to compare with), also written under the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, notes = [], []
    for method, r in rows.items():
        missing = [what for what, ok in (("exact match", r.get("acc_mean") is not None),
                                         ("general NLL Δ", r.get("general_delta") is not None)) if not ok]
        if missing or before is None:
            why = f"no {' and no '.join(missing)}" if missing else "no base-model exact match to compare with"
            notes.append(f"{method}: left out ({why})")
            continue
        xerr = 100 * r["acc_std"] if r.get("n", 0) > 1 else 0.0
        points.append((method, 100 * (r["acc_mean"] - before), xerr, r["general_delta"], r.get("general_delta_std") or 0.0))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = [palette(plt, len(points), i) for i in range(len(points))]
    for i, (method, x, xerr, y, yerr) in enumerate(points):
        ax.errorbar([x], [y], xerr=[xerr], yerr=[yerr], fmt="osD^v<>ph*"[i % 10], color=colors[i], capsize=4, markersize=7)
    place_labels(fig, ax, [(method, x, y, colors[i]) for i, (method, x, _, y, _) in enumerate(points)])
    if not points:
        ax.text(0.5, 0.5, "no method has both an exact match and a general NLL Δ", ha="center", va="center",
                transform=ax.transAxes)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("target gain: exact-match gain over the base model (points)")
    ax.set_ylabel("general NLL Δ, after − base (positive: forgot)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", color="#555")
        fig.subplots_adjust(bottom=0.12 + 0.03 * len(notes))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return notes


LABEL_OFFSETS = [(7, 6, "left"), (7, -14, "left"), (-7, 6, "right"), (-7, -14, "right"), (7, 20, "left"),
                 (7, -28, "left"), (-7, 20, "right"), (-7, -28, "right"), (7, 34, "left"), (7, -42, "left")]


def place_labels(fig, ax, labels: list[tuple[str, float, float, Any]]) -> list[tuple[float, float]]:
    """Names each point beside it, at the first offset of ``LABEL_OFFSETS`` where the name overlaps no name placed
    before it and no other point's marker (close points — e.g. two methods with the same scores — get their names apart, not on top of each
    other) and stays inside the axes (a point at the right edge is named on its left). Returns the offsets (points) used."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    r = 6 * fig.dpi / 72  # a marker's half-width, in pixels
    markers = [Bbox.from_extents(px - r, py - r, px + r, py + r)
               for px, py in (ax.transData.transform((x, y)) for _, x, y, _ in labels)]
    frame = ax.get_window_extent(renderer)
    placed, used = [], []
    for i, (name, x, y, color) in enumerate(labels):
        others = placed + markers[:i] + markers[i + 1:]
        for dx, dy, ha in LABEL_OFFSETS:
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8, color=color)
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in others):
                break
            text.remove()
        else:  # every offset overlaps: keep the first
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=LABEL_OFFSETS[0][:2], fontsize=8, color=color)
            box, (dx, dy, _) = text.get_window_extent(renderer), LABEL_OFFSETS[0]
        placed.append(box)
        used.append((dx, dy))
    return used


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
        parts.append(f"<div class='sample'><div><b>training sample {index}</b>, in optimizer step {step} (of the plot's steps done)</div>")
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


def write_report(args: Any, out: str, config: str, command: str, results: dict[str, dict[int, dict]],
                 per_method: dict[str, list[dict]]) -> None:
    """results.md, results.json, val_loss.png, target_vs_retention.png and samples.html in ``out``, from the runs'
    numbers (``results``: method → seed → summary) and the first seed's logged selection samples (``per_method``);
    ``args``: the options of ``tools/compare.py``, ``config`` the config's name, ``command`` the command line."""
    rows = aggregate(results)
    finished = sum(len(s) for m, s in results.items() if m != REFERENCE_ROW)
    expected = len(args.seeds) * len(args.methods)
    before = next((r["accuracy_before"] for s in results.values() for r in s.values() if r["accuracy_before"] is not None),
                  getattr(args, "base_accuracy", None))  # else from a finished run of a method not listed
    title = f"{config}: {', '.join(args.methods)}"
    order = "each seed S also shuffles the training data (data.seed=S)" if args.data_order_seeds else "the config's data order for every seed"
    header = [
        f"# Token selection compared: {config}",
        "",
        *([f"- **partial report**: {finished} of {expected} runs finished"] if finished < expected else []),
        f"- seeds: {' '.join(map(str, args.seeds))} ({order}); extra arguments: `{args.extra or '—'}`; max steps: {args.max_steps or 'from the config'}",
        (f"- answer exact match of the base model before training: {_fmt(100 * before, '.1f')}%" if before is not None else
         "- answer exact match of the base model before training: not measured (no finished run evaluated it)"),
        *([f"- `{REFERENCE_ROW}`: the reference model (one run, seed 0, `{args.reference_args}`; a `data.max_samples` there "
           f"also limits its held-out records); `{FULL_CLEAN}`: full SFT on the noisy data with that clean subset mixed in"] if REFERENCE_ROW in results or FULL_CLEAN in results else []),
        "- general / other-domain NLL Δ: after − base on the retention texts (positive: forgot), from each run's `retention.json`",
        *([f"- step time: up to {args.shared_runs} runs shared the machine at once (`parallel_runs` in their `done.json`): "
           "the step-time column is not a cost"]
          if getattr(args, "shared_runs", 1) > 1 else []),
        f"- command: `{command}`",
        "",
        "",
    ]
    kinds = kinds_table(per_method)
    scatter_title = f"Target gain vs. retention, {config}, seeds {' '.join(map(str, args.seeds))}"
    notes = target_vs_retention(rows, before, os.path.join(out, "target_vs_retention.png"), scatter_title)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(header) + markdown_table(rows) + "\n")
        f.write("\n`target_vs_retention.png`: exact-match gain over the base model against general NLL Δ (mean ± std over seeds)"
                + ("; " + "; ".join(notes) if notes else "") + ".\n")
        if kinds:
            f.write(f"\nShare of the clean response tokens of each kind kept (the samples logged every "
                    f"{args.log_samples_every} steps, seed {args.seeds[0]}):\n\n{kinds}\n")
    json.dump({"rows": rows, "runs": results, "data_order_seeds": args.data_order_seeds},
              open(os.path.join(out, "results.json"), "w"), indent=1)
    plot(results, os.path.join(out, "val_loss.png"), f"Held-out loss, {config}, seeds {' '.join(map(str, args.seeds))}")
    with open(os.path.join(out, "samples.html"), "w", encoding="utf-8") as f:
        f.write(samples_html(per_method, args.methods, args.html_samples, title))
    print("\n" + markdown_table(rows) + ("\n\n" + kinds if kinds else ""))
    print(f"\nwritten: {out}/results.md, results.json, val_loss.png, target_vs_retention.png, samples.html")
