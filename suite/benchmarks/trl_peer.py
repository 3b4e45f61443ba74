"""The peer baseline: TRL's GRPOTrainer generating with HF `generate` (use_vllm=False) on the same model, task
(WordStartTask: word-start reward on completion token ids), group size, LoRA rank and completion length as the
splitrl loop. Used by test_bench_step.py on a GPU and by test_trl_peer_cpu.py (tiny model, CPU, 1 step).

The peer runs in a child process of its own (run_trl_in_child): on a GPU the pytest plugin imports Unsloth
first, and Unsloth patches TRL's GRPOTrainer in place (its patched generate step calls `model.for_training`,
which a plain HF model lacks: that broke the in-process peer on nvidia-h200-x4, 2026-11-26). The child imports
TRL without Unsloth, so the baseline is plain TRL, and it says so (`unsloth_imported` false in its answer).

    python suite/benchmarks/trl_peer.py --model DIR --out DIR --json RESULT.json [--steps 5 --device cuda ...]

TRL 1.16 calls reward functions as f(prompts=..., completions=..., completion_ids=[[ids], ...], **columns);
the reward reads `completion_ids` directly, so no decode/re-encode round trip changes what is scored.
Prompts are WordStartTask's random ordinary-token prompts, decoded to text (TRL tokenizes text prompts).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
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


@dataclass
class PeerSettings:
    steps: int
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    rank: int = 16
    alpha: int = 32
    lr: float = 2e-2
    device: str = "cuda"
    seed: int = 0


def run_trl_in_child(model_path: str, output_dir: str, settings: PeerSettings, gpu_index: int | None = None,
                     timeout_s: float = 1800.0) -> tuple[TrlRun, bool]:
    """Build and train the peer in a fresh interpreter (no Unsloth patches); (run, unsloth_imported_in_child).
    gpu_index: the physical GPU (PCI order) the child sees as cuda:0. Bounded: a hung child is killed."""
    result = Path(output_dir) / "trl-peer-result.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    if gpu_index is not None:
        env.update(CUDA_VISIBLE_DEVICES=str(gpu_index), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    argv = [sys.executable, str(Path(__file__).resolve()), "--model", model_path, "--out", output_dir,
            "--json", str(result)] + [f"--{k.replace('_', '-')}={v}" for k, v in asdict(settings).items()]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"TRL peer did not finish within {timeout_s:.0f} s") from e
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"TRL peer child exited {proc.returncode}:\n{tail}")
    answer = json.loads(result.read_text())
    return TrlRun(**answer["run"]), bool(answer["unsloth_imported"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "rank", "alpha", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    given = {k: getattr(args, k) for k in PeerSettings.__dataclass_fields__ if getattr(args, k) is not None}
    trainer = build_trl_grpo(args.model, args.out, **asdict(PeerSettings(**given)))
    run = run_trl(trainer)
    Path(args.json).write_text(json.dumps({"run": asdict(run), "unsloth_imported": "unsloth" in sys.modules}))


if __name__ == "__main__":
    main()
