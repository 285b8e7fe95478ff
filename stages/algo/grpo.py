"""GRPO math: group advantages, KL estimators and the clipped policy loss.

The paper (LongVILA-R1, arXiv 2507.07966, Sec. 4) trains with GRPO. For a question q the
old policy samples a group of G outputs o_1..o_G with rewards r_1..r_G, and the policy
maximises

    J(theta) = E[ 1/G sum_i ( min( rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i )
                              - beta D_KL(pi_theta || pi_ref) ) ],            (1)
    rho_i = pi_theta(o_i | q) / pi_theta_old(o_i | q),

    A_i = (r_i - mean({r_1..r_G})) / std({r_1..r_G}).                          (2)

`policy_loss` returns the negation of the first term of (1) as a loss to minimise,
`group_advantages` is (2), `kl_penalty` gives the per-token estimate of the KL term, and
`aggregate` reduces it the same way as the policy term. Where this departs from the
equations as printed:

- The ratio is per token, `exp(logp_t - old_logp_t)`, and `A_i` is shared by every token
  of output i (as DeepSeekMath, verl and the released Long-RL code do). The default
  reduction is `token-mean` over the whole batch (DAPO, verl) rather than the 1/G mean of
  per-sequence means; `seq-mean-token-mean` gives the latter.
- The std in (2) is the unbiased one (torch.std, correction=1), with `eps` added to the
  denominator so an all-equal group gives advantage 0 instead of 0/0. A group of one
  output has no spread and gets advantage 0.
- The clip band may be asymmetric (`clip_low`, `clip_high`, DAPO's clip-higher), and the
  dual clip of Ye et al. 2020 ("Mastering Complex Control in MOBA Games with Deep RL",
  verl `compute_policy_loss`) can bound the loss of negative-advantage tokens whose ratio
  has grown very large.
- The log-ratio is clamped to [-20, 20] before `exp`, as verl does, so one bad token
  cannot overflow the loss to inf; this only touches ratios beyond ~5e8.
- The KL term can either be added to the loss (`kl_penalty` + `aggregate`) or folded into
  the sequence reward before (2) (`kl_in_reward`). k3 is clamped as verl's and Long-RL's
  `low_var_kl` compute it (log-ratio to [-20, 20], the value to [-10, 10]): one token whose
  reference log-prob is far above the policy's (a log ratio of 4.9 gives k3 = 128) would
  otherwise dominate the loss of the whole batch. `clamp=False` gives the raw estimator.

The batch of a loss is the optimizer step's mini-batch, not the tensor at hand: the
reductions take a `denom` (`loss_denominator` of every micro-batch of the mini-batch, on
every data-parallel rank, added up), so the micro-batches' losses add up to the mini-batch's
loss and 1 x 4 and 4 x 1 micro-batches give the same gradient (verl's global token count).
Without `denom` the tensor at hand is the whole batch.

Masked (prompt or padding) positions are replaced by 0 with `torch.where` before any
arithmetic, never multiplied by 0, so a NaN or inf there can reach neither the loss nor
the gradient: their gradient is exactly 0 for every KL kind and aggregation.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# verl clamps the log-ratio to this range before exp, and low_var_kl's k3 value to the
# second; see the module docstring.
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0


def group_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """Return group-normalised advantages, Eq. (2).

    rewards: [B*G], group-contiguous (rewards[g*G:(g+1)*G] are one question's outputs).
    Returns: [B*G] float, `(r - mean_g) / (std_g + eps)` with the unbiased std, or only
    `r - mean_g` when `scale_by_std` is False. A group of size 1 gives 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not divisible by group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if group_size == 1:
        # std of one sample is undefined (NaN with correction=1); there is no signal.
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str, clamp: bool = True) -> Tensor:
    """Return the per-token KL(pi || pi_ref) estimate, same shape as `logp`.

    logp, ref_logp: [...] log-probs of the sampled tokens under the policy and the
    reference. kind: `k1` = logp - ref_logp (unbiased, can be negative);
    `k2` = 0.5 (logp - ref_logp)^2; `k3` = exp(ref - logp) - (ref - logp) - 1
    (unbiased, always >= 0, the "low-variance" estimator of Schulman's note), with `clamp`
    computed as verl's `low_var_kl`: the log ratio clamped to [-20, 20], the value to
    [-10, 10]. `clamp` does not change k1 and k2.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape"
        )
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        log_ratio = ref_logp - logp
        if not clamp:
            return torch.exp(log_ratio) - log_ratio - 1.0
        log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {', '.join(KL_KINDS)}")


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Return the mean of `x` over positions where `mask` is set; 0 where none are.

    x, mask: same shape (mask bool or 0/1). dim: None for one scalar over everything,
    else reduce that dimension only. Masked-out values of `x` (even NaN) are ignored.
    """
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x))
    if dim is None:
        count = keep.sum()
        total = total.sum()
    else:
        count = keep.sum(dim=dim)
        total = total.sum(dim=dim)
    count = count.to(total.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def loss_denominator(mask: Tensor, agg: str, horizon: Optional[int] = None) -> float:
    """Return what `aggregate` divides by for `mask` [B, T] under `agg`: the unmasked token
    count (`token-mean`), the count of sequences with a token (`seq-mean-token-mean`,
    `seq-mean-token-sum`), or that count x `horizon` (`seq-mean-token-sum-norm`; `horizon`
    None: T). Denominators add up: a mini-batch's is the sum of its micro-batches'."""
    _check_agg(agg)
    keep = mask.bool()
    if agg == "token-mean":
        return float(keep.sum())
    seqs = float(keep.any(dim=1).sum())
    return seqs * (horizon or mask.shape[1]) if agg == "seq-mean-token-sum-norm" else seqs


def aggregate(loss_tokens: Tensor, mask: Tensor, agg: str, denom: Optional[float] = None,
              horizon: Optional[int] = None) -> Tensor:
    """Return the scalar reduction of a per-token quantity under `agg`.

    loss_tokens, mask: [B, T]. agg:
    - `token-mean`: sum over all unmasked tokens / their count (each token weighs the same);
    - `seq-mean-token-mean`: per-sequence masked token mean, then the mean over sequences;
    - `seq-mean-token-sum`: per-sequence masked token sum, then the mean over sequences;
    - `seq-mean-token-sum-norm`: per-sequence token sum / `horizon`, then the mean over
      sequences (Dr. GRPO: a constant length normaliser, `horizon` = the longest response
      the rollout allows; None: T).
    `denom`: the mini-batch's denominator (`loss_denominator` summed over its micro-batches
    and ranks); the numerator is then this batch's share of the mini-batch's sum. None: this
    batch's own. Sequences with no unmasked token are left out (they have no tokens to
    weigh, and counting them as 0 would shrink the loss by batch padding). An all-masked
    batch gives 0, still attached to the graph.
    """
    if loss_tokens.shape != mask.shape or loss_tokens.dim() != 2:
        raise ValueError(
            f"loss_tokens {tuple(loss_tokens.shape)} and mask {tuple(mask.shape)} "
            "must both be [B, T]"
        )
    _check_agg(agg)
    keep = mask.bool()
    tokens = torch.where(keep, loss_tokens, torch.zeros_like(loss_tokens))
    if agg == "token-mean":
        total = tokens.sum()
    elif agg == "seq-mean-token-mean":
        total = masked_mean(loss_tokens, keep, dim=1).sum()
    else:  # the token-sum modes; -norm differs in its denominator only
        total = tokens.sum()
    if denom is None:
        denom = loss_denominator(keep, agg, horizon)
    return total / denom if denom > 0 else total * 0.0


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; expected one of {', '.join(AGG_MODES)}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    denom: Optional[float] = None,
    horizon: Optional[int] = None,
) -> Tuple[Tensor, Dict[str, float]]:
    """Return the clipped surrogate loss of Eq. (1) (to minimise) and detached stats.

    logp: [B, T] log-probs of the sampled tokens under the current policy (with grad).
    old_logp: [B, T] the same under the policy that sampled them (no grad needed).
    advantages: [B] one per sequence, broadcast over its tokens ([B, T] also accepted).
    mask: [B, T] 1 on response tokens, 0 on prompt and padding.

    Per token, ratio = exp(logp - old_logp) and
    loss = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high));
    with `dual_clip` = c > 1, tokens with A < 0 take min(loss, -A c); reduced by
    `aggregate(..., agg, denom, horizon)`.

    stats (python floats, over unmasked tokens): `clip_frac` (share where the clipped
    branch is the larger one, i.e. A > 0 and ratio > 1 + clip_high, or A < 0 and
    ratio < 1 - clip_low), `approx_kl` (mean k3 estimate of KL(new || old),
    exp(old - new) - (old - new) - 1, >= 0), `ratio_mean`, and with the dual clip on,
    `dual_clip_frac` (share of tokens where the -A c bound is active).
    """
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
            f"{tuple(mask.shape)} must all be the same [B, T]"
        )
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(
                f"advantages has {advantages.shape[0]} entries for a batch of {logp.shape[0]}"
            )
        advantages = advantages.unsqueeze(1)
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T], got {tuple(advantages.shape)} "
            f"for logp {tuple(logp.shape)}"
        )
    _check_agg(agg)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    keep = mask.bool()
    logp, old_logp = _masked(logp, keep), _masked(old_logp, keep)
    advantages = advantages.to(logp.dtype).expand_as(logp)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tokens = torch.maximum(unclipped, clipped)
    stats_masks = {"clip_frac": clipped > unclipped}
    if dual_clip is not None:
        bound = -advantages * dual_clip
        negative = advantages < 0
        stats_masks["dual_clip_frac"] = negative & (loss_tokens > bound)
        loss_tokens = torch.where(negative, torch.minimum(loss_tokens, bound), loss_tokens)

    loss = aggregate(loss_tokens, keep, agg, denom, horizon)

    with torch.no_grad():
        stats = {
            name: masked_mean(hit.to(logp.dtype), keep).item() for name, hit in stats_masks.items()
        }
        stats["approx_kl"] = masked_mean(kl_penalty(logp, old_logp, "k3"), keep).item()
        stats["ratio_mean"] = masked_mean(ratio, keep).item()
    return loss, stats


def _masked(x: Tensor, keep: Tensor) -> Tensor:
    """`x` with masked positions set to 0 before any arithmetic: a NaN or -inf there then
    gets an exactly zero gradient (a `where` after `exp` would pass 0 x inf = NaN back)."""
    return torch.where(keep, x, torch.zeros_like(x))


def kl_in_reward(
    rewards: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, coef: float, kind: str,
    clamp: bool = True,
) -> Tensor:
    """Return sequence rewards with the summed KL penalty folded in, detached.

    rewards: [B] one scalar reward per response. logp, ref_logp, mask: [B, T].
    Returns: [B], rewards - coef * sum_t mask_t * kl_penalty(logp, ref_logp, kind)_t.
    The result feeds `group_advantages`, which is a constant for the update, so no
    gradient flows through it.
    """
    if rewards.dim() != 1 or rewards.shape[0] != logp.shape[0]:
        raise ValueError(
            f"rewards must be [B] with B={logp.shape[0]}, got {tuple(rewards.shape)}"
        )
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} differ")
    with torch.no_grad():
        keep = mask.bool()
        kl = kl_penalty(_masked(logp, keep), _masked(ref_logp, keep), kind, clamp)
        kl_sum = torch.where(keep, kl, torch.zeros_like(kl)).sum(dim=1)
        return rewards.to(kl_sum.dtype) - coef * kl_sum


def pad_rows(rows: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Return `[B, T]` values and a bool mask of ragged 1-D tensors (T = the longest, >= 1)."""
    T = max([r.shape[0] for r in rows] + [1])
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=rows[0].device if rows else None)
    for b, r in enumerate(rows):
        mask[b, :r.shape[0]] = True
    if not rows:
        return torch.zeros(0, T), mask
    vals = torch.stack([torch.cat([r, r.new_zeros(T - r.shape[0])]) for r in rows])
    return vals, mask


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    kl_clamp: bool = True,
    denom: Optional[float] = None,
    horizon: Optional[int] = None,
) -> Tuple[Tensor, Dict[str, float]]:
    """Return the GRPO loss: `policy_loss` plus `kl_coef` x the `kl_penalty` to the reference
    aggregated the same way (left out when `ref_logp` is None), and its stats
    (`policy_loss`'s plus `kl` when the KL term is on).

    logp, old_logp, ref_logp, mask: [B, T] (any number of groups, or a micro-batch of a
    mini-batch whose denominator is `denom`); advantages: [B]. All move to `logp`'s device.
    """
    old_logp, advantages, mask = old_logp.to(logp.device), advantages.to(logp.device), mask.to(logp.device)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg,
                              denom, horizon)
    if ref_logp is not None:
        keep = mask.bool()
        per_token = kl_penalty(_masked(logp, keep), _masked(ref_logp.to(logp.device), keep), kl_kind, kl_clamp)
        kl = aggregate(per_token, keep, agg, denom, horizon)
        loss = loss + kl_coef * kl
        stats["kl"] = float(kl.detach())
    return loss, stats
