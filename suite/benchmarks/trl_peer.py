"""The peer baseline: TRL's GRPOTrainer generating with HF `generate` (use_vllm=False) on the same model, task
(WordStartTask: word-start reward on completion token ids), group size, LoRA rank and completion length as the
splitrl loop. Used by test_bench_step.py on a GPU and by test_trl_peer_cpu.py (tiny model, CPU, 1 step).

TRL 1.16 calls reward functions as f(prompts=..., completions=..., completion_ids=[[ids], ...], **columns);
the reward reads `completion_ids` directly, so no decode/re-encode round trip changes what is scored.
Prompts are WordStartTask's random ordinary-token prompts, decoded to text (TRL tokenizes text prompts).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from reference_impl.server import ALL_LINEAR


@dataclass
class TrlRun:
    steps: int
    train_runtime_s: float      # TRL's own wall time of trainer.train()
    step_times_s: list[float]   # TRL's per-step `step_time` log (generation + reward + loss + optimizer)
    rewards: list[float] = field(default_factory=list)
    completion_mean_len: list[float] = field(default_factory=list)

    @property
    def wall_per_step_s(self) -> float:
        return self.train_runtime_s / self.steps


def build_trl_grpo(model_path: str, output_dir: str, *, steps: int, prompts_per_step: int, group_size: int,
                   max_new_tokens: int, rank: int = 16, alpha: int = 32, lr: float = 2e-2, device: str = "cuda",
                   seed: int = 0, prompt_len: int = 16):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from reference_impl.models import load_tokenizer
    from reference_impl.tasks import WordStartTask

    task = WordStartTask(model_path, prompt_len=prompt_len, seed=seed)
    tokenizer = load_tokenizer(Path(model_path))
    prompts = [tokenizer.decode(p) for step in range(steps) for p in task.prompts(step, prompts_per_step)]

    def word_start_reward(completion_ids, **_):
        return [task.reward([], ids) for ids in completion_ids]

    on_cpu = device == "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if on_cpu else torch.bfloat16,
                                                 local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing: deprecated alias in new transformers
        args = GRPOConfig(
            output_dir=output_dir, use_vllm=False, max_steps=steps, num_generations=group_size,
            per_device_train_batch_size=prompts_per_step * group_size,  # one step = prompts_per_step groups
            max_completion_length=max_new_tokens,
            generation_kwargs={"min_new_tokens": max_new_tokens},  # like ignore_eos: every completion is full
            temperature=1.0, beta=0.0, learning_rate=lr, gradient_checkpointing=False,
            use_cpu=on_cpu, bf16=not on_cpu, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, seed=seed)
    peft_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ALL_LINEAR), lora_dropout=0.0,
                             bias="none", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=word_start_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          peft_config=peft_config)
    if not on_cpu:
        # One GPU like the splitrl trainer: with several training GPUs visible, HF Trainer would otherwise wrap
        # the model in DataParallel (the same override Trainer applies itself for model parallelism).
        trainer.args._n_gpu = 1
    return trainer


def run_trl(trainer) -> TrlRun:
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "step_time" in h]
    return TrlRun(steps=trainer.state.global_step, train_runtime_s=float(out.metrics.get("train_runtime", wall)),
                  step_times_s=[float(h["step_time"]) for h in logs],
                  rewards=[float(h["reward"]) for h in logs if "reward" in h],
                  completion_mean_len=[float(h["completions/mean_length"]) for h in logs
                                       if "completions/mean_length" in h])
