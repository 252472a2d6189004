"""Token-selective SFT of a tiny model, LoRA and full fine-tuning × each HistoryModel mode, on 1 process (global batch
8) or under FSDP2 on 2 CPU processes (``ModelParallelStrategy``, 4 samples each), for tests/test_fsdp2.py.

Usage: fsdp2_cases.py OUT_DIR DEVICES [CASE ...]

Cases: ``<lora|full>-<base|snapshot|ema>`` (ssToken with that history), ``<lora|full>-reference`` (Rho-1 against the
reference model at $SSTOKEN_TEST_REFERENCE), ``<lora|full>-asft`` (Anchored SFT: DFT + KL to the base model), ``resume-<lora|full>-<mode>`` (a run resumed from its checkpoint against
a straight one; ``resume1file-...``: the checkpoint as one whole file, ``save_distributed_checkpoint=False``).

Writes ``OUT_DIR/<case>.pt`` from rank 0: per step the global kept-token count, response-token count and the kept
tokens' NLL sum (all ranks together), then the whole trained parameters and history weights after the run; training
cases also export the merged model to ``OUT_DIR/<case>-hf``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from sstoken_pl import SFTModule, packing, sharding  # noqa: E402
from sstoken_pl.callbacks import AttentionScore, HistoryModel, ReferenceModel, TokenSelection  # noqa: E402
from sstoken_pl.module import export_hf  # noqa: E402
from sstoken_pl.models import tiny_llama_config  # noqa: E402
from tests.helpers import loader, random_batches  # noqa: E402

STEPS = 3
# The per-sample NLL caches of the fixed models are off: every step then runs the history/reference forward (the
# path under test); with them on, which samples hit depends on how the sampler split them between ranks.
CACHE = os.environ.get("SSTOKEN_TEST_CACHE") == "1"


class RecordingSelection(TokenSelection):
    """TokenSelection that records, per optimizer step, kept / response token counts and the kept tokens' NLL sum,
    summed over ranks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = []
        self._step = None

    def select(self, pl_module, batch, inputs, response_mask):
        kept = super().select(pl_module, batch, inputs, response_mask)
        w = kept.float() * response_mask
        self._step = torch.stack([w.sum(), response_mask.sum().float(), (inputs["nll"].detach() * w).sum()])
        return kept

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        reference = self._providers.get("reference_nll")
        self.reference_sharded = reference is not None and sharding.is_sharded(reference.model)
        step = self._step.double()
        if trainer.world_size > 1:
            step = trainer.strategy.reduce(step, reduce_op="sum")
        self.steps.append(step)


def batches(devices: int, seed: int = 3):
    """The same 8 samples at every step (an epoch is one step: Lightning's distributed sampler shuffles, so more
    batches per epoch would group other samples into a step): one batch of 8 on 1 process, 4 per rank on 2."""
    (full,) = random_batches(1, batch_size=8, seq_len=32, seed=seed)
    if devices == 1:
        return [full]
    return [{k: v[h * 4 : (h + 1) * 4] for k, v in full.items()} for h in range(2)]


def module(lora: bool) -> SFTModule:
    return SFTModule(
        model_config=tiny_llama_config(), tokenizer="byte", lr=3e-2, warmup_ratio=0.0, schedule="constant",
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]} if lora else None,
        export=False,
    )


def strategy(devices: int, distributed_checkpoint: bool = True):
    if devices == 1:
        return "auto"
    from lightning.pytorch.strategies import ModelParallelStrategy

    # default sizes: sstoken-pl turns them into a 2-process FSDP2 mesh
    return ModelParallelStrategy(save_distributed_checkpoint=distributed_checkpoint)


def whole(tensors: dict) -> dict:
    """Whole CPU tensors (gathered from DTensor shards; a collective under FSDP2)."""
    return {n: (t.full_tensor() if sharding.is_dtensor(t) else t).detach().cpu().clone() for n, t in tensors.items()}


def history_weights(history: HistoryModel, model) -> dict:
    if history._weights is None:
        return {}
    if not history._sharded:
        return whole(history._weights)
    params = sharding.named_parameters(model)
    return whole({n: sharding.as_dtensor_like(params[n], w) for n, w in history._weights.items()})


def fit(devices, lora, mode, steps=STEPS, root=None, ckpt_path=None, extra_callbacks=(), distributed_checkpoint=True):
    pl.seed_everything(0)
    history = HistoryModel(mode="base" if mode in ("reference", "asft", "packed") else mode, ema_decay=0.6, snapshot_every=2, cache=CACHE)
    if mode == "reference":  # Rho-1 against a frozen reference, per-sample rule (a batch rule depends on the split)
        selection = RecordingSelection(method="rho1", ratio=0.5, rule="sample_top")
        reference = ReferenceModel(path=os.environ["SSTOKEN_TEST_REFERENCE"], check_tokenizer=False, cache=CACHE)
        callbacks = [reference, selection, *extra_callbacks]
    elif mode == "asft":  # the reference-anchored objective: the base model's distribution at every response row
        selection = RecordingSelection(method="asft", objective_options={"alpha": 0.5})
        callbacks = [history, selection, *extra_callbacks]
    else:
        selection = RecordingSelection(method="sstoken", ratio=0.5, gamma=0.5)
        callbacks = [history, AttentionScore(layer=-1), selection, *extra_callbacks]
    data = batches(devices)
    if mode == "packed":  # ssToken on packed rows: each rank packs its own share (rows of ≤ 48 of its ≤ 32-token samples)
        data = [packing.pack(dict(b), 48, 0, always=True) for b in data]
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy(devices, distributed_checkpoint), max_steps=steps,
        logger=False,
        enable_checkpointing=bool(extra_callbacks), enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, num_sanity_val_steps=0, callbacks=callbacks,
    )
    m = module(lora)
    trainer.fit(m, train_dataloaders=loader(data), ckpt_path=ckpt_path)
    result = {
        "steps": [s.cpu() for s in selection.steps],
        "params": whole(sharding.named_parameters(m.model)),
        "history": history_weights(history, m.model),
        "last_step": history._last_step,
        "sharded": sharding.is_sharded(m.model),
        "history_is_local": all(not sharding.is_dtensor(w) for w in (history._weights or {}).values()),
    }
    if history._weights is not None and history._sharded:
        params = sharding.named_parameters(m.model)
        result["local_shapes_match"] = all(
            w.shape == sharding.local(params[n]).shape for n, w in history._weights.items()
        )
    if mode == "reference":
        result["reference_sharded"] = selection.reference_sharded  # during training (freed at teardown)
    return trainer, result, m


def export(trainer, m, path):
    if sharding.is_sharded(m.model):
        sharding.export_sharded_hf(m.model, m.tokenizer, path, trainer.is_global_zero)
    elif trainer.is_global_zero:
        export_hf(m, path)


def resume_case(devices, lora, mode, out_dir, distributed_checkpoint=True):
    """3 steps straight, and 2 steps + a resume from the checkpoint (under FSDP2 a distributed checkpoint directory,
    or one whole file) to step 3."""
    root = os.path.join(out_dir, f"ckpt-{lora}-{mode}-{distributed_checkpoint}")
    _, straight, _ = fit(devices, lora, mode)
    kw = dict(distributed_checkpoint=distributed_checkpoint)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
    fit(devices, lora, mode, steps=2, root=root, extra_callbacks=[ckpt], **kw)
    last = os.path.join(root, "last.ckpt")
    ckpt2 = pl.callbacks.ModelCheckpoint(dirpath=root + "-2", save_last=True, every_n_train_steps=1)
    _, resumed, _ = fit(devices, lora, mode, root=root + "-2", ckpt_path=last, extra_callbacks=[ckpt2], **kw)
    return {"straight": straight, "resumed": resumed, "ckpt_is_dir": os.path.isdir(last)}


if __name__ == "__main__":
    out_dir, devices = sys.argv[1], int(sys.argv[2])
    cases = sys.argv[3:] or [f"{k}-{m}" for k in ("lora", "full") for m in ("base", "snapshot", "ema")]
    os.makedirs(out_dir, exist_ok=True)
    rank = 0
    for case in cases:
        if case.startswith("resume"):
            how, kind, mode = case.split("-")
            result = resume_case(devices, kind == "lora", mode, out_dir, distributed_checkpoint=how == "resume")
        else:
            kind, mode = case.split("-")
            trainer, result, m = fit(devices, kind == "lora", mode)
            export(trainer, m, os.path.join(out_dir, f"{case}-hf"))
            rank = trainer.global_rank
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and rank == 0:
            torch.save(result, os.path.join(out_dir, f"{case}.pt"))
