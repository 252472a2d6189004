"""Mixed precision: the other models' forwards (history, reference, the global-threshold scoring pass) run in the
training step's autocast, so at lr 0 they agree with the current model's NLL to the bit (REL ≡ 0, excess loss ≡ 0)."""

import pytest
import torch

from sstoken_pl.callbacks import HistoryModel, ReferenceModel, TokenSelection
from sstoken_pl.loss import per_token_nll, response_mask
from sstoken_pl.models import response_logits, tiny_llama_config
from sstoken_pl.module import LoRA, SFTModule
from tests.helpers import loader, random_batches, trainer

# CPU autocast to bfloat16: the tiny model's NLL moves by ~2e-3 against float32. (16-mixed on a CPU falls back to
# bf16-mixed in Lightning; the callbacks use the precision plugin's own context, whatever it is.)
PRECISION = "bf16-mixed"


class Frozen(SFTModule):
    """lr 0 (``SFTModule`` refuses it): the weights stay the base model's, so history and reference ≡ current."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.0)


class Recording(TokenSelection):
    """Keeps every input the selection scored (training batches and the scoring pass alike)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def _gather(self, pl_module, batch, inputs, names):
        values = super()._gather(pl_module, batch, inputs, names)
        self.seen.append((response_mask(batch["labels"]), {k: v.detach().clone() for k, v in values.items()}))
        return values


def frozen(**kwargs):
    return Frozen(model_config=tiny_llama_config(), tokenizer="byte", export=False, warmup_ratio=0.0, **kwargs)


def reference_copy(module, tmp_path):
    """A ``ReferenceModel`` of a saved copy of the module's base model."""
    module.configure_model()
    module.model.save_pretrained(tmp_path / "reference")
    module.tokenizer.save_pretrained(tmp_path / "reference")
    return ReferenceModel(path=str(tmp_path / "reference"), cache=False)


def fit(module, selection, *callbacks, steps=3):
    trainer(max_steps=steps, precision=PRECISION, callbacks=[*callbacks, selection]).fit(
        module, train_dataloaders=loader(random_batches(steps))
    )
    assert selection.seen, "the selection scored nothing"
    return selection.seen


def assert_equal_on_responses(seen, a, b):
    for resp, values in seen:
        diff = (values[a] - values[b])[resp]
        assert resp.any() and torch.equal(diff, torch.zeros_like(diff)), f"max |{a} − {b}| = {diff.abs().max():.3g}"


def assert_autocast_matters(module, seen):
    """The check is not vacuous: the recorded (autocast) NLL differs from a float32 forward of the same weights."""
    batch = random_batches(1)[0]
    with torch.no_grad():
        fp32 = per_token_nll(response_logits(module.model.eval(), batch), batch["labels"])
    resp, values = seen[0]
    assert (values["nll"] - fp32)[resp].abs().max() > 1e-5, "autocast did not change the NLL: the test proves nothing"


@pytest.mark.parametrize("lora", [None, LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])])
def test_history_rel_is_exactly_zero_at_lr_0(lora):
    """Base history: a weight copy (full fine-tuning) or the same model with its adapters disabled (LoRA)."""
    module = frozen(lora=lora)
    history = HistoryModel(mode="base", cache=False)
    seen = fit(module, Recording(method="sstoken", gamma=1.0, ratio=0.5), history)
    assert_equal_on_responses(seen, "history_nll", "nll")
    assert_autocast_matters(module, seen)


def test_reference_excess_loss_is_exactly_zero_at_lr_0(tmp_path):
    module = frozen()
    seen = fit(module, Recording(method="rho1", ratio=0.5), reference_copy(module, tmp_path))
    assert_equal_on_responses(seen, "nll", "reference_nll")
    assert_autocast_matters(module, seen)


def test_scoring_pass_scores_as_training_does(tmp_path):
    """The global threshold is found from the same (autocast) NLL that training then selects by."""
    module = frozen()
    selection = Recording(method="rho1", rule="global_threshold", ratio=0.5, threshold_batches=2)
    seen = fit(module, selection, reference_copy(module, tmp_path), steps=2)
    assert len(seen) == 4, len(seen)  # 2 scored batches, then the same 2 batches trained on
    for (resp, scored), (_, trained) in zip(seen[:2], seen[2:]):
        for name in ("nll", "reference_nll"):
            assert torch.equal(scored[name][resp], trained[name][resp]), name
    assert_equal_on_responses(seen, "nll", "reference_nll")
    assert_autocast_matters(module, seen)
