"""CPU check of the TRL peer baseline's code path (tiny model, 1 GRPO step, tiny settings).

Not a benchmark and not evidence about GPU speed: it proves that the GRPOTrainer test_bench_step.py builds on
a GPU can be constructed and stepped with this TRL/transformers/peft (about 20 s on a laptop-class CPU).
"""
from __future__ import annotations

import pytest

from .trl_peer import build_trl_grpo, run_trl


def test_trl_grpo_peer_builds_and_steps_on_cpu(tmp_path):
    from reference_impl.models import resolve_model

    model = resolve_model("tiny")
    trainer = build_trl_grpo(str(model.path), str(tmp_path / "trl"), steps=1, prompts_per_step=1, group_size=2,
                             max_new_tokens=4, device="cpu")
    assert trainer.args.use_vllm is False and trainer.num_generations == 2
    assert trainer.model.peft_config["default"].r == 16
    run = run_trl(trainer)
    assert run.steps == 1 and len(run.step_times_s) == 1 and run.step_times_s[0] > 0
    assert run.train_runtime_s >= run.step_times_s[0] * 0.5 and run.wall_per_step_s > 0
    assert run.completion_mean_len == [4.0]  # min_new_tokens = max: full-length completions, like ignore_eos
    assert len(run.rewards) == 1 and 0.0 <= run.rewards[0] <= 1.0


def test_trl_peer_runs_in_a_child_without_unsloth(tmp_path):
    """The GPU benchmark's route: a fresh interpreter builds and trains the peer and answers as JSON; the child
    must not have imported Unsloth (whose in-place patches of GRPOTrainer broke the in-process peer on GPU)."""
    from reference_impl.models import resolve_model

    from .trl_peer import PeerSettings, run_trl_in_child

    model = resolve_model("tiny")
    run, unsloth = run_trl_in_child(str(model.path), str(tmp_path / "trl"),
                                    PeerSettings(steps=1, prompts_per_step=1, group_size=2, max_new_tokens=4,
                                                 device="cpu"), timeout_s=600)
    assert unsloth is False
    assert run.steps == 1 and run.completion_mean_len == [4.0] and 0.0 <= run.rewards[0] <= 1.0


def test_trl_peer_child_failure_is_a_clear_error(tmp_path):
    from .trl_peer import PeerSettings, run_trl_in_child

    with pytest.raises(RuntimeError, match="TRL peer child exited"):
        run_trl_in_child(str(tmp_path / "no-such-model"), str(tmp_path / "trl"),
                         PeerSettings(steps=1, prompts_per_step=1, group_size=2, max_new_tokens=4, device="cpu"),
                         timeout_s=300)
