"""Scores and rules of every method (pure functions), the method registry, and entropy from the chunked loss pass."""

import math

import pytest
import torch

from sstoken_pl import selection
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll
from sstoken_pl.methods import METHODS, Method, get_method, register_method, resolve_options


def test_inf_scores_are_always_and_never_kept():
    resp = torch.tensor([[False, True, True, True, True, True]])
    scores = torch.tensor([[0.0, torch.inf, 0.1, 0.9, -torch.inf, 0.5]])
    # 3 finite response scores → ⌈0.6·3⌉ = 2 of them, plus the +inf one; the −inf one never
    keep = selection.top_ratio_mask(scores, resp, 0.6)
    assert keep.tolist() == [[False, True, False, True, False, True]]
    assert selection.batch_top_ratio_mask(scores, resp, 0.6).tolist() == keep.tolist()
    w = selection.weights_from_scores(scores, resp)
    assert w[0, 1] == 1 and w[0, 4] == 0 and w[0, 3] == 1 and w[0, 2] == 0 and 0 < w[0, 5] < 1


def test_weights_of_a_sample_whose_scores_all_tie_are_uniform():
    resp = torch.tensor([[False, True, True, True], [False, True, True, True], [False, True, False, False]])
    scores = torch.tensor([[0.0, 0.3, 0.3, 0.3], [0.0, 0.1, 0.5, 0.9], [0.0, 2.0, 0.0, 0.0]])
    w = selection.weights_from_scores(scores, resp)
    assert w[0].tolist() == [0.0, 1.0, 1.0, 1.0], "all tie: every token weighs alike, none is lost"
    assert w[1, 1] == 0 and w[1, 3] == 1, "a ranking still min-maxes"
    assert w[2].tolist() == [0.0, 1.0, 0.0, 0.0], "one response token: weight 1"
    scores[0, 2] = -torch.inf  # a tie among the finite ones; the −inf one still gets 0
    assert selection.weights_from_scores(scores, resp)[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_ties_are_broken_without_positional_bias():
    # All scores equal (REL ≡ 0 at step 0): the earliest-first rule drops the end of every response.
    resp = torch.ones(4000, 10, dtype=torch.bool)
    resp[:, 0] = False
    scores = torch.zeros(4000, 10)
    biased = selection.top_ratio_mask(scores, resp, 0.6)
    assert biased[:, -1].sum() == 0
    g = torch.Generator().manual_seed(0)
    keep = selection.top_ratio_mask(scores, resp, 0.6, g)
    assert (keep.sum(1) == 6).all()
    per_position = keep[:, 1:].float().mean(0)  # each of the 9 positions is kept with probability 6/9
    assert torch.allclose(per_position, torch.full((9,), 6 / 9), atol=0.03)
    # reproducible, and the scores still rule where they differ
    assert torch.equal(keep, selection.top_ratio_mask(scores, resp, 0.6, torch.Generator().manual_seed(0)))
    ranked = torch.arange(10.0).expand(3, 10)
    assert torch.equal(selection.top_ratio_mask(ranked, resp[:3], 0.6, g), selection.top_ratio_mask(ranked, resp[:3], 0.6))


def test_rho1_and_tokencleaning_scores():
    resp = torch.tensor([[False, True, True, True]])
    cur = torch.tensor([[0.0, 2.0, 0.5, 3.0]])
    ref = torch.tensor([[9.0, 0.5, 0.5, 3.5]])
    base = torch.tensor([[9.0, 4.0, 0.6, 3.0]])
    torch.testing.assert_close(selection.excess_loss_scores(cur, ref, resp), torch.tensor([[0.0, 1.5, 0.0, -0.5]]))
    torch.testing.assert_close(selection.influence_scores(base, ref, resp), torch.tensor([[0.0, 3.5, 0.1, -0.5]]))


def test_ratio_threshold_keeps_the_top_share():
    scores = torch.arange(100.0).reshape(4, 25)
    t = selection.ratio_threshold(scores, 0.6)
    assert int((scores >= t).sum()) == 60
    with_inf = torch.cat([scores.flatten(), torch.tensor([torch.inf, -torch.inf])])
    assert selection.ratio_threshold(with_inf, 0.6) == t


def test_end_of_turn_mask_marks_each_span_end():
    resp = torch.tensor([[False, True, True, False, True, True, True, False]])
    assert selection.end_of_turn_mask(resp).nonzero()[:, 1].tolist() == [2, 6]


def _qtuning_batch():
    # 8 samples, each with 5 response tokens: per-sample NLL level (error) and entropy level (uncertainty)
    err = torch.tensor([0.1, 0.2, 3.0, 3.1, 0.3, 2.9, 0.4, 2.8])
    unc = torch.tensor([0.1, 3.0, 0.2, 3.1, 2.9, 0.3, 0.25, 2.8])
    resp = torch.zeros(8, 7, dtype=torch.bool)
    resp[:, 1:6] = True
    nll = err[:, None].expand(8, 7).clone()
    nll[:, 3] += 1.0  # one harder token in each sample
    ent = unc[:, None].expand(8, 7).clone()
    return err, unc, resp, nll, ent


def test_qtuning_partition_follows_the_quadrants():
    err, unc, resp, *_ = _qtuning_batch()
    whole, prune = selection.qtuning_partition(err, unc, torch.ones(8, dtype=torch.bool), sample_ratio=0.5)
    kept = whole | prune
    assert int(kept.sum()) >= 4
    # the high/high corner (3) and the low/low corner (0) go first
    assert not kept[3] and not kept[0]
    # kept high-error/low-uncertainty samples are pruned, low-error/high-uncertainty ones kept whole
    assert all(bool(prune[i]) for i in (2, 5) if kept[i])
    assert all(bool(whole[i]) for i in (1, 4) if kept[i])
    # monotone: a larger sample ratio keeps a superset size, ratio 1 keeps everything
    parts = [selection.qtuning_partition(err, unc, torch.ones(8, dtype=torch.bool), r) for r in (0.25, 0.5, 0.75, 1.0)]
    sizes = [int((w | p).sum()) for w, p in parts]
    assert sizes == sorted(sizes) and sizes[-1] == 8 and sizes[0] >= 2


def test_qtuning_scores_prune_tokens_in_q2_samples_only():
    err, unc, resp, nll, ent = _qtuning_batch()
    scores = selection.qtuning_scores(nll, ent, resp, sample_ratio=0.5, smoothing=0.5)
    keep = selection.top_ratio_mask(scores, resp, 0.6)
    whole, prune = selection.qtuning_partition(torch.exp(err + 0.2), unc, torch.ones(8, dtype=torch.bool), 0.5)
    for b in range(8):
        n = int(keep[b].sum())
        if whole[b]:
            assert n == 5
        elif prune[b]:
            assert n == 3 and keep[b, 3], "the hardest token (and its neighbours) score highest"
        else:
            assert n == 0
    # the smoothing: (1 − λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1}), the token itself standing in at the span's ends
    b = int(prune.nonzero()[0])
    p = torch.exp(nll[b])
    assert math.isclose(float(scores[b, 3]), float(0.5 * p[3] + 0.5 * (p[2] + p[4])), rel_tol=1e-5)
    assert math.isclose(float(scores[b, 1]), float(0.5 * p[1] + 0.5 * (p[1] + p[2])), rel_tol=1e-5)


def test_entropy_from_the_chunked_pass_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    nll, ent = per_token_nll(logits, labels, chunk_size=3, with_entropy=True)
    logp = torch.log_softmax(logits[:, :-1].detach(), -1)
    expected = -(logp.exp() * logp).sum(-1)
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(ent[:, 1:], torch.where(valid, expected, 0.0), atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad
    # the NLL and its gradient are those of the NLL-only pass
    nll.sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    per_token_nll(logits, labels, chunk_size=3).sum().backward()
    torch.testing.assert_close(g, logits.grad)


def test_registry_and_options():
    assert {"sstoken", "random", "rho1", "tokencleaning", "qtuning"} <= set(METHODS)
    assert get_method("sstoken").needs({"gamma": 0.0}) == {"attention"}
    assert get_method("sstoken").needs({"gamma": 1.0}) == {"nll", "history_nll"}
    assert get_method("rho1").rule == "batch_top" and get_method("tokencleaning").rule == "global_threshold"
    assert resolve_options(get_method("qtuning_paper"), {"sample_ratio": 0.25}) == {"sample_ratio": 0.25, "smoothing": 0.5}
    assert resolve_options(get_method("qtuning"), {}) == {"sample_ratio": 0.25, "smoothing": 0.5}
    assert get_method("qtuning").needs({}) == {"nll", "sequence_entropy", "attended"}
    with pytest.raises(ConfigError, match="not options of method 'qtuning'"):
        resolve_options(get_method("qtuning"), {"gamma": 0.5})
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("rho2")
    with pytest.raises(ConfigError, match="cannot import"):
        get_method("no_such_module:THING")


def test_a_new_method_is_a_score_function():
    def loss_score(inputs, resp, options, generator):
        return torch.where(resp, inputs["nll"], 0.0)

    m = register_method(Method("high_loss", lambda o: frozenset({"nll"}), loss_score, "batch_top"))
    try:
        assert get_method("high_loss") is m
        assert get_method("tests.test_methods:EXAMPLE").name == "example"
    finally:
        METHODS.pop("high_loss")


EXAMPLE = Method("example", lambda o: frozenset(), lambda i, r, o, g: r.float())
