"""reference_impl.warmup on the CPU (PEFT backend, tiny model): the warm-up batch has the loop's shape and
spread, the step really trains a throwaway trainer, and nothing of it leaks into the trainer used afterwards."""
from __future__ import annotations

from pathlib import Path

import pytest

from reference_impl.loop import LoopConfig
from reference_impl.tasks import WordStartTask
from reference_impl.trainer import LoraTrainer, TrainerConfig
from reference_impl.warmup import warm_up_trainer, warmup_rollouts

LOOP = LoopConfig(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6)


def test_warmup_batch_has_the_loop_shape_and_reward_spread(tiny):
    task = WordStartTask(str(tiny.path))
    rollouts = warmup_rollouts(task, LOOP)
    assert len(rollouts) == LOOP.prompts_per_step * LOOP.group_size
    assert {len(r.completion_ids) for r in rollouts} == {LOOP.max_new_tokens}
    assert {len(r.prompt_ids) for r in rollouts} == {task.prompt_len}
    first_group = [r.reward for r in rollouts[:LOOP.group_size]]
    assert len(set(first_group)) > 1, "a group without reward spread has zero advantages"
    real_prompts = {tuple(p) for step in range(3) for p in task.prompts(step, LOOP.prompts_per_step)}
    assert not real_prompts & {tuple(r.prompt_ids) for r in rollouts}


def test_warm_up_trains_a_throwaway_trainer_and_leaves_no_trace(tiny, two_torch_threads, monkeypatch, tmp_path):
    cfg = TrainerConfig(model_path=str(tiny.path), dtype="float32", lr=1e-2, seed=0, adapter_root=str(tmp_path))
    steps, roots = [], []
    original_step = LoraTrainer.train_step

    def recording_step(self, rollouts, group_size, dist=None):
        stats = original_step(self, rollouts, group_size, dist)
        steps.append((len(rollouts), stats["train_tokens"], stats["loss"]))
        roots.append(self.adapter_root)
        # the trainer's own logprobs stood in for the sampler's: one per completion token
        assert all(len(r.sampler_logprobs) == len(r.completion_ids) for r in rollouts)
        return stats

    monkeypatch.setattr(LoraTrainer, "train_step", recording_step)
    seconds = warm_up_trainer(cfg, WordStartTask(str(tiny.path)), LOOP)
    assert seconds > 0
    n = LOOP.prompts_per_step * LOOP.group_size
    assert steps and steps[0][:2] == (n, n * LOOP.max_new_tokens)
    assert roots[0] != Path(tmp_path) and not roots[0].exists(), "the warm-up's adapter dir must be its own, removed"
    assert tmp_path.exists()
    # a trainer built afterwards from the same config starts from the untouched seed-0 adapter
    fresh = LoraTrainer(cfg)
    reference = LoraTrainer(TrainerConfig(model_path=str(tiny.path), dtype="float32", lr=1e-2, seed=0))
    try:
        assert fresh.param_checksum() == pytest.approx(reference.param_checksum(), abs=0)
    finally:
        fresh.close()
        reference.close()
