"""Pure-tensor GRPO math (torch only), matching TRL 1.16.0's ``GRPOTrainer``.

Semantics follow ``trl/trainer/grpo_trainer.py`` (TRL 1.16.0):

* advantages: ``_generate_and_score_completions`` ("sum_then_normalize" branch);
* loss: ``_compute_loss`` with ``importance_sampling_level="token"``, no vLLM/SGLang
  importance-sampling correction, no entropy mask/bonus, no off-policy mask, ``delta=None``.

The old log-probs come from the sampler (SGLang), so the importance ratio is *not* 1 by
construction: ``old_logps`` is always an explicit input, never ``logps.detach()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig:
    """Loss hyper-parameters; defaults are TRL 1.16 ``GRPOConfig`` defaults.

    ``epsilon_high`` defaults to ``epsilon`` (0.2) in TRL, hence 0.2 here.
    ``kl_bias_correction`` mirrors TRL's ``use_bias_correction_kl`` (default ``True``):
    the k3 KL term is multiplied by the (differentiable) importance ratio.
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    scale_rewards: str = "group"
    max_completion_length: int | None = None
    kl_bias_correction: bool = True

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"epsilon_low must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high < 0.0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.beta < 0.0:
            raise ValueError(f"beta (KL coefficient) must be >= 0, got {self.beta}")
        mcl = self.max_completion_length
        if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, int) or mcl <= 0):
            raise ValueError(f"max_completion_length must be a positive int or None, got {mcl!r}")
        if self.loss_type == "dr_grpo" and mcl is None:
            raise ValueError("loss_type='dr_grpo' normalises by max_completion_length; set it to a positive int")


@dataclass
class GroupStats:
    """Batch statistics from :func:`group_advantages`.

    ``equal_reward_groups`` counts groups whose rewards are all identical (no learning
    signal, zero advantage). They are reported, not dropped (TRL keeps them too and logs
    ``frac_reward_zero_std``). ``reward_std`` is TRL's logged ``reward_std`` (unbiased, batch).
    """

    num_groups: int
    equal_reward_groups: int
    reward_mean: float
    reward_std: float


def _unbiased_std(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std computed the way ``trl.trainer.utils.nanstd`` does (NaN for n=1)."""
    n = x.numel() if dim is None else x.size(dim)
    mean = x.mean() if dim is None else x.mean(dim=dim, keepdim=True)
    var = ((x - mean) ** 2).mean() if dim is None else ((x - mean) ** 2).mean(dim=dim)
    return torch.sqrt(var * (n / (n - 1))) if n > 1 else torch.full_like(var, float("nan"))


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[Tensor, GroupStats]:
    """Group-relative advantages, as TRL 1.16 ``_generate_and_score_completions``.

    ``A = r - mean(group)``; for ``"group"`` divide by ``std(group) + eps``, for ``"batch"``
    by ``std(all rewards) + eps`` (the baseline stays the *group* mean), for ``"none"`` no
    division. Std is unbiased (Bessel, ``nanstd``); with one element it is 0 as in TRL.
    Rewards are laid out group-contiguous: ``rewards.view(-1, group_size)``.

    Deliberate deviation: groups whose rewards are exactly equal get an advantage of exactly 0.
    TRL divides the float rounding residue of ``r - mean`` by ``1e-4`` there, which can leave
    ~1e-4 advantages (e.g. eight rewards of 0.3 in float32).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(f"batch size {rewards.numel()} must be a positive multiple of group_size={group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite (TRL's NaN 'unscorable completion' path is not supported)")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")

    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = _unbiased_std(grouped, dim=1) if group_size > 1 else torch.zeros(grouped.size(0), dtype=rewards.dtype)
        advantages = centred / (std.repeat_interleave(group_size) + eps)
    elif scale_rewards == "batch":
        std = _unbiased_std(rewards) if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = centred / (std + eps)
    else:
        advantages = centred

    equal = grouped.amax(dim=1) == grouped.amin(dim=1)
    advantages = advantages.masked_fill(equal.repeat_interleave(group_size), 0.0)
    stats = GroupStats(
        num_groups=grouped.size(0),
        equal_reward_groups=int(equal.sum()),
        reward_mean=float(rewards.mean()),
        reward_std=float(_unbiased_std(rewards)) if rewards.numel() > 1 else float("nan"),
    )
    return advantages, stats


def _check_loss_inputs(logps, old_logps, advantages, mask, cfg, ref_logps) -> None:
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, T], got shape {tuple(logps.shape)}")
    for name, t in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logps shape {tuple(logps.shape)}")
    if advantages.shape != (logps.size(0),):
        raise ValueError(f"advantages must be [B]={logps.size(0)}, got shape {tuple(advantages.shape)}")
    if cfg.beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (reference-model log-probs) for the KL term")
    if cfg.loss_type == "dr_grpo" and logps.size(1) > cfg.max_completion_length:
        raise ValueError(f"T={logps.size(1)} exceeds max_completion_length={cfg.max_completion_length}")


def _aggregate(per_token_loss: Tensor, mask: Tensor, cfg: GRPOConfig, num_items_in_batch) -> Tensor:
    """Loss aggregation of TRL 1.16 ``_compute_loss`` (one process, no gradient accumulation)."""
    masked = per_token_loss * mask
    if cfg.loss_type == "grpo":  # per-sequence token mean, then batch mean
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if cfg.loss_type == "dr_grpo":  # constant normaliser B * max_completion_length
        return masked.sum() / (per_token_loss.size(0) * cfg.max_completion_length)
    # dapo: sum over tokens / num_items_in_batch (active tokens of the whole generation batch)
    n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
    return masked.sum() / n.clamp(min=1.0)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOConfig,
    ref_logps: Tensor | None = None,
    num_items_in_batch: Tensor | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss, token-level importance sampling (TRL 1.16 ``_compute_loss``).

    ``ratio = exp(logps - old_logps)``; per token ``-min(ratio*A, clip(ratio, 1-eps_low,
    1+eps_high)*A)`` plus ``beta * kl`` with TRL's k3 estimator
    ``exp(ref - logp) - (ref - logp) - 1`` (times ``ratio`` when ``cfg.kl_bias_correction``).

    ``num_items_in_batch`` (dapo only) is TRL's global token count: when a generation batch is
    split into micro-batches for gradient accumulation, pass the active-token count of the whole
    batch so each micro-batch loss is already normalised (TRL does not divide dapo by the
    accumulation steps). For grpo/dr_grpo, divide the result by the accumulation steps yourself.

    ``token_weights`` ([B, T], no gradient; None = TRL) multiply each token's surrogate: the truncated importance
    weights of the decoupled off-policy objective (reference_impl.offpolicy), not part of TRL.

    Metrics (python floats): ``clip_ratio`` (TRL ``clip_ratio/region_mean``), ``clip_ratio_low``,
    ``clip_ratio_high``, ``ratio_mean``, ``ratio_max`` (masked), ``tokens``, ``kl`` (if beta>0).
    """
    _check_loss_inputs(logps, old_logps, advantages, mask, cfg, ref_logps)
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights.detach()
    if cfg.beta > 0:
        diff = ref_logps - logps
        per_token_kl = torch.exp(diff) - diff - 1
        if cfg.kl_bias_correction:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + cfg.beta * per_token_kl
    loss = _aggregate(per_token_loss, mask, cfg, num_items_in_batch)

    with torch.no_grad():
        tokens = mask.sum()
        denom = tokens.clamp(min=1.0)
        low = ((ratio < 1 - cfg.epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + cfg.epsilon_high) & (adv > 0)).to(mask.dtype)
        active = mask.bool()
        metrics = {
            "clip_ratio": float(((low + high) * mask).sum() / denom),  # low/high are disjoint
            "clip_ratio_low": float((low * mask).sum() / denom),
            "clip_ratio_high": float((high * mask).sum() / denom),
            "ratio_mean": float((ratio * mask).sum() / denom),
            "ratio_max": float(ratio[active].max()) if active.any() else 0.0,
            "tokens": float(tokens),
        }
        if cfg.beta > 0:
            metrics["kl"] = float((per_token_kl * mask).sum() / denom)
    return loss, metrics


def decoupled_offpolicy(logps: Tensor, sampler_logps: Tensor, mask: Tensor, cap: float
                        ) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Inputs of the decoupled off-policy objective (Hilton et al. 2021, as AReaL's async PPO), not TRL.

    With sampler (behaviour) policy mu and the trainer's pre-step policy pi_prox (= ``logps.detach()``):
    ``old_logps = log pi_prox`` (the clip is around the trainer's own policy, so at the step's start the ratio
    is exactly 1 and nothing is clipped), and each token is weighted by the truncated importance weight
    ``min(pi_prox / mu, cap)`` (no gradient). The gradient at the step's start is then
    ``-w * A * grad log pi`` aggregated as the loss type says. Plain ratio-vs-sampler clipping instead zeroes
    every token whose stale sampler already moved past 1 +- eps, which with a large learning rate is most of the
    useful ones (measured: suite/unit/test_pipeline.py docstring).
    Returns (old_logps, token_weights, metrics: tis_weight_mean, tis_truncated_frac)."""
    if cap <= 0:
        raise ValueError(f"truncated importance weight cap must be > 0, got {cap}")
    prox = logps.detach()
    raw = torch.exp(prox - sampler_logps)
    weights = raw.clamp(max=cap) * mask
    with torch.no_grad():
        denom = mask.sum().clamp(min=1.0)
        metrics = {"tis_weight_mean": float(weights.sum() / denom),
                   "tis_truncated_frac": float(((raw > cap).to(mask.dtype) * mask).sum() / denom)}
    return prox, weights, metrics


def sequence_logprobs_from_logits(
    logits: Tensor, targets: Tensor, mask: Tensor | None = None, chunk_rows: int = 8
) -> Tensor:
    """Per-token log-probs ``logits[b, t, targets[b, t]] - logsumexp(logits[b, t])`` -> ``[B, T]`` fp32.

    Processes ``chunk_rows`` batch rows at a time so only one chunk is ever upcast to fp32
    (no full-batch fp32 ``log_softmax`` copy); same idea as TRL's ``selective_log_softmax``.
    Differentiable. Positions where ``mask == 0`` return 0 (their target ids may be padding,
    e.g. -100, and are never gathered).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"need logits [B,T,V] and targets [B,T]; got {tuple(logits.shape)}, {tuple(targets.shape)}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != targets shape {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    out = []
    for start in range(0, logits.size(0), chunk_rows):
        chunk = logits[start : start + chunk_rows].float()
        idx = safe_targets[start : start + chunk_rows].unsqueeze(-1)
        out.append(chunk.gather(-1, idx).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).masked_fill(~keep, 0.0)
