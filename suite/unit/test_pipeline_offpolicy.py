"""Off-policy correction of pipelined rollouts, on fixed tensors (no model).

Statement: a pipelined batch sampled by version n-1 is trained at version n. train_step passes the SAMPLER's
logprobs (from the version that produced the sample) as old logprobs, so the GRPO ratio is exactly
pi_n / pi_{n-1} per token: the PPO importance ratio against the behaviour policy, with no approximation for
one-step staleness. The gradient is the on-policy one (-A * grad log pi / N per token) reweighted by that
ratio where the clip is inactive, and zero where it is active.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from reference_impl.grpo import GRPOConfig, decoupled_offpolicy, grpo_loss  # noqa: E402

# pi_n (current) and pi_{n-1} (sampler) logprobs of 2 sequences x 3 tokens; the last token of row 1 is padding.
CURRENT = [[-1.0, -2.0, -0.5], [-0.7, -1.5, -3.0]]
SAMPLER = [[-1.4, -1.5, -0.5], [-0.9, -1.45, -9.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
ADV = [1.0, -0.5]


def _tensors():
    logps = torch.tensor(CURRENT, dtype=torch.float64, requires_grad=True)
    return logps, torch.tensor(SAMPLER, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64), \
        torch.tensor(ADV, dtype=torch.float64)


def test_one_step_stale_ratio_is_exactly_current_over_sampler():
    logps, old, mask, adv = _tensors()
    cfg = GRPOConfig(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2)
    loss, metrics = grpo_loss(logps, old, adv, mask, cfg)
    ratio = torch.exp(logps.detach() - old)
    want_mean = float((ratio * mask).sum() / mask.sum())
    assert metrics["ratio_mean"] == pytest.approx(want_mean, rel=1e-12)
    assert metrics["ratio_max"] == pytest.approx(float(ratio[mask.bool()].max()), rel=1e-12)
    loss.backward()
    # on-policy gradient of token t: -A * grad(log pi)/N; off-policy: times ratio, unless the clip is active
    n = mask.sum()
    a = adv[:, None].expand_as(ratio)
    clipped = ((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))
    want = torch.where(clipped, torch.zeros_like(ratio), -a * ratio / n) * mask
    assert clipped.sum() == 1 and not clipped[mask.bool()].all(), "the fixture must exercise both cases"
    assert torch.allclose(logps.grad, want, rtol=0, atol=1e-12), (logps.grad, want)
    # the ratio is exactly 1 when the sampler IS the current version: the sequential loop's case
    logps2 = logps.detach().clone().requires_grad_(True)
    _, on = grpo_loss(logps2, logps.detach(), adv, mask, cfg)
    assert on["ratio_mean"] == 1.0 and on["clip_ratio"] == 0.0


def test_decoupled_objective_weights_by_truncated_ratio_and_never_clips_at_the_start():
    logps, sampler, mask, adv = _tensors()
    cap = 1.2
    old, weights, metrics = decoupled_offpolicy(logps, sampler, mask, cap)
    raw = torch.exp(logps.detach() - sampler)
    assert torch.equal(old, logps.detach())
    assert torch.allclose(weights, raw.clamp(max=cap) * mask)
    assert metrics["tis_truncated_frac"] == pytest.approx(float(((raw > cap) & mask.bool()).sum() / mask.sum()))
    assert 0 < metrics["tis_truncated_frac"] < 1, "the fixture must truncate some tokens and not others"
    loss, m = grpo_loss(logps, old, adv, mask, GRPOConfig(), token_weights=weights)
    loss.backward()
    n = mask.sum()
    want = -adv[:, None] * weights / n  # ratio to the trainer's own policy is 1: no token is clipped
    assert m["clip_ratio"] == 0.0
    assert torch.allclose(logps.grad, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cap must be > 0"):
        decoupled_offpolicy(logps, sampler, mask, 0.0)


def test_token_weights_none_is_trl_loss_unchanged():
    logps, old, mask, adv = _tensors()
    a, _ = grpo_loss(logps, old, adv, mask, GRPOConfig())
    b, _ = grpo_loss(logps, old, adv, mask, GRPOConfig(), token_weights=torch.ones_like(mask))
    assert float(a.detach()) == float(b.detach())
