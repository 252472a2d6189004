"""``tools/compare.py``'s processes: each run a ``python -m sstoken_pl fit`` subprocess with its output in its
``log.txt``, several at once with ``--jobs``; a failure is one line naming the run's log."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable

from compare_configs import ROOT


def run(cmd: list[str], run_dir: str, dry_run: bool) -> None:
    """Runs ``cmd`` with its output in ``<run_dir>/log.txt``; a failure stops the comparison with one line."""
    run_many([(cmd, run_dir, None)], 1, dry_run)


def _start(cmd: list[str], run_dir: str, env: dict[str, str] | None):
    print("$ " + shlex.join(cmd), flush=True)
    os.makedirs(run_dir, exist_ok=True)
    log = open(os.path.join(run_dir, "log.txt"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env), log, time.time()


def _failure(run_dir: str, code: int) -> str:
    log = os.path.join(run_dir, "log.txt")
    text = open(log, errors="replace").read()
    tail = text.strip().splitlines()[-1:] or [""]
    if "No space left on device" in text:
        tail = [f"no space left on device ({free_gib(run_dir):.1f} GiB free under {run_dir}); free some, then repeat "
                "the command: finished runs are kept"]
    return f"error: run {run_dir} failed (exit {code}): {tail[0]}\n  full log: {log}"


def run_many(jobs: list[tuple[list[str] | Callable[[], list[str]], str, Callable[[list[str]], None] | None]], parallel: int,
             dry_run: bool) -> None:
    """Runs each ``(cmd, run_dir, on_done)`` of ``jobs`` in order (``cmd``: a list, or a function giving it when the run
    starts), at most ``parallel`` at once, each with its output in
    ``<run_dir>/log.txt``; ``on_done(cmd)`` after each run that succeeds. With ``parallel`` > 1 each run gets
    ``cores // parallel`` CPU threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) unless the environment sets
    ``OMP_NUM_THREADS``. A failed run starts no further one; the runs already running finish (and are recorded),
    then the comparison stops with one line per failed run."""
    env = None
    if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = str(max(1, (os.cpu_count() or 1) // parallel))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel and not failed:
            cmd, run_dir, on_done = pending.pop(0)
            cmd = cmd() if callable(cmd) else cmd
            if dry_run:
                print("$ " + shlex.join(cmd), flush=True)
                continue
            running.append((*_start(cmd, run_dir, env), run_dir, on_done, cmd))
        for job in list(running):
            proc, log, start, run_dir, on_done, cmd = job
            code = proc.poll()
            if code is None:
                continue
            log.close()
            running.remove(job)
            if code != 0:
                failed.append(_failure(run_dir, code))
                continue
            print(f"  done in {time.time() - start:.0f} s" + (f": {run_dir}" if parallel > 1 else ""), flush=True)
            if on_done is not None:
                on_done(cmd)
        if failed and not running:
            break
        if running:
            time.sleep(0.2)
    if failed:
        sys.exit("\n".join(failed))


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
