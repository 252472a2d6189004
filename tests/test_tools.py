"""The tools in ``tools/`` as a user runs them: the benchmark and the run inspector."""

import os
import re
import subprocess
import sys

from tests.test_cli import ROOT, cli


def tool(name, *args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", name), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_bench_reports_step_time_and_memory_ratios():
    out = tool("bench.py", "--lengths", "48", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--rounds", "1",
               "--methods", "full", "sstoken", "sstoken_cached", "authors", "sstoken_fused")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^\| (full|sstoken|sstoken_cached|authors|sstoken_fused) \| [0-9.]+ \| ([0-9.]+)× \|", out.stdout,
                           flags=re.M))
    assert set(rows) == {"full", "sstoken", "sstoken_cached", "authors", "sstoken_fused"}, out.stdout
    assert float(rows["full"]) == 1.0
    ratios = dict(re.findall(r"^(sstoken/full step-time|sstoken/full peak-memory|authors/sstoken step-time) ratio: ([0-9.]+)$",
                             out.stdout, flags=re.M))
    assert len(ratios) == 3 and all(float(v) > 0 for v in ratios.values()), out.stdout
    assert re.search(r"history cache: [1-9]\d* hits", out.stdout), "the cached row is served from the cache"


def test_inspect_run_summarises_selection_and_samples(tmp_path):
    fit = cli(
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/methods/sstoken.yaml",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.callbacks.log_samples_every=1", "--model.export=false",
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    out = tool("inspect_run.py", str(tmp_path), "--samples", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    kept = re.search(r"^selection/kept_fraction\s+(\d+)\s+([0-9.]+)", out.stdout, flags=re.M)
    assert kept and int(kept.group(1)) == 2 and 0.55 < float(kept.group(2)) < 0.75, out.stdout
    assert "selection/rel_mean" in out.stdout and "selection/attn_mean" in out.stdout
    assert "step 2" in out.stdout and "[-" in out.stdout, "a decoded sample with dropped tokens marked"


def test_inspect_run_without_logs_is_one_clear_error(tmp_path):
    out = tool("inspect_run.py", str(tmp_path))
    assert out.returncode != 0 and "error: no TensorBoard events or metrics.csv" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_arithmetic_counts_answer_lines_and_right_equations(tmp_path):
    import json

    rows = [
        {"output": "The bags hold 8 * 2 = 16 shells. Then 16 + 9 = 25.\n#### 25", "correct": True},
        {"output": "So 6 * 9 = 56 and 2 x 4 x 5 = 40, 75% = 6.", "correct": False},  # one equation, wrong
        {"output": "No numbers here.", "correct": False},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tool("check_arithmetic.py", str(path))
    assert out.returncode == 0, out.stderr
    assert f"| {path} | 3 | 33.3% | 33.3% | 3 | 66.7% |" in out.stdout
    path.write_text(json.dumps(rows[0]) + "\n{\"output\": 1\n")
    bad = tool("check_arithmetic.py", str(path))
    assert bad.returncode == 2 and f"{path} line 2" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_packing_reports_shares_and_throughput_ratios():
    """The tiny model on the built-in task at max_length 1024 (its ~230-token samples pack 4 to a row)."""
    out = tool("bench_packing.py", "--config", "configs/tiny.yaml", "--datasets", "builtin", "--methods", "full",
               "--max-length", "1024", "--steps", "1", "--warmup", "1", "--rounds", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    padded, packed, share = re.search(r"builtin: 256 samples: padded batches ([0-9.]+)% padding; with packing ([0-9.]+)% "
                                      r"\(([0-9]+)% of the batches packed\)", out.stdout).groups()
    assert float(packed) < float(padded) and int(share) > 50, out.stdout
    assert re.search(r"^builtin full packed/padded tokens/s: [0-9.]+$", out.stdout, flags=re.M), out.stdout
