"""A micro-batch skipped for a non-finite loss leaves the step's token mean: under gradient accumulation the other
micro-batches' gradients are those of their own token mean (``loss_normalization: step``), not diluted by its count."""

import copy

import pytest
import torch

import sstoken_pl.module as module_mod
from sstoken_pl.callbacks import TokenSelection
from sstoken_pl.loss import per_token_nll, response_mask
from sstoken_pl.models import response_logits, tiny_llama_config
from sstoken_pl.module import SFTModule
from tests.helpers import loader, random_batches, trainer


class Recorder(SFTModule):
    """Keeps the gradients the optimizer step applies (after the step's token-mean scaling, before clipping)."""

    applied = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.applied = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def direct_gradients(model, batch):
    """The gradients of the mean NLL over ``batch``'s response tokens, computed here without Lightning."""
    model.train()
    nll = per_token_nll(response_logits(model, batch), batch["labels"])
    mask = response_mask(batch["labels"]).float()
    ((nll * mask).sum() / mask.sum()).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("selection", [False, True], ids=["sft", "token_selection"])
@pytest.mark.parametrize("poisoned", [0, 1], ids=["first_skipped", "second_skipped"])
def test_skipped_micro_batch_leaves_the_step_token_mean(monkeypatch, poisoned, selection):
    module = Recorder(model_config=tiny_llama_config(), tokenizer="byte", lr=1e-2, export=False, warmup_ratio=0.0)
    module.configure_model()
    base = copy.deepcopy(module.model)  # the weights before the (only) optimizer step
    batches = random_batches(2)
    real, calls = module_mod.token_loss, []

    def poisoned_loss(pl_module, batch, logits):
        calls.append(1)
        loss = real(pl_module, batch, logits)  # counts its kept tokens, as a real NaN batch would
        return loss * float("nan") if len(calls) == poisoned + 1 else loss

    monkeypatch.setattr(module_mod, "token_loss", poisoned_loss)
    # ratio 1: every response token kept, so the selector's token mean is plain SFT's
    callbacks = [TokenSelection(method="random", ratio=1.0)] if selection else []
    trainer(max_steps=1, accumulate_grad_batches=2, callbacks=callbacks).fit(module, train_dataloaders=loader(batches))

    assert module.skipped_nonfinite == 1 and len(calls) == 2
    expected = direct_gradients(base, batches[1 - poisoned])
    assert module.applied is not None and set(module.applied) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(module.applied[name], grad, rtol=1e-4, atol=1e-7), (
            f"{name}: applied/expected = {(module.applied[name].norm() / grad.norm()).item():.4f}"
        )
