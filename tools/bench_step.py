"""Step time of each selection method against full SFT, as ratios measured in one run.

    python tools/bench_step.py                                   # tiny.yaml: full vs sstoken vs its ablations
    python tools/bench_step.py --config configs/quickstart.yaml --steps 4 --methods full sstoken

Each method runs the same model/data config composed with ``configs/methods/<method>.yaml``; runs are interleaved
over ``--repeats`` rounds so that drift of the machine hits every method alike. The first ``--warmup`` steps of each
run are not timed. Reported: median seconds per optimizer step and the ratio to ``full``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import lightning.pytorch as pl
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t0)


def run_once(config: str, method: str, steps: int, warmup: int) -> list[float]:
    from sstoken_pl.cli import SSTokenCLI
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    args = [
        "--config", config,
        "--trainer.callbacks=[]",  # the method config alone decides the selection callbacks
        "--config", os.path.join(ROOT, "configs", "methods", f"{method}.yaml"),
        f"--trainer.max_steps={steps + warmup}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--model.export=false",
        "--eval.num_problems=0",
    ]
    cli = SSTokenCLI(SFTModule, SFTDataModule, args=args, run=False, save_config_callback=None)
    timer = StepTimer(warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    parser.add_argument("--methods", nargs="+", default=["full", "sstoken", "attn_only", "rel_only"])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    args = parser.parse_args()
    if "full" not in args.methods:
        args.methods.insert(0, "full")

    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            times[method] += run_once(args.config, method, args.steps, args.warmup)

    base = statistics.median(times["full"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nstep time on {device}, config {os.path.relpath(args.config, ROOT)}, "
          f"{args.repeats}×{args.steps} timed steps per method")
    print(f"{'method':<18}{'median s/step':>14}{'vs full':>10}")
    for method in args.methods:
        med = statistics.median(times[method])
        print(f"{method:<18}{med:>14.4f}{med / base:>9.2f}x")


if __name__ == "__main__":
    main()
