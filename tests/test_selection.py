import math

import pytest
import torch

from sstoken_pl import selection
from sstoken_pl.errors import ConfigError
from sstoken_pl.selection import (
    batch_top_ratio_mask,
    kept_count,
    minmax_per_sample,
    sstoken_scores,
    threshold_mask,
    top_ratio_mask,
)


def test_sstoken_scores_hand_computed():
    # One sample, positions 0..4; response = positions 2, 3, 4.
    resp = torch.tensor([[False, False, True, True, True]])
    cur = torch.tensor([[0.0, 0.0, 1.0, 2.0, 0.5]])
    his = torch.tensor([[9.0, 9.0, 3.0, 2.5, 0.5]])
    attn = torch.tensor([[0.9, 0.9, 0.8, 0.2, 0.5]])
    # REL = his - cur = [2.0, 0.5, 0.0] -> minmax = [1, 0.25, 0]
    s = sstoken_scores(cur, his, attn, resp, gamma=0.5)
    expected = torch.tensor([[0.0, 0.0, 0.5 * 1 + 0.5 * 0.8, 0.5 * 0.25 + 0.5 * 0.2, 0.5 * 0.0 + 0.5 * 0.5]])
    torch.testing.assert_close(s, expected, atol=1e-6, rtol=0)
    # ratio 0.6 of R=3 keeps ceil(1.8)=2: positions 2 (0.9) and 4 (0.25), not 3 (0.225)
    keep = top_ratio_mask(s, resp, 0.6)
    assert keep.tolist() == [[False, False, True, False, True]]


def test_rel_is_zero_when_history_equals_current():
    resp = torch.tensor([[False, True, True, True]])
    loss = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    attn = torch.tensor([[0.0, 0.3, 0.1, 0.2]])
    s = sstoken_scores(loss, loss.clone(), attn, resp, gamma=0.5)
    torch.testing.assert_close(s, 0.5 * attn * resp)


def test_minmax_ignores_non_response_positions():
    resp = torch.tensor([[False, True, True], [True, True, False]])
    x = torch.tensor([[100.0, 1.0, 3.0], [-2.0, 2.0, -50.0]])
    out = minmax_per_sample(x, resp)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_gamma_extremes_need_only_one_input():
    resp = torch.tensor([[False, True, True]])
    loss = torch.tensor([[0.0, 1.0, 2.0]])
    attn = torch.tensor([[0.0, 0.7, 0.1]])
    torch.testing.assert_close(sstoken_scores(loss, None, attn, resp, gamma=0.0), attn)
    s = sstoken_scores(loss, loss + torch.tensor([[0.0, 3.0, 1.0]]), None, resp, gamma=1.0)
    torch.testing.assert_close(s, torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        sstoken_scores(loss, None, attn, resp, gamma=0.5)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 0.75, 1.0])
def test_kept_count_is_ceil_ratio_r(ratio):
    torch.manual_seed(0)
    B, T = 16, 40
    resp = torch.rand(B, T) > 0.3
    resp[:, 0] = False
    resp[3] = False  # a sample with no response token
    keep = top_ratio_mask(torch.randn(B, T), resp, ratio)
    for b in range(B):
        R = int(resp[b].sum())
        expected = 0 if R == 0 else math.ceil(round(ratio * R, 6))
        assert int(keep[b].sum()) == expected
    assert not (keep & ~resp).any()


def test_kept_count_floating_point_rounding():
    # 0.6 * 5 is 3.0000000000000004 in floating point; the paper's ⌈ρR⌉ is 3.
    assert kept_count(torch.tensor([5, 10, 1, 0]), 0.6).tolist() == [3, 6, 1, 0]


def test_top_ratio_picks_highest_scores():
    resp = torch.ones(1, 6, dtype=torch.bool)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]])
    assert top_ratio_mask(scores, resp, 0.5).tolist() == [[False, True, False, True, False, True]]


def test_global_ranking_uses_one_threshold():
    resp = torch.ones(2, 4, dtype=torch.bool)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    keep = batch_top_ratio_mask(scores, resp, 0.5)
    assert keep.tolist() == [[True, True, True, True], [False, False, False, False]]
    per_sample = top_ratio_mask(scores, resp, 0.5)
    assert per_sample.sum(1).tolist() == [2, 2]


def test_threshold_mask():
    resp = torch.tensor([[False, True, True]])
    assert threshold_mask(torch.tensor([[5.0, 0.5, 0.1]]), resp, 0.2).tolist() == [[False, True, False]]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        top_ratio_mask(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), ratio)


@pytest.mark.parametrize("gamma", [-0.01, 1.01])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        sstoken_scores(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), gamma)


def test_selection_stats_counts_noise_dropped_and_clean_kept():
    resp = torch.tensor([[False, True, True, True, True], [False, False, True, True, False]])
    noise = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 0, 1]])  # the last noise flag is outside the response
    kept = torch.tensor([[False, False, True, False, True], [False, False, False, True, True]])
    nll = torch.tensor([[9.0, 1.0, 1.0, 1.0, 1.0], [9.0, 9.0, 2.0, 2.0, 9.0]])
    stats = selection.selection_stats({"nll": nll, "history_nll": nll + 0.5}, resp, kept, noise)
    assert stats["selection/kept_fraction"].item() == pytest.approx(3 / 6)
    assert stats["selection/noise_dropped"].item() == pytest.approx(2 / 3)  # noise at (0,1) and (1,2) dropped, (0,4) kept
    assert stats["selection/clean_kept"].item() == pytest.approx(2 / 3)  # clean (0,2), (0,3), (1,3): two kept
    assert stats["selection/rel_mean"].item() == pytest.approx(0.5)
    assert "selection/attn_mean" not in stats
    weights = selection.selection_stats({}, resp, resp.float() * 0.5)
    assert set(weights) == {"selection/kept_fraction"} and weights["selection/kept_fraction"].item() == pytest.approx(0.5)
