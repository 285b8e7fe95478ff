"""GRPO math against hand-computed numbers (the arithmetic is in the comments)."""

import math

import pytest
import torch

from stages.algo.grpo import (
    aggregate,
    group_advantages,
    kl_in_reward,
    kl_penalty,
    masked_mean,
    policy_loss,
)


def _close(actual, expected, tol=1e-5):
    assert torch.allclose(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=tol,
    ), f"{actual} != {expected}"


def _one_token(ratio, advantage, **kwargs):
    """policy_loss on a single token with the given ratio; returns loss, stats, grad."""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, stats = policy_loss(logp, old, torch.tensor([advantage]), torch.ones(1, 1), **kwargs)
    loss.backward()
    return loss.item(), stats, logp.grad.item()


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_unbiased_std():
    # mean 0.5, deviations +-0.5; unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
    # A = +-0.5 / (0.57735 + 1e-6) = +-0.866024 (the biased std 0.5 would give +-1.0)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    _close(adv, [0.866024, -0.866024, -0.866024, 0.866024])


def test_group_advantages_are_per_group_and_ties_give_zero():
    # group 1: [1, 2, 3], mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]
    # group 2: [5, 5, 5], all equal: 0 / (0 + eps) = 0 (a global mean would give 5 - 3.5)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    _close(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_group_advantages_group_of_one_is_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))


def test_group_advantages_centre_only():
    # [0, 4, 2]: mean 2 -> [-2, 2, 0], no division
    adv = group_advantages(torch.tensor([0.0, 4.0, 2.0]), group_size=3, scale_by_std=False)
    _close(adv, [-2.0, 2.0, 0.0])


def test_group_advantages_int_rewards_become_float():
    # [1, 0]: mean 0.5, unbiased std sqrt(0.25 * 2 / 1) = 0.70711 -> +-0.70711
    adv = group_advantages(torch.tensor([1, 0]), group_size=2)
    assert adv.is_floating_point()
    _close(adv, [0.707106, -0.707106])


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="divisible by group_size=4"):
        group_advantages(torch.zeros(6), group_size=4)


# ----------------------------------------------------------------------------- KL


LOGP = torch.tensor([0.0, -1.0, -2.0])
REF = torch.tensor([0.0, -2.0, -1.0])


def test_kl_k1():
    # logp - ref = [0, 1, -1]
    _close(kl_penalty(LOGP, REF, "k1"), [0.0, 1.0, -1.0])


def test_kl_k2():
    # 0.5 * [0, 1, -1]^2
    _close(kl_penalty(LOGP, REF, "k2"), [0.0, 0.5, 0.5])


def test_kl_k3():
    # d = ref - logp = [0, -1, 1]; exp(d) - d - 1 = [0, e^-1 + 1 - 1, e - 1 - 1]
    _close(kl_penalty(LOGP, REF, "k3"), [0.0, 0.367879, 0.718282])


def test_kl_k3_is_non_negative():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, generator=gen) * 3, torch.randn(64, generator=gen) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="unknown KL kind 'k4'"):
        kl_penalty(LOGP, REF, "k4")


# ----------------------------------------------------------------------------- policy loss


def test_ratio_inside_band_is_unclipped():
    # ratio 1.1 in [0.8, 1.2], A = 2: loss = -2 * 1.1 = -2.2; d/dlogp = -A * ratio = -2.2
    loss, stats, grad = _one_token(1.1, 2.0)
    _close(loss, -2.2)
    _close(grad, -2.2)
    assert stats["clip_frac"] == 0.0


def test_ratio_above_band_positive_advantage_is_clipped():
    # ratio 1.5, A = 1: max(-1.5, -1 * 1.2) = -1.2, constant in logp -> grad 0
    loss, stats, grad = _one_token(1.5, 1.0)
    _close(loss, -1.2)
    assert grad == 0.0
    assert stats["clip_frac"] == 1.0


def test_ratio_above_band_negative_advantage_is_not_clipped():
    # ratio 1.5, A = -1: max(1.5, 1.2) = 1.5, the unclipped branch; grad = ratio = 1.5
    loss, stats, grad = _one_token(1.5, -1.0)
    _close(loss, 1.5)
    _close(grad, 1.5)
    assert stats["clip_frac"] == 0.0


def test_ratio_below_band_negative_advantage_is_clipped():
    # ratio 0.5, A = -1: max(0.5, 0.8) = 0.8, constant -> grad 0
    loss, stats, grad = _one_token(0.5, -1.0)
    _close(loss, 0.8)
    assert grad == 0.0
    assert stats["clip_frac"] == 1.0


def test_ratio_below_band_positive_advantage_is_not_clipped():
    # ratio 0.5, A = 1: max(-0.5, -0.8) = -0.5
    loss, stats, _ = _one_token(0.5, 1.0)
    _close(loss, -0.5)
    assert stats["clip_frac"] == 0.0


def test_asymmetric_clip_high():
    # ratio 1.25, A = 1: inside [0.8, 1.28] -> -1.25; with the default 1.2 bound -> -1.2
    _close(_one_token(1.25, 1.0, clip_high=0.28)[0], -1.25)
    _close(_one_token(1.25, 1.0)[0], -1.2)


def test_dual_clip_bounds_negative_advantage_with_huge_ratio():
    # ratio e^3 = 20.0855, A = -1: max(20.0855, 1.2) = 20.0855; dual c = 3: min(20.0855, 3) = 3
    loss, stats, grad = _one_token(math.exp(3.0), -1.0, dual_clip=3.0)
    _close(loss, 3.0)
    assert grad == 0.0
    assert stats["dual_clip_frac"] == 1.0
    assert stats["clip_frac"] == 0.0
    loss_plain, stats_plain, _ = _one_token(math.exp(3.0), -1.0)
    _close(loss_plain, 20.085537)
    assert "dual_clip_frac" not in stats_plain


def test_dual_clip_leaves_positive_advantage_alone():
    # ratio e^3, A = +1: max(-20.09, -1.2) = -1.2; the -A c bound (-3) is not applied to A > 0
    loss, stats, _ = _one_token(math.exp(3.0), 1.0, dual_clip=3.0)
    _close(loss, -1.2)
    assert stats["dual_clip_frac"] == 0.0


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        _one_token(1.0, 1.0, dual_clip=1.0)


def test_huge_log_ratio_stays_finite():
    # log-ratio 100 is clamped to 20: loss = -(-1) * e^20
    loss, _, _ = _one_token(math.exp(100.0), -1.0)
    _close(loss, math.exp(20.0))


def test_masked_tokens_do_not_touch_loss_or_gradient():
    # Third token is padding holding garbage (NaN logp). Ratio 1 elsewhere, A = -1:
    # tokens [1, 1] -> token-mean 1.0; grad = ratio / 2 = 0.5 on each real token.
    logp = torch.tensor([[0.0, 0.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), mask)
    loss.backward()
    _close(loss.item(), 1.0)
    assert logp.grad[0, 2].item() == 0.0
    _close(logp.grad[0, :2], [0.5, 0.5])
    assert all(math.isfinite(v) for v in stats.values())


def test_gradient_lowers_negative_and_raises_positive_advantage_tokens():
    # Loss = -A * ratio; d/dlogp = -A * ratio / n_tokens: positive for A < 0, so a descent
    # step lowers those tokens' log-probs, and raises those of A > 0.
    logp = torch.full((2, 2), -1.0, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([-1.0, 1.0]), torch.ones(2, 2))
    loss.backward()
    _close(logp.grad, [[0.25, 0.25], [-0.25, -0.25]])
    with torch.no_grad():
        stepped = logp - 0.1 * logp.grad
    assert (stepped[0] < logp[0]).all() and (stepped[1] > logp[1]).all()


AGG_TOKENS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
AGG_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", 2.5),  # (1 + 2 + 3 + 4) / 4
        ("seq-mean-token-mean", 3.0),  # (6/3 + 4/1) / 2
        ("seq-mean-token-sum", 5.0),  # (6 + 4) / 2
    ],
)
def test_aggregate_ragged(agg, expected):
    _close(aggregate(AGG_TOKENS, AGG_MASK, agg).item(), expected)


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", -0.25),  # tokens [-1, -1, -1 | 2]: (-3 + 2) / 4
        ("seq-mean-token-mean", 0.5),  # (-1 + 2) / 2
        ("seq-mean-token-sum", -0.5),  # (-3 + 2) / 2
    ],
)
def test_policy_loss_agg_modes(agg, expected):
    # ratio 1 everywhere, so each token's loss is -A: row 0 A = 1, row 1 A = -2.
    logp = torch.zeros(2, 3)
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0, -2.0]), AGG_MASK, agg=agg)
    _close(loss.item(), expected)


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", 2.0),  # (1 + 3) / 2
        ("seq-mean-token-mean", 2.0),  # only row 0 has tokens: 4 / 2
        ("seq-mean-token-sum", 4.0),  # only row 0: 1 + 3
    ],
)
def test_aggregate_empty_sequence_is_left_out(agg, expected):
    tokens = torch.tensor([[1.0, 3.0, 100.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    _close(aggregate(tokens, mask, agg).item(), expected)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_all_masked_batch_gives_zero_and_zero_grad(agg):
    logp = torch.zeros(2, 3, requires_grad=True)
    advantages, mask = torch.tensor([1.0, -1.0]), torch.zeros(2, 3)
    loss, stats = policy_loss(logp, logp.detach(), advantages, mask, agg=agg)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(2, 3))
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 0.0


def test_unknown_agg():
    with pytest.raises(ValueError, match="unknown agg 'mean'"):
        aggregate(AGG_TOKENS, AGG_MASK, "mean")
    with pytest.raises(ValueError, match="unknown agg 'mean'"):
        policy_loss(AGG_TOKENS, AGG_TOKENS, torch.zeros(2), AGG_MASK, agg="mean")


def test_stats_on_constructed_batch():
    # row 0, A = +1, ratios [1.0, 1.5, 0.5, (2.0 masked)]: clipped where ratio > 1.2 -> 1 token
    # row 1, A = -1, ratios [0.5, 1.5, 1.0, 0.7]: clipped where ratio < 0.8 -> 2 tokens
    # clip_frac = 3 / 7; ratio_mean = (1 + 1.5 + 0.5 + 0.5 + 1.5 + 1 + 0.7) / 7 = 6.7 / 7
    # approx_kl = mean k3 = 1/r + ln r - 1: r=1.5 -> 0.072132, 0.5 -> 0.306853, 0.7 -> 0.071896
    #   (0 + 0.072132 + 0.306853 + 0.306853 + 0.072132 + 0 + 0.071896) / 7 = 0.118552
    ratios = torch.tensor([[1.0, 1.5, 0.5, 2.0], [0.5, 1.5, 1.0, 0.7]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    _, stats = policy_loss(ratios.log(), torch.zeros_like(ratios), torch.tensor([1.0, -1.0]), mask)
    _close(stats["clip_frac"], 3 / 7)
    _close(stats["ratio_mean"], 6.7 / 7)
    _close(stats["approx_kl"], 0.118552)
    assert all(isinstance(v, float) for v in stats.values())


def test_policy_loss_rejects_mismatched_advantages():
    with pytest.raises(ValueError, match="advantages has 3 entries for a batch of 2"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


# ----------------------------------------------------------------------------- helpers


def test_masked_mean():
    x = torch.tensor([[1.0, float("nan")], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    _close(masked_mean(x, mask).item(), 1.0)  # only x[0, 0]; the NaN is ignored
    _close(masked_mean(x, mask, dim=1), [1.0, 0.0])  # row 1 has no tokens -> 0
    _close(masked_mean(x, torch.tensor([[1, 0], [1, 1]]), dim=0), [2.0, 4.0])  # (1+3)/2, 4/1


def test_kl_in_reward_k1():
    # row 0: k1 = [0, 1, (-1 masked)] -> sum 1; 1.0 - 0.1 * 1 = 0.9
    # row 1: k1 = [1, 1, 1] -> sum 3; 0.0 - 0.1 * 3 = -0.3
    logp = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -2.0, -1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = kl_in_reward(torch.tensor([1.0, 0.0]), logp, ref, mask, coef=0.1, kind="k1")
    _close(out, [0.9, -0.3])
    assert not out.requires_grad


def test_kl_in_reward_k3():
    # row 0: k3 = [0, e^-1 = 0.367879, (masked)] -> 1.0 - 0.1 * 0.367879 = 0.963212
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[0.0, -2.0, -1.0]])
    out = kl_in_reward(torch.tensor([1.0]), logp, ref, torch.tensor([[1, 1, 0]]), 0.1, "k3")
    _close(out, [0.963212])


def test_pad_rows_pads_ragged_rows_and_masks_them():
    from stages.algo.grpo import pad_rows

    vals, mask = pad_rows([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])])
    assert vals.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    empty_vals, empty_mask = pad_rows([])
    assert empty_vals.shape == (0, 1) and empty_mask.shape == (0, 1)


def test_grpo_loss_is_policy_loss_plus_weighted_kl():
    from stages.algo.grpo import grpo_loss

    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.2, -2.0], [-0.4, 0.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    pl, _ = grpo_loss(logp, old, None, adv, mask)
    # token losses: max(-A r, -A clip(r)): r = e^0.2 -> clipped 1.2 for A>0 (take -1.2 vs -1.2214: max -1.2);
    # token 2: r = 1 -> -1; row 2 token 1: r = e^-0.1 = 0.9048, A = -1 -> max(0.9048, 0.9048) = 0.9048
    expected_pl = (-1.2 - 1.0 + math.exp(-0.1)) / 3
    assert float(pl) == pytest.approx(expected_pl, abs=1e-6)
    total, stats = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.5, kl_kind="k1")
    k1 = ((-1.0 + 1.5) + (-2.0 + 1.0) + (-0.5 + 1.5)) / 3  # logp - ref over the 3 masked tokens: 0.5 / 3
    assert stats["kl"] == pytest.approx(k1, abs=1e-6)
    assert float(total) == pytest.approx(expected_pl + 0.5 * k1, abs=1e-6)


# ----------------------------------------------------------------------------- mini-batch semantics

# Two groups of very different response lengths, one sequence each at ratio 1 (loss -A per
# token): group 1 has 1 token at A = +1, group 2 has 4 tokens at A = -1 (-> +1 per token).
LONG_SHORT_MASK = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
LONG_SHORT_ADV = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize(
    "agg, expected_loss, expected_grad",
    [
        # token mean over the batch: (-1 + 4) / 5; d/dlogp of -A r / 5 = -A / 5 per token
        ("token-mean", 3 / 5, [[-0.2, 0, 0, 0], [0.2, 0.2, 0.2, 0.2]]),
        # mean of the groups' token means (the old per-group average): (-1 + 1) / 2
        ("seq-mean-token-mean", 0.0, [[-0.5, 0, 0, 0], [0.125, 0.125, 0.125, 0.125]]),
        # mean of token sums: (-1 + 4) / 2
        ("seq-mean-token-sum", 1.5, [[-0.5, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]]),
        # Dr. GRPO, horizon 8: (-1 + 4) / (2 * 8)
        ("seq-mean-token-sum-norm", 3 / 16, [[-1 / 16, 0, 0, 0], [1 / 16, 1 / 16, 1 / 16, 1 / 16]]),
    ],
)
def test_loss_and_gradient_over_groups_of_different_lengths(agg, expected_loss, expected_grad):
    logp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), LONG_SHORT_ADV, LONG_SHORT_MASK, agg=agg, horizon=8)
    loss.backward()
    _close(loss.item(), expected_loss)
    _close(logp.grad, expected_grad)


def _random_minibatch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.6
    ref = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    lengths = [1, 6, 3, 5]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    adv = torch.tensor([1.5, -0.5, 0.7, -1.2], dtype=torch.float64)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_one_micro_batch_of_four_equals_four_of_one(agg, kl_kind):
    from stages.algo.grpo import grpo_loss, loss_denominator

    logp, old, ref, adv, mask = _random_minibatch()
    kw = dict(clip_low=0.2, clip_high=0.28, agg=agg, kl_coef=0.1, kl_kind=kl_kind, horizon=8)
    whole = logp.clone().requires_grad_(True)
    loss_whole, _ = grpo_loss(whole, old, ref, adv, mask, **kw)
    loss_whole.backward()

    denom = sum(loss_denominator(mask[b:b + 1], agg, horizon=8) for b in range(4))
    assert denom == loss_denominator(mask, agg, horizon=8)
    parts = logp.clone().requires_grad_(True)
    total = 0.0
    for b in range(4):  # each micro-batch backward on its own, as gradient accumulation does
        loss, _ = grpo_loss(parts[b:b + 1], old[b:b + 1], ref[b:b + 1], adv[b:b + 1], mask[b:b + 1],
                            denom=denom, **kw)
        loss.backward()
        total += loss.item()
    _close(total, loss_whole.item(), tol=1e-12)
    _close(parts.grad, whole.grad, tol=1e-12)


def test_dropped_groups_leave_the_denominator():
    from stages.algo.grpo import loss_denominator

    # group 2 dropped (zero variance): masked out, so it neither adds loss nor counts.
    logp = torch.zeros(2, 4, dtype=torch.float64)
    kept = LONG_SHORT_MASK.clone()
    kept[1] = 0
    loss, _ = policy_loss(logp, logp, LONG_SHORT_ADV, kept)
    _close(loss.item(), -1.0)  # group 1's one token alone, not (-1 + 0) / 5
    assert loss_denominator(kept, "token-mean") == 1.0
    assert loss_denominator(kept, "seq-mean-token-sum") == 1.0


def test_k3_is_clamped_as_verl_low_var_kl():
    # ref - logp = 4.9: raw k3 = e^4.9 - 4.9 - 1 = 128.4 (verl/Long-RL: clamped to 10)
    logp, ref = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([4.9, -30.0, 0.5])
    raw = kl_penalty(logp, ref, "k3", clamp=False)
    _close(raw[0], math.exp(4.9) - 4.9 - 1)
    clamped = kl_penalty(logp, ref, "k3")
    # -30 -> log ratio clamped to -20: e^-20 + 20 - 1 = 19.0 -> value clamped to 10
    _close(clamped, [10.0, 10.0, math.exp(0.5) - 0.5 - 1])
    assert kl_penalty(logp, ref, "k1", clamp=True).tolist() == kl_penalty(logp, ref, "k1", clamp=False).tolist()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("poison", [float("nan"), float("-inf"), float("inf")])
def test_padding_never_poisons_the_gradient(agg, kl_kind, poison):
    from stages.algo.grpo import grpo_loss

    logp, old, ref, adv, mask = _random_minibatch(seed=3)
    clean = logp.clone().requires_grad_(True)
    loss_clean, _ = grpo_loss(clean, old, ref, adv, mask, agg=agg, kl_coef=0.1, kl_kind=kl_kind,
                              kl_clamp=False)
    loss_clean.backward()
    pad = ~mask
    dirty = torch.where(pad, torch.full_like(logp, poison), logp).requires_grad_(True)
    old_d = torch.where(pad, torch.full_like(old, poison), old)
    ref_d = torch.where(pad, torch.full_like(ref, -poison if poison == poison else poison), ref)
    loss, _ = grpo_loss(dirty, old_d, ref_d, adv, mask, agg=agg, kl_coef=0.1, kl_kind=kl_kind, kl_clamp=False)
    loss.backward()
    assert torch.isfinite(dirty.grad).all()
    assert torch.equal(dirty.grad[pad], torch.zeros_like(dirty.grad[pad]))
    _close(loss.item(), loss_clean.item(), tol=1e-12)
    _close(dirty.grad, clean.grad, tol=1e-12)
