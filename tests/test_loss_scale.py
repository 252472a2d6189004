"""The loss at any scale: with ``loss_normalization: step`` every kept token of an optimizer step weighs the same,
whatever micro-batch or rank it is in (gradient accumulation, DDP)."""

import os
import subprocess
import sys

import pytest
import torch

from sstoken_pl.callbacks import TokenSelection
from sstoken_pl.methods import METHODS, Method
from sstoken_pl.models import load_causal_lm, tiny_llama_config
from tests.helpers import ForeignModule, loader, random_batches, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A deterministic score (the token's own NLL): a per-sample rule then keeps the same tokens however samples are batched.
HARD = Method("hard_tokens_test", lambda o: frozenset({"nll"}), lambda i, r, o, g: torch.where(r, i["nll"], 0.0))


def _batches(n_chunks, weighted=False):
    """The same 8 samples with very different response lengths, as 1 batch of 8 or ``n_chunks`` batches; with
    ``weighted``, each carrying data weights (``token_weights``: 0.5, 1 and 2 in turn)."""
    (full,) = random_batches(1, batch_size=8, seq_len=32, seed=3)
    if weighted:
        full["token_weights"] = (torch.arange(full["labels"].numel()).view(full["labels"].shape) % 3).float().exp2() / 2
    size = 8 // n_chunks
    return [{k: v[i * size : (i + 1) * size] for k, v in full.items()} for i in range(n_chunks)]


def one_step(devices=1, normalization="step", accumulate=1, strategy="auto", selection=True, module_cls=None,
             method=None, weighted=False):
    """The trainable parameters after one SGD step on the 8 samples; None on ranks other than 0. ``method``: a
    method by name (default: the deterministic per-sample top half); ``weighted``: the samples carry data weights."""
    METHODS.setdefault(HARD.name, HARD)
    model = load_causal_lm(config=tiny_llama_config(), seed=0)
    module = (module_cls or ForeignModule)(model, lr=1.0)
    select = dict(method=method) if method else dict(method=HARD.name, ratio=0.5)
    callbacks = [TokenSelection(**select, loss_normalization=normalization)] if selection else []
    if method == "otr":
        callbacks = [TokenSelection(method="otr", objective_options={"samples": 16}, loss_normalization=normalization)]
    chunks = max(devices, accumulate)
    t = trainer(max_steps=1, devices=devices, strategy=strategy, accumulate_grad_batches=accumulate, callbacks=callbacks)
    t.fit(module, train_dataloaders=loader(_batches(chunks, weighted)))
    if t.global_rank != 0:
        return None
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def _close(a, b, atol=1e-5):
    return all(torch.allclose(a[n], b[n], atol=atol, rtol=0) for n in a)


def test_accumulation_equals_one_batch_of_twice_the_size():
    one = one_step(accumulate=1)
    assert _close(one, one_step(accumulate=2)), "accumulation 2 × 4 = one batch of 8, to 1e-5"
    assert _close(one, one_step(accumulate=4))
    assert not _close(one, one_step(accumulate=2, normalization="micro_batch")), "the per-micro-batch mean differs"


@pytest.mark.parametrize("method,weighted", [("dft", False), ("otr", False), (None, True), ("dft", True)])
def test_objectives_and_data_weights_under_accumulation(method, weighted):
    """DFT, OTR (its draws keyed by sample and position, not by micro-batch) and data weights: accumulation 2 × 4 is
    one batch of 8, to 1e-5."""
    one = one_step(method=method, weighted=weighted)
    assert _close(one, one_step(accumulate=2, method=method, weighted=weighted))
    assert not _close(one, one_step(method=method, weighted=not weighted)), "the weights change the step"


def test_plain_sft_module_weighs_tokens_alike_across_micro_batches():
    class WithStepMean(ForeignModule):
        """A module that opts in to the step-wide mean without a selector, as SFTModule does."""

        def __init__(self, model, lr):
            super().__init__(model, lr)
            from sstoken_pl.loss import StepTokenMean

            self.loss_normalization, self.token_step = "step", StepTokenMean()

        def on_before_optimizer_step(self, optimizer):
            self.token_step.finish(self.trainer, optimizer)

    one = one_step(selection=False, module_cls=WithStepMean)
    assert _close(one, one_step(selection=False, module_cls=WithStepMean, accumulate=2))
    assert not _close(one, one_step(selection=False, accumulate=2)), "a module without it keeps the micro-batch mean"


@pytest.mark.parametrize("case", ["select", "dft", "otr+weights"])
def test_two_ddp_processes_equal_one_process(tmp_path, case):
    """2 DDP ranks × 4 samples = 1 rank × 8 samples: the per-sample selection, DFT, and OTR with data weights."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"{devices}.pt"
        run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "ddp_step.py"), str(out), str(devices), "step", case],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[devices] = torch.load(out)
    assert _close(results[1], results[2]), "2 ranks × 4 samples = 1 rank × 8 samples, to 1e-5"


@pytest.mark.parametrize("value", ["token", "mean", ""])
def test_bad_normalization(value):
    from sstoken_pl.errors import ConfigError

    with pytest.raises(ConfigError, match="loss_normalization"):
        TokenSelection(loss_normalization=value)
