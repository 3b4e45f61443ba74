"""Unit tests for reference_impl.grpo: parity with TRL 1.16.0's *real* GRPO code.

Which TRL code runs (trl 1.16.0, ``trl/trainer/grpo_trainer.py``):

* Loss + gradient: the unbound method ``GRPOTrainer._compute_loss(fake_self, model, inputs)``.
  ``fake_self`` is a ``types.SimpleNamespace`` holding only the attributes that method reads, and
  its ``_get_per_token_logps_and_entropies`` returns our fixed float64 ``logps`` leaf (requires_grad),
  so TRL's own ratio / clipping / k3-KL / aggregation arithmetic produces the loss and we backprop
  through it. SimpleNamespace raises AttributeError on any attribute we did not provide, so if a
  future TRL reads a new knob the test fails loudly instead of silently diverging.
* Advantages: they are computed inline inside the ~500-line ``_generate_and_score_completions``
  (which needs a model, tokenizer, reward functions...), so the test extracts the exact
  "sum_then_normalize" advantage block from ``inspect.getsource`` and ``exec``s it with TRL's own
  ``nanstd``. If the block's boundary lines change, extraction fails loudly.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from reference_impl.grpo import GRPOConfig, GroupStats, group_advantages, grpo_loss, sequence_logprobs_from_logits

TIGHT = dict(rtol=1e-12, atol=1e-12)  # float64 throughout; same op order as TRL
F64 = torch.float64


# --------------------------------------------------------------------------- TRL harness


@pytest.fixture(scope="module")
def trl_trainer():
    trl = pytest.importorskip("trl")
    assert trl.__version__ == "1.16.0", f"parity was written against TRL 1.16.0, found {trl.__version__}"
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


class _OneProcessAccelerator:
    """Single-process stand-in for accelerate.Accelerator (reduce/gather are identities)."""

    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor

    @staticmethod
    def gather(tensor):
        return tensor


def trl_compute_loss(
    GRPOTrainer, *, loss_type, logps, old_logps, advantages, mask, beta=0.0, eps_low=0.2, eps_high=0.2,
    ref_logps=None, max_completion_length=None, use_bias_correction_kl=True, num_items_in_batch=None,
    grad_accum=1,
):
    """Run TRL's real ``GRPOTrainer._compute_loss``; return (loss, d loss / d logps, TRL metrics)."""
    leaf = logps.detach().clone().requires_grad_(True)
    B, T = logps.shape

    def fake_get_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == T and input_ids.shape == (B, 1 + T)
        return leaf, torch.zeros_like(leaf), None  # (per_token_logps, entropies, aux_loss)

    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    fake_self = SimpleNamespace(
        _get_per_token_logps_and_entropies=fake_get_logps,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=None, steps_per_generation=grad_accum),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum,
        max_completion_length=max_completion_length,
        accelerator=_OneProcessAccelerator(),
        _entropy_bonus_enabled=False,
        _metrics=metrics,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=F64),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "num_items_in_batch": torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch),
    }
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(fake_self, None, inputs)
    loss.backward()
    return loss.detach(), leaf.grad, metrics["train"]


def ours(cfg, logps, old_logps, advantages, mask, ref_logps=None, num_items_in_batch=None):
    leaf = logps.detach().clone().requires_grad_(True)
    loss, m = grpo_loss(leaf, old_logps, advantages, mask, cfg, ref_logps=ref_logps, num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), leaf.grad, m


# --------------------------------------------------------------------------- fixed tensors

LENGTHS = [6, 4, 2, 5]  # unequal lengths: otherwise grpo == dapo and the parity test can't tell them apart
ADV = torch.tensor([1.0, -0.7, 0.5, -1.2], dtype=F64)
# log(new/old) per token. Clip-active: exp(0.5)=1.65, exp(0.3)=1.35, exp(0.35)=1.42 with A>0 -> high-clipped;
# exp(-0.4)=0.67, exp(-0.6)=0.55, exp(-0.25)=0.78 with A<0 -> low-clipped. exp(-0.5)=0.61 with A>0 and
# exp(0.6)=1.82, exp(0.4)=1.49, exp(0.25)=1.28 with A<0 lie outside [0.8, 1.2] but are NOT clipped (min() keeps
# the unclipped, more pessimistic term). 2.0 = padding (masked out).
LOG_RATIO = torch.tensor(
    [
        [0.5, -0.5, 0.1, 0.0, 0.3, -0.05],
        [-0.4, 0.25, -0.1, 0.6, 2.0, 2.0],
        [0.35, -0.3, 2.0, 2.0, 2.0, 2.0],
        [-0.6, 0.05, 0.4, -0.25, 0.15, 2.0],
    ],
    dtype=F64,
)


def fixed_tensors(clipping: bool):
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(6)[None, :] < torch.tensor(LENGTHS)[:, None]).to(F64)
    logps = -torch.rand(4, 6, generator=g, dtype=F64) * 3 - 0.05
    old_logps = logps - (LOG_RATIO if clipping else 0.1 * LOG_RATIO)  # sampler (SGLang) logprobs
    ref_logps = logps - 0.3 * torch.rand(4, 6, generator=g, dtype=F64)
    return logps, old_logps, ref_logps, mask


KL_MODES = {"no_kl": (0.0, True), "kl_biascorr": (0.04, True), "kl_plain": (0.04, False)}


# --------------------------------------------------------------------------- 1. loss/grad parity with TRL


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)], ids=["sym", "dapo_clip_higher"])
@pytest.mark.parametrize("kl_mode", list(KL_MODES))
@pytest.mark.parametrize("clipping", [True, False], ids=["clip_active", "no_clip"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_loss_and_grad_match_trl_compute_loss(trl_trainer, loss_type, clipping, kl_mode, eps):
    beta, biascorr = KL_MODES[kl_mode]
    logps, old, ref, mask = fixed_tensors(clipping)
    cfg = GRPOConfig(loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1], beta=beta,
                     max_completion_length=8, kl_bias_correction=biascorr)
    ref_arg = ref if beta > 0 else None
    t_loss, t_grad, t_m = trl_compute_loss(
        trl_trainer, loss_type=loss_type, logps=logps, old_logps=old, advantages=ADV, mask=mask, beta=beta,
        eps_low=eps[0], eps_high=eps[1], ref_logps=ref_arg, max_completion_length=8, use_bias_correction_kl=biascorr,
    )
    o_loss, o_grad, o_m = ours(cfg, logps, old, ADV, mask, ref_logps=ref_arg)

    torch.testing.assert_close(o_loss, t_loss, **TIGHT)
    torch.testing.assert_close(o_grad, t_grad, **TIGHT)
    assert o_m["clip_ratio"] == pytest.approx(t_m["clip_ratio/region_mean"][0], abs=1e-12)
    assert o_m["clip_ratio_low"] == pytest.approx(t_m["clip_ratio/low_mean"][0], abs=1e-12)
    assert o_m["clip_ratio_high"] == pytest.approx(t_m["clip_ratio/high_mean"][0], abs=1e-12)
    assert (o_m["clip_ratio"] > 0) == clipping  # the regime really is what the id says
    if beta > 0:
        assert o_m["kl"] == pytest.approx(t_m["kl"][0], rel=1e-12)
    else:
        assert "kl" not in o_m


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_window_matches_trl(trl_trainer, loss_type):
    """Micro-batch of a 2-step accumulation window: TRL divides dapo by the window's token count
    (num_items_in_batch) and grpo/dr_grpo by current_gradient_accumulation_steps."""
    logps, old, ref, mask = fixed_tensors(True)
    window_tokens = mask.sum() + 7.0  # the other micro-batch held 7 tokens
    t_loss, t_grad, _ = trl_compute_loss(trl_trainer, loss_type=loss_type, logps=logps, old_logps=old,
                                         advantages=ADV, mask=mask, max_completion_length=8,
                                         num_items_in_batch=window_tokens, grad_accum=2)
    cfg = GRPOConfig(loss_type=loss_type, max_completion_length=8)
    if loss_type == "dapo":
        o_loss, o_grad, _ = ours(cfg, logps, old, ADV, mask, num_items_in_batch=window_tokens)
    else:  # documented: caller divides non-dapo losses by the accumulation steps
        o_loss, o_grad, _ = ours(cfg, logps, old, ADV, mask)
        o_loss, o_grad = o_loss / 2, o_grad / 2
    torch.testing.assert_close(o_loss, t_loss, **TIGHT)
    torch.testing.assert_close(o_grad, t_grad, **TIGHT)


def test_defaults_match_trl_grpo_config(trl_trainer):
    from trl import GRPOConfig as TRLConfig

    d = {f.name: f.default for f in dataclasses.fields(TRLConfig)}
    cfg = GRPOConfig()
    assert cfg.loss_type == d["loss_type"] == "dapo"
    assert cfg.beta == d["beta"] and cfg.scale_rewards == d["scale_rewards"]
    assert d["epsilon_high"] is None and cfg.epsilon_low == cfg.epsilon_high == d["epsilon"]
    assert cfg.kl_bias_correction == d["use_bias_correction_kl"]


# --------------------------------------------------------------------------- 2. advantages


@pytest.fixture(scope="module")
def trl_advantage_code(trl_trainer):
    src = inspect.getsource(trl_trainer._generate_and_score_completions)
    first = "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)"
    last = "is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))"
    start = src.rfind("\n", 0, src.index(first)) + 1
    end = src.index("\n", src.index(last, start))
    block = textwrap.dedent(src[start:end])
    assert block.count("\n") < 40, "advantage block boundaries moved; re-check TRL source"
    return compile(block, "<trl GRPOTrainer._generate_and_score_completions advantage block>", "exec")


def trl_advantages(trl_trainer, code, rewards, num_generations, scale_rewards):
    ns = {
        "torch": torch,
        "nanstd": sys.modules[trl_trainer.__module__].nanstd,  # the very function the trainer uses
        "rewards": rewards,
        "num_generations": num_generations,
        "self": SimpleNamespace(scale_rewards=scale_rewards),
    }
    exec(code, ns)
    return torch.nan_to_num(ns["advantages"], nan=0.0), ns["is_std_zero"]  # next TRL line: nan_to_num


REWARDS = [1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 2, -1, 0.25, 3, 0, 0, 0, 0]
# TRL's nanstd computes the Bessel factor as int/int tensor division -> a float32 tensor, so with float64
# rewards TRL's std carries a float32-rounded n/(n-1) (~1e-8 relative). TRL's rewards are float32 in practice
# (rewards_per_func is a default-dtype tensor); there we agree to float32 rounding.
ADV_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-7, atol=1e-9)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(trl_trainer, trl_advantage_code, scale_rewards, dtype):
    rewards = torch.tensor(REWARDS, dtype=dtype)
    t_adv, t_zero = trl_advantages(trl_trainer, trl_advantage_code, rewards, 4, scale_rewards)
    adv, stats = group_advantages(rewards, 4, scale_rewards=scale_rewards)
    assert adv.dtype == dtype
    torch.testing.assert_close(adv, t_adv, **ADV_TOL[dtype])
    assert isinstance(stats, GroupStats) and stats.num_groups == 4
    assert stats.equal_reward_groups == 2  # groups 1 and 3: reported, not dropped
    assert torch.all(adv[4:8] == 0) and torch.all(adv[12:] == 0) and torch.all(adv[:4] != 0)
    if scale_rewards != "batch":  # TRL's is_std_zero is per-group here
        assert int(t_zero.view(4, 4)[:, 0].sum()) == stats.equal_reward_groups
    nanstd = sys.modules[trl_trainer.__module__].nanstd
    assert stats.reward_mean == pytest.approx(float(torch.nanmean(rewards)), rel=1e-6)
    assert stats.reward_std == pytest.approx(float(nanstd(rewards)), rel=1e-6)  # TRL's logged reward_std


def test_equal_reward_group_is_exactly_zero_in_float32(trl_trainer, trl_advantage_code):
    """Deliberate deviation: TRL divides float rounding residue by 1e-4 for equal groups; we return 0."""
    rewards = torch.full((8,), 0.3, dtype=torch.float32)
    adv, stats = group_advantages(rewards, 8)
    t_adv, _ = trl_advantages(trl_trainer, trl_advantage_code, rewards, 8, "group")
    assert stats.equal_reward_groups == 1 and torch.all(adv == 0)
    assert t_adv.abs().max() < 1e-3  # TRL's value is rounding noise, bounded


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(8), 4, scale_rewards="mean")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


# --------------------------------------------------------------------------- 3. the parity test can fail


def test_parity_check_is_discriminative(trl_trainer):
    logps, old, ref, mask = fixed_tensors(True)
    t_loss, t_grad, _ = trl_compute_loss(trl_trainer, loss_type="dapo", logps=logps, old_logps=old,
                                         advantages=ADV, mask=mask, max_completion_length=8)
    for wrong in (GRPOConfig(loss_type="grpo"), GRPOConfig(loss_type="dr_grpo", max_completion_length=8),
                  GRPOConfig(loss_type="dapo", epsilon_high=0.28)):
        o_loss, o_grad, _ = ours(wrong, logps, old, ADV, mask)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(o_loss, t_loss, **TIGHT)
    # KL without TRL's default bias correction gives a different gradient
    t_loss, t_grad, _ = trl_compute_loss(trl_trainer, loss_type="dapo", logps=logps, old_logps=old,
                                         advantages=ADV, mask=mask, beta=0.04, ref_logps=ref)
    _, o_grad, _ = ours(GRPOConfig(beta=0.04, kl_bias_correction=False), logps, old, ADV, mask, ref_logps=ref)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(o_grad, t_grad, **TIGHT)


# --------------------------------------------------------------------------- 4. PPO properties


def test_ratio_not_one_and_clipped_tokens_have_zero_grad():
    logps, old, _, mask = fixed_tensors(True)
    loss, grad, m = ours(GRPOConfig(), logps, old, ADV, mask)
    ratio = torch.exp(LOG_RATIO)
    active = mask.bool()
    assert m["ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert m["ratio_max"] == pytest.approx(float(ratio[active].max()))
    assert m["tokens"] == float(sum(LENGTHS))
    a = ADV[:, None].expand_as(ratio)
    clipped = ((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))
    assert int((clipped & active).sum()) == 6  # 3 high, 3 low
    assert torch.all(grad[clipped & active] == 0)
    assert torch.all(grad[~active] == 0)
    free = active & ~clipped  # d/dlogp of -ratio*A/N is -A*ratio/N (dapo, N = tokens)
    torch.testing.assert_close(grad[free], (-a * ratio / mask.sum())[free], **TIGHT)
    assert torch.all(grad[free] != 0)


def test_loss_input_validation():
    logps, old, _, mask = fixed_tensors(False)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, ADV, mask, GRPOConfig(beta=0.1))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, old, ADV[:2], mask, GRPOConfig())
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, ADV, mask, GRPOConfig(loss_type="dr_grpo", max_completion_length=4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(scale_rewards="mean"), "scale_rewards"),
        (dict(beta=-0.1), "beta"),
        (dict(epsilon_low=1.0), "epsilon_low"),
        (dict(epsilon_high=-0.1), "epsilon_high"),
        (dict(max_completion_length=0), "max_completion_length"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


# --------------------------------------------------------------------------- 5. chunked log-probs


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_chunked_logprobs_equal_log_softmax_gather(chunk_rows):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, 50, generator=g, dtype=torch.float32) * 4
    targets = torch.randint(0, 50, (5, 7), generator=g)
    ref = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = sequence_logprobs_from_logits(logits, targets, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)

    # bf16 logits: only the chunk is upcast; result equals fp32 log_softmax of the upcast logits
    lb = logits.bfloat16()
    ref_b = torch.log_softmax(lb.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got_b = sequence_logprobs_from_logits(lb, targets, chunk_rows=chunk_rows)
    assert got_b.dtype == torch.float32
    torch.testing.assert_close(got_b, ref_b, rtol=1e-6, atol=1e-5)


def test_chunked_logprobs_mask_and_grad():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 30, generator=g, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 30, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    targets = targets.masked_fill(~mask, -100)  # padding ids must never be gathered
    got = sequence_logprobs_from_logits(logits, targets, mask=mask, chunk_rows=3)
    assert torch.all(got[~mask] == 0)
    ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)
