import copy

import lightning.pytorch as pl
import pytest
import torch

from sstoken_pl.callbacks import HistoryModel
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll
from tests.helpers import ForeignModule, loader, random_batches, trainer


class Recorder(pl.Callback):
    """Trainable parameters after each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad})


def lora(model, r=4):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def nll_of(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_token_nll(out.logits, batch["labels"])


def test_base_history_is_the_untouched_model_full_finetuning(tiny_llama):
    untouched = copy.deepcopy(tiny_llama)
    batches = random_batches(4)
    history = HistoryModel(mode="base")
    module = ForeignModule(tiny_llama, lr=0.5)
    trainer(max_steps=4, callbacks=[history]).fit(module, train_dataloaders=loader(batches))
    batch = batches[0]
    assert not torch.allclose(nll_of(tiny_llama, batch), nll_of(untouched, batch))  # training moved the model
    torch.testing.assert_close(history.history_nll(module, batch), nll_of(untouched, batch))
    assert history.num_history_parameters == sum(p.numel() for p in tiny_llama.parameters())


def test_base_history_with_lora_disables_adapters_and_holds_no_weights(tiny_llama):
    untouched = copy.deepcopy(tiny_llama)
    model = lora(tiny_llama)
    params_before = sum(p.numel() for p in model.parameters())
    batches = random_batches(4)
    history = HistoryModel(mode="base")
    module = ForeignModule(model, lr=0.5)
    module.train()
    trainer(max_steps=4, callbacks=[history]).fit(module, train_dataloaders=loader(batches))
    batch = batches[1]
    assert not torch.allclose(nll_of(model, batch), nll_of(untouched, batch))
    torch.testing.assert_close(history.history_nll(module, batch), nll_of(untouched, batch))
    assert history.num_history_parameters == 0
    assert history.state_dict()["weights"] is None
    assert sum(p.numel() for p in model.parameters()) == params_before
    # adapters are back on after the history forward
    torch.testing.assert_close(nll_of(model, batch), nll_of(module.model, batch))
    assert not torch.allclose(nll_of(model, batch), nll_of(untouched, batch))


def test_history_forward_keeps_train_mode_and_has_no_grad(tiny_llama):
    batches = random_batches(2)
    history = HistoryModel(mode="ema", ema_decay=0.5)
    module = ForeignModule(tiny_llama)
    trainer(max_steps=1, callbacks=[history]).fit(module, train_dataloaders=loader(batches))
    module.model.train()
    nll = history.history_nll(module, batches[0])
    assert module.model.training and not nll.requires_grad


@pytest.mark.parametrize("use_lora", [False, True])
def test_ema_arithmetic(tiny_llama, use_lora):
    model = lora(tiny_llama) if use_lora else tiny_llama
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    alpha = 0.7
    history, recorder = HistoryModel(mode="ema", ema_decay=alpha), Recorder()
    module = ForeignModule(model, lr=0.5)
    trainer(max_steps=3, callbacks=[history, recorder]).fit(module, train_dataloaders=loader(random_batches(3)))
    expected = initial
    for step in recorder.steps:
        expected = {n: alpha * expected[n] + (1 - alpha) * step[n] for n in expected}
    assert set(history._weights) == set(initial)
    if use_lora:
        assert all("lora_" in n for n in initial)
    for n in expected:
        torch.testing.assert_close(history._weights[n], expected[n], atol=1e-6, rtol=1e-5)
    # and the history forward uses those weights
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if n in expected:
                p.copy_(expected[n])
    torch.testing.assert_close(history.history_nll(module, random_batches(1)[0]), nll_of(reference.eval(), random_batches(1)[0]))


def test_snapshot_cadence(tiny_llama):
    history, recorder = HistoryModel(mode="snapshot", snapshot_every=2), Recorder()
    module = ForeignModule(tiny_llama, lr=0.5)
    trainer(max_steps=5, callbacks=[history, recorder]).fit(module, train_dataloaders=loader(random_batches(5)))
    # refreshed after optimizer steps 2 and 4, not after 5
    for n, w in history._weights.items():
        torch.testing.assert_close(w, recorder.steps[3][n])
        assert not torch.equal(w, recorder.steps[4][n])


def test_a_schedule_of_your_own_overrides_should_update_and_decay(tiny_llama):
    """One update rule θ_h ← d·θ_h + (1 − d)·θ: a subclass moves the history after even steps only, with d = 0.5."""

    class EvenSteps(HistoryModel):
        def should_update(self, step):
            return step % 2 == 0

        def decay(self, step):
            return 0.5

    initial = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    history, recorder = EvenSteps(mode="ema"), Recorder()
    trainer(max_steps=5, callbacks=[history, recorder]).fit(ForeignModule(tiny_llama, lr=0.5), loader(random_batches(5)))
    expected = initial
    for step, weights in enumerate(recorder.steps, 1):
        if step % 2 == 0:
            expected = {n: 0.5 * expected[n] + 0.5 * weights[n] for n in expected}
    for n, w in history._weights.items():
        torch.testing.assert_close(w, expected[n], atol=1e-6, rtol=1e-5)


def test_snapshot_counts_optimizer_steps_under_gradient_accumulation(tiny_llama):
    history, recorder = HistoryModel(mode="snapshot", snapshot_every=1), Recorder()
    module = ForeignModule(tiny_llama, lr=0.5)
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[history, recorder]).fit(
        module, train_dataloaders=loader(random_batches(4))
    )
    assert history._last_step == 2
    for n, w in history._weights.items():
        torch.testing.assert_close(w, recorder.steps[-1][n])


@pytest.mark.parametrize("mode", ["ema", "snapshot", "base"])
def test_resume_continues_exactly(tmp_path, mode):
    from sstoken_pl.models import load_causal_lm, tiny_llama_config

    batches = random_batches(1)  # one batch per epoch: the resumed run sees the same data as the straight one

    def run(max_steps, ckpt_path=None, root=tmp_path / "a"):
        torch.manual_seed(0)
        model = load_causal_lm(config=tiny_llama_config(), seed=0)
        history = HistoryModel(mode=mode, ema_decay=0.6, snapshot_every=2)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
        t = trainer(max_steps=max_steps, callbacks=[history, ckpt], enable_checkpointing=True, default_root_dir=root)
        t.fit(ForeignModule(model, lr=0.3), train_dataloaders=loader(batches), ckpt_path=ckpt_path)
        return history

    straight = run(5, root=tmp_path / "straight")
    run(3, root=tmp_path / "first")
    resumed = run(5, ckpt_path=str(tmp_path / "first" / "last.ckpt"), root=tmp_path / "second")
    assert resumed._last_step == straight._last_step == 5
    for n, w in straight._weights.items():
        assert torch.equal(w, resumed._weights[n]), n


def test_mode_mismatch_on_resume_is_a_clear_error():
    with pytest.raises(ConfigError, match="mode"):
        HistoryModel(mode="ema").load_state_dict({"mode": "base", "last_step": 0, "weights": None})


@pytest.mark.parametrize(
    "kwargs", [{"mode": "lagged"}, {"ema_decay": 1.0}, {"ema_decay": -0.1}, {"snapshot_every": 0}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        HistoryModel(**kwargs)


def test_missing_model_attribute_is_named(tiny_llama):
    module = ForeignModule(tiny_llama)
    with pytest.raises(ConfigError, match="backbone"):
        trainer(max_steps=1, callbacks=[HistoryModel(model_attr="backbone")]).fit(
            module, train_dataloaders=loader(random_batches(1))
        )


def test_ema_of_bf16_weights_is_kept_in_float32(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    history = HistoryModel(mode="ema", ema_decay=0.99)
    module = ForeignModule(model, lr=0.05)
    recorder = Recorder()
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    trainer(max_steps=3, callbacks=[history, recorder]).fit(module, train_dataloaders=loader(random_batches(3)))
    expected = initial
    for step in recorder.steps:
        expected = {n: 0.99 * expected[n] + 0.01 * step[n].float() for n in expected}
    for n, w in history._weights.items():
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, expected[n], atol=1e-6, rtol=1e-5)
    # the tiny updates are not rounded away, as they would be in bf16
    moved = sum(int((w != initial[n]).sum()) for n, w in history._weights.items())
    assert moved > 0.5 * sum(w.numel() for w in history._weights.values())
    nll = history.history_nll(module, random_batches(1)[0])
    assert torch.isfinite(nll).all()
