"""``python -m sstoken_pl score``: a fixed model's per-token NLL of every training sample, once, into a store.

    python -m sstoken_pl score --config configs/quickstart.yaml --out runs/scores/base
    python -m sstoken_pl score --config configs/quickstart.yaml --source runs/reference --out runs/scores/reference

then ``HistoryModel(mode="base", scores="runs/scores/base")`` / ``ReferenceModel(scores="runs/scores/reference")``
read each batch's values with no forward (``sstoken_pl.score_store``). Every option other than ``--out``,
``--source`` and ``--batch_size`` is the run's own configuration, as ``fit`` takes it (the store's fingerprint
comes from it, and a run whose data, tokenizer, template, length or precision differ is refused).

``--source``: ``base`` (the config's model before training: with LoRA, the adapters off) or a reference (a run
directory, whose newest exported ``hf_model`` is used, a model directory, a hub name). The pass is Lightning's
predict loop under the config's trainer (accelerator, devices, strategy, precision: under DDP each rank scores its
share and writes shards of its own), in inference mode, in the dataset's order, with a progress bar; an interrupted
pass resumes with the samples no finished shard holds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

SHARD_SAMPLES = 2048  # samples per shard: what an interruption can lose


class _Scorer(pl.LightningModule):
    """Per-token NLL of a fixed model: the SFT module's model (adapters off) or a reference model."""

    def __init__(self, module: Any, reference: Optional[torch.nn.Module]) -> None:
        super().__init__()
        self.module = module
        self.reference = reference

    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``), the scoring model is sharded as training shards it."""
        from sstoken_pl import sharding

        if sharding.is_model_parallel(self.trainer.strategy):
            model = self.reference if self.reference is not None else self.module.model
            if not sharding.is_sharded(model):
                sharding.shard_model(model, sharding.data_parallel_mesh(self.trainer.strategy, self))

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from sstoken_pl.loss import per_token_nll
        from sstoken_pl.models import response_logits

        model = self.reference if self.reference is not None else self.module.model
        off = model.disable_adapter() if self.reference is None and hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with off:
            return per_token_nll(response_logits(model, batch), batch["labels"])


class _StoreWriter(BasePredictionWriter):
    """Buffers each batch's response values and writes a shard every ``SHARD_SAMPLES`` samples and at the end."""

    def __init__(self, writer: Any) -> None:
        super().__init__(write_interval="batch")
        self.writer = writer
        self.buffer: list[tuple[int, Any]] = []
        self.tokens = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from sstoken_pl.loss import response_mask

        resp = response_mask(batch["labels"])
        values = prediction.float().cpu()
        for b, index in enumerate(batch["index"].tolist()):
            self.buffer.append((index, values[b][resp[b].cpu()].numpy()))
        self.tokens += int(resp.sum())
        if len(self.buffer) >= SHARD_SAMPLES:
            self.flush()

    def flush(self) -> None:
        self.writer.write(self.buffer)
        self.buffer = []

    def on_predict_end(self, trainer, pl_module) -> None:
        self.flush()


def main(argv: Optional[list[str]] = None) -> None:
    from sstoken_pl.cli import SSTokenCLI, _Parser, user_errors
    from sstoken_pl.data import SFTCollator, SFTDataModule
    from sstoken_pl.module import SFTModule
    from sstoken_pl.score_store import ScoreStore, run_fingerprint

    parser = argparse.ArgumentParser(prog="python -m sstoken_pl score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the store directory (resumed when it holds an unfinished pass)")
    parser.add_argument("--source", default="base", help="base, or a reference: run dir, model dir, hub name")
    parser.add_argument("--batch_size", type=int, default=None, help="scoring batch size (default: data.batch_size)")
    args, rest = parser.parse_known_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")  # Lightning's predict loop
    with user_errors():
        cli = SSTokenCLI(
            SFTModule, SFTDataModule, parser_class=_Parser, run=False, save_config_callback=None,
            args=rest + ["--trainer.callbacks=[]", "--trainer.logger=false", "--model.export=false",
                         "--eval.num_problems=0", "--trainer.enable_checkpointing=false"],
        )
        module, data, trainer = cli.model, cli.datamodule, cli.trainer
        if data.tokenizer_source is None:  # as in fit: the data takes the model's tokenizer
            data.tokenizer_source = module.tokenizer
        data.prepare_data()
        data.setup("fit")
        module.configure_model()
        reference = None
        source = args.source
        if source != "base":
            from sstoken_pl.callbacks import ReferenceModel
            from sstoken_pl.models import find_exported_model

            loader = ReferenceModel(path=source, cache=False)
            loader.on_fit_start(trainer, module)
            reference, source = loader.model, find_exported_model(source)
        fingerprint = run_fingerprint(module, data, trainer.precision, source)
        dataset = data.train_dataset
        store = ScoreStore.create(args.out, fingerprint, len(dataset), rank=trainer.global_rank)
    todo = [i for i, index in enumerate(dataset["index"]) if index not in store.done]
    writer = _StoreWriter(store)
    trainer.callbacks = [cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.ProgressBar)] + [writer]
    start = time.perf_counter()
    if todo:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, todo), batch_size=args.batch_size or data.batch_size, shuffle=False,
            collate_fn=data.collator(),  # packed rows with data.packing, as the training forwards
        )
        if data.packing:
            from sstoken_pl.packing import check_model

            check_model(reference if reference is not None else module.model, "the scored model")
        trainer.predict(_Scorer(module, reference), dataloaders=loader, return_predictions=False)
    seconds = time.perf_counter() - start
    if trainer.world_size > 1:
        trainer.strategy.barrier()
    if trainer.is_global_zero:
        store.finish()
        rate = f", {writer.tokens / seconds:,.0f} tokens/s" if writer.tokens and seconds > 0 else ""
        ranks = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
        print(f"scored {len(todo)} samples ({len(dataset) - len(todo)} already stored), {writer.tokens:,} response "
              f"tokens{ranks} in {seconds:.0f} s{rate}: {os.path.abspath(args.out)}")
