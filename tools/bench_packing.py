"""Packed against padded batches (``data.packing``) on real length distributions, measured in one run.

    python tools/bench_packing.py                        # SmolLM2 + LoRA (configs/quickstart.yaml), batch 8
    python tools/bench_packing.py --share-only           # the padding shares alone (tokenizer only, seconds)
    python tools/bench_packing.py --datasets gsm8k --methods full --steps 3 --rounds 1

First, per dataset, the share of the positions of padded training batches (``--batch-size`` samples in the training
order, ``--max-length`` tokens at most) that are padding, and what is left of it in packed rows. Then, per dataset
and method, response tokens trained per second with packed and with padded batches: the same batches (the data
module's first ``--warmup + --steps`` training batches, collated both ways), the method's callbacks from
``configs/methods/<method>.yaml``, ``--warmup`` untimed steps, layouts interleaved over ``--rounds`` rounds
(``tools/bench.py``'s clock and fit). Datasets: ``builtin`` (the config's synthetic task), ``gsm8k``
(``../shared/data/gsm8k``) and ``alpaca`` (the instances of ``../shared/data/alpaca_seed_tasks``); one that is
absent is skipped with the reason. The last lines are ``<dataset> <method> packed/padded tokens/s: X``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench import build_module, run_method, warnings_quiet  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def datamodule(name: str, tokenizer, config_data: dict, max_length: int, batch_size: int, packing: bool, tmp: str):
    """The training data module of dataset ``name``, or a string saying why it is not there."""
    from sstoken_pl.data import SFTDataModule

    common = dict(tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, packing=packing, val_size=0.0)
    if name == "builtin":
        return SFTDataModule(synthetic=config_data.get("synthetic") or {}, system_prompt=config_data.get("system_prompt"), **common)
    if name == "gsm8k":
        path = os.path.join(SHARED, "gsm8k", "train.jsonl")
        if not os.path.isfile(path):
            return f"no {path}"
        return SFTDataModule(path=path, format="gsm8k", **common)
    path = os.path.join(SHARED, "alpaca_seed_tasks", "seed_tasks.jsonl")
    if not os.path.isfile(path):
        return f"no {path}"
    from sstoken_pl.retention import read_seed_tasks

    records = os.path.join(tmp, "alpaca_seed_tasks.jsonl")  # every instance as a prompt/completion record
    with open(records, "w") as f:
        for prompt, completion in read_seed_tasks(path):
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return SFTDataModule(path=records, format="prompt_completion", **common)


def first_batches(dm, count: int | None) -> list[dict]:
    with warnings_quiet():
        dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if count is not None and len(batches) >= count:
            break
    return batches


def shares(batches: list[dict]) -> tuple[float, float, float]:
    """(padding share of the padded batches, of the packed layout, share of the batches packed): a batch that would
    not be shorter packed stays padded (``sstoken_pl.packing.pack``)."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    packed = sum((b["packed"] if "packed" in b else b)["input_ids"].numel() for b in batches)
    return 1 - real / padded, 1 - real / packed, sum("packed" in b for b in batches) / len(batches)


def response_tokens(batch: dict) -> int:
    from sstoken_pl.loss import response_mask

    return int(response_mask(batch["labels"]).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    parser.add_argument("--datasets", nargs="+", default=["builtin", "gsm8k", "alpaca"], choices=["builtin", "gsm8k", "alpaca"])
    parser.add_argument("--methods", nargs="+", default=["full", "sstoken"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="data.max_length: truncation and a packed row's size")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method, layout and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--share-only", action="store_true", help="only the padding shares (no model forward)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args(argv)
    import yaml

    with open(args.config) as f:
        config = yaml.safe_load(f)
    module = build_module(args.config, "config")
    tokenizer = module.tokenizer
    count = args.warmup + args.steps
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"padding share at batch {args.batch_size}, max_length {args.max_length} (a whole epoch in training order):")
        data: dict[str, dict[str, list[dict]]] = {}
        for name in args.datasets:
            dm = datamodule(name, tokenizer, config.get("data") or {}, args.max_length, args.batch_size, True, tmp)
            if isinstance(dm, str):
                print(f"  {name}: skipped ({dm})")
                continue
            epoch = first_batches(dm, None)
            padded_share, packed_share, packed_batches = shares(epoch)
            print(f"  {name}: {len(dm.train_dataset)} samples: padded batches {padded_share:.1%} padding; with packing "
                  f"{packed_share:.1%} ({packed_batches:.0%} of the batches packed)")
            unpacked = [{k: v for k, v in b.items() if k != "packed"} for b in epoch[:count]]
            data[name] = {"packed": epoch[:count], "padded": unpacked}
        if args.share_only:
            return
        print(f"\nresponse tokens per second ({config['model'].get('model_name_or_path')}, {args.steps} timed steps x "
              f"{args.rounds} rounds, median over rounds):")
        for name, layouts in data.items():
            tokens = sum(response_tokens(b) for b in layouts["padded"][args.warmup:])
            for method in args.methods:
                rates: dict[str, list[float]] = {"padded": [], "packed": []}
                for _ in range(args.rounds):
                    for layout in ("padded", "packed"):
                        times, _ = run_method(module, method, layouts[layout], args.warmup, "", args.accelerator)
                        rates[layout].append(tokens / sum(times))
                padded, packed = (statistics.median(rates[k]) for k in ("padded", "packed"))
                print(f"  {name:8s} {method:8s} padded {padded:8.1f}  packed {packed:8.1f}")
                lines.append(f"{name} {method} packed/padded tokens/s: {packed / padded:.2f}")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
