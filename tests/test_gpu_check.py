"""tools/gpu_check.py in its CPU dry mode: the checks a CPU can run pass, the GPU-only ones say why they skip."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_one_table():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run", "--smollm2", "off"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| check")}
    assert set(rows) == {"bf16", "fsdp1", "fsdp2", "deepspeed2", "deepspeed3", "liger", "cce", "packing", "bench"}
    assert rows["bf16"] == rows["fsdp2"] == rows["packing"] == rows["bench"] == "ok", rows
    for gpu_only in ("fsdp1", "deepspeed2", "deepspeed3", "liger", "cce"):
        assert rows[gpu_only].startswith("skipped: needs CUDA"), rows
    assert "REL ≡ 0 at step 0" in out.stdout and "sstoken/full ×" in out.stdout
    assert "packed = alone" in out.stdout and "sdpa" in out.stdout and "eager" in out.stdout


def test_without_cuda_and_without_dry_run_it_says_so():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--checks", "bf16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device here; --dry-run" in out.stderr
