"""Summarise a run's logged metrics (TensorBoard or CSV logs): selection statistics, losses, answer accuracy.

    python tools/inspect_run.py runs/quickstart/lightning_logs/version_0
    python tools/inspect_run.py runs/quickstart            # the newest version under it

Prints, for each scalar, its first, last and mean value over the logged steps, and the decoded samples (dropped
tokens marked ``[-like this-]``) that ``TokenSelection(log_samples_every=N)`` wrote.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics
import sys


def newest_version(path: str) -> str:
    versions = sorted(glob.glob(os.path.join(path, "**", "version_*"), recursive=True), key=os.path.getmtime)
    return versions[-1] if versions else path


def read_scalars(run: str) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    samples: list[str] = []
    events = glob.glob(os.path.join(run, "events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(run, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags().get("tensors", []):
            if tag.startswith("selection/samples"):
                for e in acc.Tensors(tag):
                    samples.append(e.tensor_proto.string_val[0].decode("utf-8").replace("  \n", "\n"))
    metrics_csv = os.path.join(run, "metrics.csv")
    if os.path.isfile(metrics_csv):
        with open(metrics_csv, newline="") as f:
            for row in csv.DictReader(f):
                step = int(row.get("step") or 0)
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        scalars.setdefault(key, []).append((step, float(value)))
    text = os.path.join(run, "selection_samples.txt")
    if os.path.isfile(text):
        samples += open(text, encoding="utf-8").read().strip().split("\n\n")
    return scalars, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a version directory, or a folder holding them (the newest is taken)")
    parser.add_argument("--samples", type=int, default=1, help="decoded samples to print (the last ones)")
    args = parser.parse_args()
    run = newest_version(args.run)
    scalars, samples = read_scalars(run)
    if not scalars:
        sys.exit(f"error: no TensorBoard events or metrics.csv under {run}")
    print(f"run: {run}")
    print(f"{'metric':<28}{'steps':>6}{'first':>10}{'last':>10}{'mean':>10}")
    for tag in sorted(scalars):
        values = [v for _, v in scalars[tag]]
        print(f"{tag:<28}{len(values):>6}{values[0]:>10.4f}{values[-1]:>10.4f}{statistics.fmean(values):>10.4f}")
    for sample in samples[-args.samples :] if args.samples else []:
        print("\n" + sample)


if __name__ == "__main__":
    main()
