"""Q-Tuning as the authors' code runs it (``sstoken_pl.qtuning``, ``callbacks.SequenceEntropy``)."""

import pytest
import torch

from sstoken_pl import qtuning
from sstoken_pl.callbacks import SequenceEntropy
from sstoken_pl.callbacks.sequence_entropy import attended_positions, entropy_at
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll
from sstoken_pl.models import unwrap
from tests.helpers import ForeignModule, loader, random_batches, trainer
from tests.test_methods_training import Spy


def test_quadrants_bisect_one_level_on_both_axes():
    ppl = torch.arange(1.0, 9.0)  # 1..8
    ent = torch.arange(8.0, 0.0, -1.0)  # 8..1: anti-correlated, so Q2 and Q4 fill up
    # α = 0.245 (the first level): q_α = 2.715, q_{1−α} = 6.285 on both axes → Q2 {ppl 7, 8}, Q4 {ppl 1, 2}: 4 of 8
    q2, q4 = qtuning.eu_quadrants(ppl, ent, 0.5)
    assert q2.nonzero().flatten().tolist() == [6, 7] and q4.nonzero().flatten().tolist() == [0, 1]
    # 0.5 > 0.25 → α = 0.1225: q_α = 1.8575, q_{1−α} = 7.1425 → one sample in each
    q2, q4 = qtuning.eu_quadrants(ppl, ent, 0.25)
    assert q2.nonzero().flatten().tolist() == [7] and q4.nonzero().flatten().tolist() == [0]


def test_triage_fills_up_by_distance_from_the_diagonal():
    ppl = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    ent = ppl.clone()  # perfectly correlated: Q2 and Q4 are empty at every level
    ent[2], ent[5] = 8.0, 1.0  # sample 2: low error, high uncertainty (Q4-like); 5: the reverse (Q2-like)
    q2, q4 = qtuning.eu_quadrants(ppl, ent, 0.5)
    kept, pruned = qtuning.triage(ppl, ent, 0.5)
    assert int(kept.sum()) == 4, "filled up to round(0.5 · 8)"
    assert kept[2] and kept[5] and not pruned[2] and pruned[5]
    assert ((q2 | q4) & ~kept).sum() == 0


def test_smoothed_ppl_neighbours():
    nll = torch.tensor([[0.0, 0.0, 1.0, 2.0, 0.0, 0.0]])  # positions 2, 3 are the response
    attended = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])  # 1: prompt, 4-5: padding
    s = qtuning.smoothed_ppl(nll, attended, 0.5)
    e = torch.exp(torch.tensor([1.0, 2.0]))
    assert torch.isclose(s[0, 2], 0.5 * e[0] + 0.5 * (1.0 + e[1])), "a prompt neighbour counts exp(0) = 1"
    assert torch.isclose(s[0, 3], 0.5 * e[1] + 0.5 * (e[0] + 0.0)), "a padding neighbour counts 0"


def _batch(seed=0, B=8, T=12):
    g = torch.Generator().manual_seed(seed)
    attended = torch.ones(B, T, dtype=torch.bool)
    attended[:, 0] = False
    resp = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start, end = 3 + b % 3, T - (b % 2)
        resp[b, start:end] = True
        attended[b, end:] = False
    nll = torch.where(resp, torch.rand(B, T, generator=g) * 3, 0.0)
    ent = torch.where(attended, torch.rand(B, T, generator=g) * 3, 0.0)
    return nll, ent, attended, resp


@pytest.mark.parametrize("sample_ratio,ratio", [(0.5, 0.7), (0.25, 0.5), (0.5, 1.0)])
def test_mask_meets_the_batch_budget_by_dropping_the_highest_smoothed_ppl(sample_ratio, ratio):
    nll, ent, attended, resp = _batch()
    mask = qtuning.qtuning_mask(nll, ent, attended.float(), resp, sample_ratio, ratio, 0.5)
    ppl = torch.exp(nll.sum(1) / resp.sum(1))
    h = ent.sum(1) / attended.sum(1)
    kept, pruned = qtuning.triage(ppl, h, sample_ratio)
    assert not (mask & ~kept[:, None]).any(), "dropped samples train on nothing"
    for b in torch.nonzero(kept & ~pruned).flatten().tolist():
        assert torch.equal(mask[b], resp[b]), "Q4 samples are kept whole"
    A = int(attended.sum())
    drop_target = A - round(A * sample_ratio * ratio)
    dropped_by_samples = int(attended[~kept].sum())
    candidates = resp & (kept & pruned)[:, None]
    n_drop = min(max(0, drop_target - dropped_by_samples), int(candidates.sum())) if ratio < 1 else 0
    assert int((candidates & ~mask).sum()) == n_drop
    if 0 < n_drop < int(candidates.sum()):
        s = qtuning.smoothed_ppl(nll, attended.float(), 0.5)
        assert s[candidates & ~mask].min() >= s[candidates & mask].max(), "the highest smoothed PPL is dropped"
    scores = qtuning.qtuning_scores(nll, ent, attended.float(), resp, sample_ratio, ratio, 0.5)
    assert torch.equal(scores == torch.inf, mask)


def test_sequence_entropy_matches_the_full_logits(tiny_llama):
    batch = random_batches(1, batch_size=3)[0]
    hidden = {}
    base = unwrap(tiny_llama)
    h = base.get_decoder().register_forward_hook(lambda m, a, o: hidden.update(h=o.last_hidden_state))
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    h.remove()
    att = attended_positions(batch)
    got = entropy_at(hidden["h"], base.get_output_embeddings(), att)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    expected = torch.where(att[:, 1:], -(logp.exp() * logp).sum(-1), 0.0)
    torch.testing.assert_close(got[:, 1:], expected, atol=1e-5, rtol=1e-5)
    assert (got[:, 0] == 0).all()
    prompt = att & (batch["labels"] == -100)
    assert prompt.any() and (got[prompt] > 0).all(), "prompt positions have their entropy"


class ValuesSpy(Spy):
    """Also records the provided inputs (``sequence_entropy``, ``attended``) each selection used."""

    def _gather(self, pl_module, batch, inputs, names):
        values = super()._gather(pl_module, batch, inputs, names)
        self.values = getattr(self, "values", []) + [{k: v.clone() for k, v in values.items()}]
        return values


def test_qtuning_trains_with_the_release_selection(tiny_llama):
    spy = ValuesSpy(method="qtuning", ratio=0.7, options={"sample_ratio": 0.5})
    trainer(max_steps=2, callbacks=[SequenceEntropy(), spy]).fit(
        ForeignModule(tiny_llama, lr=0.5), train_dataloaders=loader(random_batches(2, batch_size=8))
    )
    assert len(spy.seen) == 2 and len(spy.values) == 2
    for s, v in zip(spy.seen, spy.values):
        b, resp = s["batch"], s["resp"]
        att = attended_positions(b)
        assert torch.equal(v["attended"].bool(), att)
        prompt = att & ~resp
        assert (v["sequence_entropy"][prompt] > 0).all(), "the entropy covers the prompt"
        # the callback applied exactly the release's mask of the step's own inputs
        expected = qtuning.qtuning_mask(v["nll"], v["sequence_entropy"], v["attended"], resp, 0.5, 0.7, 0.5)
        assert torch.equal(s["kept"].bool(), expected)
        assert 0 < int(s["kept"].sum()) < int(resp.sum())


def test_qtuning_without_sequence_entropy_is_one_clear_error(tiny_llama):
    with pytest.raises(ConfigError, match="SequenceEntropy"):
        trainer(max_steps=1, callbacks=[Spy(method="qtuning")]).fit(
            ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(1))
        )
