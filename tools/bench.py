"""Step time and peak memory of each token-selection method against full SFT, measured in one run.

    python tools/bench.py                                                  # tiny model, T = 256 and 1024
    python tools/bench.py --config configs/quickstart.yaml --lengths 512 --batch-size 2 --steps 3
    python tools/bench.py --config configs/quickstart.yaml --lora off --lengths 256

One process, one model, the same batches for every method. Each method is a real Lightning ``fit`` of the model
with the method's callbacks (``configs/methods/<method>.yaml``), ``--warmup`` untimed steps and then ``--steps``
timed ones; the methods are interleaved over ``--rounds`` rounds so that drift of the machine hits each alike.
Batches are random tokens of exactly ``T`` positions, the first ``--prompt-share`` of each being the prompt (no
loss) and the rest the response.

Rows (``--methods``): ``full`` (plain SFT), ``attn_only``, ``rel_only`` (base history), ``sstoken`` (base
history), ``sstoken_cached`` (an epoch after the first: the base history's per-token NLL from its per-sample
cache), ``sstoken_ema``, ``rho1`` (a reference model: a copy of the base model, loaded by ``ReferenceModel``),
and ``authors``: the authors' released approach re-implemented for comparison — the training forward with eager
attention and ``output_attentions=True`` (every layer's ``[B, H, T, T]`` attention materialised), full-vocabulary
logits at every position, and their separate base-model loss pass (precomputed offline in their code) counted as
one no-grad forward per step. Extra rows: ``full_fused`` and ``sstoken_fused``, the same with the loss through a
fused linear cross-entropy (``model.fused_cross_entropy``; ``--fused chunked|liger|cce``, default chunked), which
never holds the ``[N, V]`` logits; ``sstoken_stored``, ``rho1_stored``, ``tokencleaning_stored``: the base history
and the reference read from a score store (``python -m sstoken_pl score``) instead of their forwards.

Reported per sequence length: median seconds per optimizer step, peak memory (CUDA: ``max_memory_allocated``;
CPU: the process's resident set, sampled every millisecond during the method's timed steps, with glibc told to
return large blocks to the system and its freed heap trimmed before each method), and both as ratios to ``full``. Then, for the longest length, the lines

    sstoken/full step-time ratio: X
    attn_only/full step-time ratio: X
    sstoken/full peak-memory ratio: X
    authors/sstoken step-time ratio: X
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ["full", "attn_only", "rel_only", "sstoken", "sstoken_cached", "sstoken_ema", "rho1", "authors"]
FUSED = ["full_fused", "sstoken_fused"]  # extra rows: the loss through model.fused_cross_entropy (--fused)
STORED = ["sstoken_stored", "rho1_stored", "tokencleaning_stored"]  # extra rows: fixed models read from a score store
SCORE = ["score_pass"]  # extra row: what `python -m sstoken_pl score` does per batch (an inference forward, no trainer)
RATIO_LINES = [("sstoken", "full", "time"), ("attn_only", "full", "time"), ("sstoken", "full", "memory"), ("authors", "sstoken", "time"),
               ("sstoken_stored", "full", "time"), ("rho1_stored", "full", "time"), ("tokencleaning_stored", "full", "time"),
               ("full", "score_pass", "time")]
_STORES: dict[str, str] = {}  # kind -> store directory of the current length's batches

from bench_meters import PeakMemory, StepClock  # noqa: E402


# ---------------------------------------------------------------------------------------------------- batches
def make_batches(vocab: int, length: int, batch_size: int, prompt_share: float, count: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt = max(1, min(length - 2, round(prompt_share * length)))
    batches = []
    for _ in range(count):
        ids = torch.randint(10, vocab, (batch_size, length), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        index = torch.arange(batch_size) + len(batches) * batch_size
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "index": index})
    return batches


# ---------------------------------------------------------------------------------------------------- methods
_KEPT: dict[str, list] = {}


def method_callbacks(method: str, reference: str) -> list:
    """The callbacks of ``configs/methods/<method>.yaml`` (the reference path filled in). ``sstoken_cached``:
    ssToken's, kept across its runs, so that its base history's per-sample cache (filled by an untimed pass over
    the batches) serves every timed step: the cost of an epoch after the first."""
    import yaml

    if method in ("full", "authors", "full_fused"):
        return []
    if method == "sstoken_fused":
        method = "sstoken"
    if method in STORED:
        callbacks = method_callbacks(method[: -len("_stored")], reference)
        for cb in callbacks:
            if type(cb).__name__ == "HistoryModel":
                cb.scores = _STORES["base"]
            if type(cb).__name__ == "ReferenceModel":
                cb.scores = _STORES["reference"]
        return callbacks
    if method == "sstoken_cached":
        if method not in _KEPT:
            _KEPT[method] = method_callbacks("sstoken", reference)
        return _KEPT[method]
    path = os.path.join(ROOT, "configs", "methods", f"{method}.yaml")
    if not os.path.isfile(path):
        sys.exit(f"error: no method config {path}")
    with open(path) as f:
        specs = ((yaml.safe_load(f) or {}).get("trainer") or {}).get("callbacks+") or []
    callbacks = []
    for spec in specs:
        module, _, name = spec["class_path"].rpartition(".")
        args = dict(spec.get("init_args") or {})
        if name == "ReferenceModel":
            args["path"] = reference
        callbacks.append(getattr(importlib.import_module(module), name)(**args))
    return callbacks


def authors_training_step(self, batch: dict, batch_idx: int):
    """The authors' released approach, re-implemented for the cost comparison: a base-model loss pass (precomputed
    offline in their code, counted here as one no-grad forward), the training forward with eager attention and every
    layer's attention returned, full-vocabulary logits, ssToken's score (γ = 0.5) and per-sample top 60%."""
    import torch
    import torch.nn.functional as F

    from sstoken_pl import selection
    from sstoken_pl.loss import response_mask

    model, labels = self.model, batch["labels"]
    resp = response_mask(labels)
    base = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()

    def shifted_nll(logits):
        B, T, V = logits.shape
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none")
        return torch.cat([nll.new_zeros(B, 1), nll.view(B, T - 1)], 1)

    with torch.no_grad(), base:
        history = shifted_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    nll = shifted_nll(out.logits)
    with torch.no_grad():
        last = out.attentions[-1].mean(1)  # [B, T, T], heads averaged
        prompt = (labels == -100) & (batch["attention_mask"] > 0)
        mass = (last * prompt[:, None, :]).sum(-1)  # query q's mass on prompt keys
        attention = torch.zeros_like(mass)
        attention[:, 1:] = mass[:, :-1]  # aligned with labels: the query at i-1 predicts labels[i]
        scores = selection.sstoken_scores(history, nll.detach(), attention, resp, gamma=0.5)
        kept = selection.top_ratio_mask(scores, resp, 0.6)
    return (nll * kept).sum() / kept.sum().clamp(min=1)


def run_method(
    module, method: str, batches: list[dict], warmup: int, reference: str, accelerator: str, fused: str = "chunked"
) -> tuple[list[float], int]:
    import lightning.pytorch as pl
    import torch

    if method == "score_pass":
        return score_pass(module, batches, warmup, accelerator)
    clock = StepClock(warmup, accelerator == "gpu")
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[clock.start] + method_callbacks(method, reference) + [clock.stop],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    if method == "authors":
        module.training_step = types.MethodType(authors_training_step, module)
        module.model.set_attn_implementation("eager")
    configured = module.fused_cross_entropy
    if method in FUSED:
        module.fused_cross_entropy = fused
    try:
        with warnings_quiet():
            trainer.fit(module, train_dataloaders=loader)
    finally:
        module.fused_cross_entropy = configured
        if method == "authors":
            del module.training_step
            module.model.set_attn_implementation(module.hparams.attn_implementation)
    return clock.times, clock.memory.peak if clock.memory else 0


def score_pass(module, batches: list[dict], warmup: int, accelerator: str) -> tuple[list[float], int]:
    """Seconds per batch of the scoring pass (``python -m sstoken_pl score``'s predict step: the base model's
    per-token NLL in inference mode, adapters off), on the same batches as a training step: ``full``'s step time over
    this is the pass's throughput in tokens per second relative to a plain SFT step's."""
    import torch

    from sstoken_pl.loss import per_token_nll
    from sstoken_pl.models import response_logits

    device = "cuda" if accelerator == "gpu" else "cpu"
    memory = PeakMemory(accelerator == "gpu")
    model, times = module.model, []
    was = model.training
    model.eval()
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.inference_mode(), off:
        for i, batch in enumerate(batches):
            b = {k: v.to(device) for k, v in batch.items()}
            if i == warmup:
                memory.__enter__()
            start = time.perf_counter()
            per_token_nll(response_logits(model, b), b["labels"])
            if accelerator == "gpu":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    memory.__exit__(None, None, None)
    model.train(was)
    return times, memory.peak


def make_stores(module, batches: list[dict], reference: str, root: str, accelerator: str) -> None:
    """Score stores of these batches for the ``*_stored`` rows: the base model's NLL (with LoRA, adapters off) as
    ``python -m sstoken_pl score`` writes it, under the fingerprint the timed runs compute (no datamodule, 32-true);
    the reference is the exported base model, so its values are the same."""
    import shutil

    import torch

    from sstoken_pl.loss import per_token_nll, response_mask
    from sstoken_pl.models import find_exported_model, response_logits
    from sstoken_pl.score_store import ScoreStore, run_fingerprint

    device = "cuda" if accelerator == "gpu" else "cpu"
    model = module.model
    was = model.training
    model.eval()
    rows = []
    with torch.no_grad(), (model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()):
        for batch in batches:
            b = {k: v.to(device) for k, v in batch.items()}
            nll = per_token_nll(response_logits(model, b), b["labels"]).cpu()
            resp = response_mask(batch["labels"])
            rows += [(int(i), nll[j][resp[j]].numpy()) for j, i in enumerate(batch["index"].tolist())]
    model.train(was)
    for kind, source in (("base", "base"), ("reference", find_exported_model(reference))):
        path = os.path.join(root, kind)
        shutil.rmtree(path, ignore_errors=True)
        writer = ScoreStore.create(path, run_fingerprint(module, None, "32-true", source), len(rows))
        writer.write(rows)
        writer.finish()
        _STORES[kind] = path


@contextlib.contextmanager
def warnings_quiet():
    import logging
    import warnings

    level = logging.getLogger("lightning.pytorch").level
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("lightning.pytorch").setLevel(level)


# ---------------------------------------------------------------------------------------------------- main
def build_module(config: str, lora: str):
    from sstoken_pl.cli import SSTokenCLI
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    args = ["--config", config, "--trainer.callbacks=[]", "--trainer.logger=false", "--model.export=false"]
    if lora == "off":
        args.append("--model.lora=null")
    elif lora == "on":
        args.append("--model.lora={r: 64, alpha: 16, dropout: 0.1}")
    with warnings_quiet():
        cli = SSTokenCLI(SFTModule, SFTDataModule, args=args, run=False, save_config_callback=None)
    module = cli.model
    module.configure_model()
    return module


def table(results: dict[str, dict], methods: list[str]) -> str:
    full_t = statistics.median(results["full"]["times"])
    full_m = results["full"]["peak"]
    lines = ["| method | median s/step | vs full | peak memory (MiB) | vs full |", "|---|---|---|---|---|"]
    for m in methods:
        t = statistics.median(results[m]["times"])
        peak = results[m]["peak"]
        lines.append(f"| {m} | {t:.3f} | {t / full_t:.2f}× | {peak / 2**20:.0f} | {peak / full_m:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"), help="model config (its model: section)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024], help="sequence lengths T")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-share", type=float, default=0.5, help="share of each sequence that is prompt")
    parser.add_argument("--lora", choices=["config", "on", "off"], default="config",
                        help="LoRA as the config says, on (r=64, α=16, dropout 0.1) or off (full fine-tuning)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per method and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each method's run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the methods")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + FUSED + STORED + SCORE,
                        help=f"rows (default: {' '.join(METHODS)}; also {' '.join(FUSED + STORED + SCORE)})")
    parser.add_argument("--fused", default="chunked", choices=["chunked", "liger", "cce"],
                        help="the fused linear cross-entropy of the *_fused rows")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    args = parser.parse_args(argv)
    if "full" not in args.methods:
        args.methods.insert(0, "full")

    import logging

    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import; ours come after
    import torch

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-fit "GPU available" banners
    accelerator = args.accelerator if args.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    module = build_module(args.config, args.lora)
    if accelerator == "gpu":
        module.to("cuda")
    lora = hasattr(module.model, "peft_config")
    vocab = module.model.get_input_embeddings().weight.shape[0]
    device = torch.cuda.get_device_name() if accelerator == "gpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench: {os.path.relpath(args.config, ROOT)}, {'LoRA' if lora else 'full fine-tuning'}, batch {args.batch_size}, "
          f"prompt share {args.prompt_share}, {args.rounds} rounds × {args.steps} timed steps per method, on {device}", flush=True)
    with tempfile.TemporaryDirectory() as reference, tempfile.TemporaryDirectory() as stores_dir:
        if {"rho1", "rho1_stored", "tokencleaning_stored"} & set(args.methods):
            from sstoken_pl.module import export_hf

            export_hf(module, reference)  # the base model (LoRA's initial update is zero) as the reference
        last = None
        for length in args.lengths:
            batches = make_batches(vocab, length, args.batch_size, args.prompt_share, args.warmup + args.steps)
            _KEPT.clear()
            if set(STORED) & set(args.methods):  # the fixed models' values, scored before (not timed)
                make_stores(module, batches, reference, stores_dir, accelerator)
            if "sstoken_cached" in args.methods:  # the first epoch: fills the cache, not timed
                run_method(module, "sstoken_cached", batches, len(batches), reference, accelerator)
            results = {m: {"times": [], "peak": 0} for m in args.methods}
            for r in range(args.rounds):
                for method in args.methods:
                    times, peak = run_method(module, method, batches, args.warmup, reference, accelerator, args.fused)
                    results[method]["times"] += times
                    results[method]["peak"] = max(results[method]["peak"], peak)
                    note = ""
                    if method == "sstoken_cached":
                        cache = next(cb._samples for cb in _KEPT[method] if getattr(cb, "_samples", None) is not None)
                        note = f" (history cache: {cache.hits} hits, {cache.misses} misses so far)"
                    print(f"  T={length} round {r + 1}: {method:<14} {statistics.median(times):.3f} s/step, "
                          f"peak {peak / 2**20:.0f} MiB{note}", flush=True)
            print(f"\nT = {length}\n\n{table(results, args.methods)}\n", flush=True)
            last = results
    for a, b, what in RATIO_LINES:
        if a in last and b in last:
            if what == "time":
                value = statistics.median(last[a]["times"]) / statistics.median(last[b]["times"])
                print(f"{a}/{b} step-time ratio: {value:.3f}")
            else:
                print(f"{a}/{b} peak-memory ratio: {last[a]['peak'] / last[b]['peak']:.3f}")


if __name__ == "__main__":
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc: large blocks mmap'ed and returned on free, so the resident set follows the tensors alive
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    main()
