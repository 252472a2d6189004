"""TokenSelection wired into training, through ``sstoken_pl.token_loss``, in a module that is not sstoken_pl's."""

import json

import lightning.pytorch as pl
import pytest
import torch

from sstoken_pl.callbacks import AttentionScore, HistoryModel, TokenSelection
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import response_mask
from sstoken_pl.selection import kept_count, top_ratio_mask
from tests.helpers import ForeignModule, loader, random_batches, trainer


class SpySelection(TokenSelection):
    """Records what ``select`` saw and returned, and the logged metrics, at each step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def select(self, pl_module, batch, inputs, resp):
        token_nll = inputs["nll"]
        kept = super().select(pl_module, batch, inputs, resp)
        history, attention = self._providers.get("history_nll"), self._providers.get("attention")
        hist = history.history_nll(pl_module, batch) if history is not None else None
        selecting = pl_module.trainer.global_step >= self.warmup_steps
        attn = attention.scores(pl_module, batch) if attention is not None and selecting else None
        self.seen.append(
            dict(step=pl_module.trainer.global_step, resp=resp.clone(), kept=kept.clone(), nll=token_nll.detach(),
                 hist=hist, attn=attn, logged={k: float(v) for k, v in pl_module.trainer.callback_metrics.items()})
        )
        return kept


@pytest.mark.parametrize("ratio", [0.3, 0.6, 1.0])
def test_kept_fraction_is_ceil_ratio_r_per_sample(tiny_llama, ratio):
    spy = SpySelection(ratio=ratio, gamma=1.0)
    trainer(max_steps=3, callbacks=[HistoryModel(mode="ema", ema_decay=0.5), spy]).fit(
        ForeignModule(tiny_llama, lr=0.5), train_dataloaders=loader(random_batches(3))
    )
    assert len(spy.seen) == 3
    for s in spy.seen:
        R = s["resp"].sum(1)
        assert torch.equal(s["kept"].sum(1), kept_count(R, ratio))
        assert not (s["kept"] & ~s["resp"]).any()
    # the logged kept fraction is the batch's kept share
    last = spy.seen[-1]
    assert abs(spy.seen[-1]["kept"].sum().item() / last["resp"].sum().item() - _kept_fraction(spy)) < 1e-6


def _kept_fraction(spy):
    return spy.last_logged["selection/kept_fraction"]


@pytest.fixture(autouse=True)
def _record_logged(monkeypatch):
    """Make SpySelection keep the metrics it logged at its last call (callback_metrics lag one step)."""
    original = TokenSelection._log

    def log(pl_module, stats):
        original(pl_module, stats)
        for cb in pl_module.trainer.callbacks:
            if isinstance(cb, SpySelection):
                cb.last_logged = {k: float(v) for k, v in stats.items()}

    monkeypatch.setattr(TokenSelection, "_log", staticmethod(log))


def test_loss_is_mean_nll_over_kept_tokens(tiny_llama):
    class LossSpy(ForeignModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.detach())
            return loss

    module = LossSpy(tiny_llama, lr=0.5)
    module.losses = []
    spy = SpySelection(ratio=0.5, gamma=1.0)
    trainer(max_steps=2, callbacks=[HistoryModel(mode="snapshot", snapshot_every=1), spy]).fit(
        module, train_dataloaders=loader(random_batches(2))
    )
    for s, loss in zip(spy.seen, module.losses):
        torch.testing.assert_close(loss, s["nll"][s["kept"]].mean())
        assert not torch.isclose(loss, s["nll"][s["resp"]].mean())


def test_full_sstoken_in_a_foreign_module(tiny_llama):
    spy = SpySelection(ratio=0.6, gamma=0.5)
    trainer(max_steps=3, callbacks=[HistoryModel(mode="base"), AttentionScore(layer=-1), spy]).fit(
        ForeignModule(tiny_llama, lr=0.5), train_dataloaders=loader(random_batches(3))
    )
    first, last = spy.seen[0], spy.seen[-1]
    # step 0: history == current, REL ≡ 0, so selection is by attention alone
    torch.testing.assert_close(first["hist"], first["nll"], atol=1e-5, rtol=1e-5)
    assert torch.equal(first["kept"], top_ratio_mask(first["attn"], first["resp"], 0.6))
    # later, REL moves the choice away from attention-only
    assert not torch.allclose(last["hist"], last["nll"])
    assert set(spy.last_logged) == {"selection/kept_fraction", "selection/rel_mean", "selection/attn_mean"}
    assert 0.0 <= spy.last_logged["selection/attn_mean"] <= 1.0


def test_warmup_steps_train_on_every_response_token(tiny_llama):
    spy = SpySelection(ratio=0.5, gamma=1.0, warmup_steps=2)
    trainer(max_steps=3, callbacks=[HistoryModel(), spy]).fit(
        ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(3))
    )
    assert [torch.equal(s["kept"], s["resp"]) for s in spy.seen] == [True, True, False]


def test_attention_is_not_captured_during_warmup(tiny_llama, monkeypatch):
    import sstoken_pl.attention as attention

    calls = []
    real = attention.prompt_attention_mass
    monkeypatch.setattr(attention, "prompt_attention_mass", lambda *a, **k: calls.append(1) or real(*a, **k))
    spy = SpySelection(ratio=0.5, gamma=0.0, warmup_steps=2)
    trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[AttentionScore(), spy]).fit(
        ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(8))
    )
    # 8 batches = 4 optimizer steps; batches 0-3 are the 2 warm-up steps
    assert [s["step"] for s in spy.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s["attn"] is not None for s in spy.seen] == [False] * 4 + [True] * 4
    assert len(calls) == 4, "the probe computes the attention score only for the batches that select"


def test_batch_rule_ranks_across_samples(tiny_llama):
    spy = SpySelection(ratio=0.5, gamma=0.0, rule="batch_top")
    trainer(max_steps=1, callbacks=[AttentionScore(), spy]).fit(
        ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(1))
    )
    s = spy.seen[0]
    assert int(s["kept"].sum()) == int(kept_count(s["resp"].sum().reshape(1), 0.5))
    kept_scores, dropped_scores = s["attn"][s["kept"]], s["attn"][s["resp"] & ~s["kept"]]
    assert kept_scores.min() >= dropped_scores.max()


def test_no_selection_outside_training(tiny_llama):
    module = ForeignModule(tiny_llama)
    spy = SpySelection(ratio=0.5, gamma=1.0)
    t = trainer(max_steps=1, callbacks=[HistoryModel(), spy])
    t.fit(module, train_dataloaders=loader(random_batches(1)))
    module.eval()
    batch = random_batches(1)[0]
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    import sstoken_pl
    from sstoken_pl.loss import per_token_nll

    loss = sstoken_pl.token_loss(module, batch, logits)
    nll = per_token_nll(logits, batch["labels"])
    torch.testing.assert_close(loss, nll[response_mask(batch["labels"])].mean())


@pytest.mark.parametrize(
    "callbacks, missing",
    [([TokenSelection(gamma=0.5), AttentionScore()], "HistoryModel"), ([TokenSelection(gamma=0.5), HistoryModel()], "AttentionScore"),
     ([TokenSelection(gamma=0.0)], "AttentionScore"), ([TokenSelection(gamma=1.0)], "HistoryModel")],
)
def test_missing_provider_is_named_at_fit_start(tiny_llama, callbacks, missing):
    with pytest.raises(ConfigError, match=missing):
        trainer(max_steps=1, callbacks=callbacks).fit(ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(1)))


@pytest.mark.parametrize("kwargs", [{"ratio": 0.0}, {"ratio": 1.2}, {"gamma": -0.5}, {"gamma": 2}, {"warmup_steps": -1}, {"rule": "token"},
                                    {"method": "nope"}, {"method": "rho1", "gamma": 0.5}, {"early_fraction": 0.2},
                                    {"method": "qtuning", "options": {"sample_ratio": 0}}, {"options": {"lambda": 1}}])
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        TokenSelection(**kwargs)


def test_decoded_samples_are_logged(tiny_llama, tmp_path, byte_tok):
    from lightning.pytorch.loggers import CSVLogger

    module = ForeignModule(tiny_llama)
    module.tokenizer = byte_tok
    batches = random_batches(4, vocab=200)
    selection = TokenSelection(ratio=0.5, gamma=1.0, log_samples_every=1)
    t = trainer(max_steps=2, accumulate_grad_batches=2, logger=CSVLogger(tmp_path), callbacks=[HistoryModel(), selection])
    t.fit(module, train_dataloaders=loader(batches))
    text = (tmp_path / "lightning_logs" / "version_0" / "selection_samples.txt").read_text()
    # once per optimizer step, although each step saw two micro-batches
    assert [line for line in text.splitlines() if line.startswith("step ")] == ["step 0", "step 1", "step 2"]
    assert "[-" in text and "-]" in text
    lines = [json.loads(l) for l in (tmp_path / "lightning_logs" / "version_0" / "selection_samples.jsonl").read_text().splitlines()]
    assert {l["step"] for l in lines} == {0, 1, 2}
    for line in lines:
        assert len(line["tokens"]) == len(line["kept"]) and set(line["kept"]) <= {0, 1} and line["noise"] is None
        assert 0 < sum(line["kept"]) < len(line["kept"])


def test_providers_prepare_in_one_fixed_order_whatever_the_callbacks_order(tiny_llama):
    """A provider of one's own (``TokenInputProvider``): other models' inputs are prepared before the probes are
    armed, each input is computed once per batch, and a method reads both — in either order of the callbacks."""
    from sstoken_pl.callbacks import TokenInputProvider
    from sstoken_pl.methods import Method, register_method

    events = []

    class Other(TokenInputProvider):  # another model's per-token input
        provides = ("other_nll",)

        def compute(self, name, pl_module, batch):
            events.append("other")
            return torch.zeros(batch["labels"].shape)

    class Probe(TokenInputProvider):  # captured from the training forward
        provides = ("probe",)
        from_training_forward = True

        def arm(self, pl_module, batch):
            events.append("arm")

        def compute(self, name, pl_module, batch):
            events.append("probe")
            return torch.ones(batch["labels"].shape)

    def score(inputs, resp, options, generator):
        return inputs["probe"] - inputs["other_nll"] + torch.rand(resp.shape, generator=generator)

    register_method(Method("two_inputs", inputs=lambda options: frozenset({"other_nll", "probe"}), score=score,
                           rule="sample_top"))
    for order in ("providers_first", "selection_first"):
        events.clear()
        providers = [Other(), Probe()]
        selection = TokenSelection(method="two_inputs", ratio=0.5)
        callbacks = providers + [selection] if order == "providers_first" else [selection] + providers[::-1]
        trainer(max_steps=2, callbacks=callbacks).fit(ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(2)))
        assert events == ["other", "arm", "probe"] * 2, (order, events)
