"""LoRA trainer: one protocol, two backends (Unsloth on GPU, PEFT+transformers anywhere, CPU tests included).

The trainer owns the policy's LoRA, computes per-token logprobs of sampled completions (only for the
completion positions: `logits_to_keep` avoids materialising logits for the prompt), takes GRPO steps with
the *sampler's* logprobs as old logprobs, and saves adapters atomically for the server to load.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .grpo import GRPOConfig, decoupled_offpolicy, group_advantages, grpo_loss, sequence_logprobs_from_logits
from .server import ALL_LINEAR


class AdapterFormatError(ValueError):
    """An adapter the server would serve wrongly or refuse (rsLoRA, DoRA, rank/modules outside the pool)."""


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ALL_LINEAR
    dropout: float = 0.0
    # SGLang 0.5.14 always scales by alpha/r: rsLoRA (alpha/sqrt(r)) would be served with the wrong scale.
    use_rslora: bool = False
    use_dora: bool = False
    init_b_std: float = 0.0  # >0: nonzero lora_B at init (PEFT's zero B is a no-op adapter)

    def __post_init__(self):
        if self.use_rslora or self.use_dora:
            raise AdapterFormatError("rsLoRA/DoRA adapters are not served correctly by SGLang 0.5.14 "
                                     "(scaling is always lora_alpha/r, DoRA is rejected): use plain LoRA")


@dataclass
class TrainerConfig:
    model_path: str
    backend: str = "peft"           # "peft" | "unsloth"
    lora: LoraSpec = field(default_factory=LoraSpec)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lr: float = 5e-3
    device: str = "cpu"
    dtype: str = "bfloat16"         # "float32" is faster on CPU
    max_seq_len: int = 2048
    seed: int = 0
    adapter_root: str | None = None  # None: a tmpfs dir when /dev/shm exists
    # Off-policy correction (pipelined runs sample with a lagging version). None: TRL's ratio against the
    # sampler's logprobs, clipped. A number C: the decoupled objective (grpo.decoupled_offpolicy), the clip
    # around the trainer's own pre-step policy and each token weighted by min(pi_trainer / pi_sampler, C).
    tis_cap: float | None = None


@dataclass
class Rollout:
    """One sampled completion with the sampler's own per-token logprobs (the GRPO old logprobs)."""
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    reward: float = 0.0
    cached_tokens: int = 0
    adapter: str | None = None
    version: int | None = None  # the policy version that sampled it (pipelined runs: may lag the trainer)


def default_adapter_root() -> Path:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix="splitrl-adapters-", dir=base))


class LoraTrainer:
    def __init__(self, cfg: TrainerConfig):
        import torch

        self.cfg = cfg
        self.torch = torch
        torch.manual_seed(cfg.seed)
        self.model, self.device = _load_backend(cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.adapter_root = Path(cfg.adapter_root) if cfg.adapter_root else default_adapter_root()
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        self.steps = 0

    # -- logprobs ------------------------------------------------------------------------------------
    def completion_logprobs(self, rollouts: Sequence[Rollout], grad: bool = False):
        """[B, C] logprobs of each completion token under the current policy, plus its mask."""
        torch = self.torch
        ids, mask, pos, prompt_width, comp_width = _left_pad_batch(rollouts, self.device)
        with torch.set_grad_enabled(grad):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             logits_to_keep=comp_width + 1, use_cache=False)
            logits = out.logits[:, :-1, :]  # position t predicts token t+1: drop the last
            targets = ids[:, prompt_width:]
            logps = sequence_logprobs_from_logits(logits, targets)
        return logps, mask[:, prompt_width:].to(logps.dtype)

    def sequence_logprobs(self, token_ids: Sequence[int], adapter_enabled: bool = True) -> list[float]:
        """Logprobs of token_ids[1:] given their prefix (the HF+PEFT reference for SGLang's input logprobs)."""
        torch = self.torch
        x = torch.tensor([list(token_ids)], device=self.device)
        self.model.eval()
        try:
            with torch.no_grad():
                if adapter_enabled:
                    logits = self.model(input_ids=x).logits
                else:
                    with self.model.disable_adapter():
                        logits = self.model(input_ids=x).logits
            return sequence_logprobs_from_logits(logits[:, :-1, :], x[:, 1:])[0].float().cpu().tolist()
        finally:
            self.model.train()

    # -- GRPO step -----------------------------------------------------------------------------------
    def train_step(self, rollouts: Sequence[Rollout], group_size: int, dist=None) -> dict:
        """One GRPO step on the whole batch; with a DistContext each rank takes its own groups and the
        gradients are combined so the step equals the single-process one."""
        torch = self.torch
        t0 = time.perf_counter()
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        adv, stats = group_advantages(rewards, group_size, self.cfg.grpo.scale_rewards)  # whole-batch stats
        dapo = self.cfg.grpo.loss_type == "dapo"
        batch_tokens = None
        if dist is not None:
            # dapo normalises by the tokens of the whole batch; each rank's share then sums to the batch loss
            batch_tokens = float(sum(len(r.completion_ids) for r in rollouts)) if dapo else None
            mine = dist.shard(len(rollouts), group_size)
            rollouts, adv = [rollouts[i] for i in mine], adv[mine.start:mine.stop]
        _check_sampler_logprobs(rollouts)
        self.model.train()
        logps, mask = self.completion_logprobs(rollouts, grad=True)
        old = _pad_float([r.sampler_logprobs for r in rollouts], logps.shape[1], self.device)
        weights = None
        if self.cfg.tis_cap is not None:
            old, weights, tis = decoupled_offpolicy(logps.float(), old, mask.float(), self.cfg.tis_cap)
        loss, metrics = grpo_loss(logps.float(), old, adv.to(self.device), mask.float(), self.cfg.grpo,
                                  num_items_in_batch=batch_tokens, token_weights=weights)
        if weights is not None:
            metrics.update(tis)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = float(loss.detach())
        if dist is not None:
            dist.reduce_gradients(self.params, average=not dapo)
            loss_value = dist.sum_scalar(loss_value) / (1 if dapo else dist.world)
        self.opt.step()
        self.steps += 1
        if dist is not None:  # the ranks must still hold the same adapter; a checksum costs one all-reduce
            metrics["rank_param_spread"] = dist.spread(self.param_checksum())
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"loss": loss_value, "train_s": time.perf_counter() - t0,
                "equal_reward_groups": stats.equal_reward_groups, "num_groups": stats.num_groups,
                "train_tokens": int(mask.sum()), **metrics}

    def param_checksum(self) -> float:
        """Sum of the trainable weights in float64: equal across data-parallel ranks that took the same steps."""
        with self.torch.no_grad():
            return float(sum(p.detach().double().sum() for p in self.params))

    # -- adapters ------------------------------------------------------------------------------------
    def save_adapter(self, name: str) -> Path:
        """Write to a temp dir then rename: the server never sees a half-written adapter."""
        final = self.adapter_root / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.adapter_root))
        try:
            self.model.save_pretrained(str(tmp))
            check_adapter_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def close(self) -> None:
        shutil.rmtree(self.adapter_root, ignore_errors=True)


def check_adapter_dir(path: Path, max_rank: int | None = None, pool_modules: Sequence[str] | None = None) -> dict:
    """Refuse what SGLang 0.5.14 would serve wrongly (rsLoRA, patterns) or reject (DoRA, outside the pool)."""
    cfg_path = Path(path) / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: no adapter_config.json (not a PEFT LoRA adapter dir)")
    cfg = json.loads(cfg_path.read_text())
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_rslora"):
        problems.append("use_rslora=true: SGLang scales by alpha/r, so rsLoRA would be served with the wrong scale")
    if cfg.get("use_dora"):
        problems.append("use_dora=true: SGLang rejects DoRA")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern are ignored by SGLang: per-module ranks would be served wrong")
    if max_rank is not None and int(cfg.get("r", 0)) > max_rank:
        problems.append(f"rank {cfg.get('r')} is above the server's LoRA pool max rank {max_rank}")
    if pool_modules is not None:
        mods = cfg.get("target_modules") or []
        outside = sorted(set([mods] if isinstance(mods, str) else mods) - set(pool_modules))
        if outside and mods != "all-linear":
            problems.append(f"target modules {outside} are outside the server's LoRA pool {list(pool_modules)}")
    if problems:
        raise AdapterFormatError(f"{path}: " + "; ".join(problems))
    return cfg


# -- backends ---------------------------------------------------------------------------------------------
def _load_backend(cfg: TrainerConfig):
    if cfg.backend == "unsloth":
        from .trainer_unsloth import load_unsloth_model
        return load_unsloth_model(cfg)
    if cfg.backend == "peft":
        return _load_peft_model(cfg)
    raise ValueError(f"unknown trainer backend {cfg.backend!r}: use 'peft' or 'unsloth'")


def _load_peft_model(cfg: TrainerConfig):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype, local_files_only=True).to(cfg.device)
    lcfg = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.target_modules),
                      lora_dropout=cfg.lora.dropout, bias="none", use_rslora=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    perturb_lora_b(model, cfg.lora.init_b_std, cfg.seed)
    return model, cfg.device


def perturb_lora_b(model, std: float, seed: int) -> None:
    """Give lora_B nonzero values so an untrained adapter is not a no-op (tests compare versions)."""
    if std <= 0:
        return
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))


# -- batching ---------------------------------------------------------------------------------------------
def _left_pad_batch(rollouts: Sequence[Rollout], device: str):
    """Prompts left-padded to one width P, completions right-padded to C: completion tokens of every row start
    at column P, so `logits_to_keep=C+1` covers exactly their predictions. Position ids skip the padding so
    each row sees the positions the server saw."""
    import torch

    P = max(len(r.prompt_ids) for r in rollouts)
    C = max(len(r.completion_ids) for r in rollouts)
    ids = torch.zeros((len(rollouts), P + C), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, P - p:P] = torch.tensor(r.prompt_ids)
        ids[i, P:P + c] = torch.tensor(r.completion_ids, dtype=torch.long)
        mask[i, P - p:P + c] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device), P, C


def _check_sampler_logprobs(rollouts: Sequence[Rollout]) -> None:
    """Every completion token needs the sampler's logprob (GRPO's old logprob). A missing one would be padded
    as 0 (probability 1): the ratio would silently become pi(token) instead of pi/pi_old."""
    for i, r in enumerate(rollouts):
        if len(r.sampler_logprobs) != len(r.completion_ids):
            raise ValueError(f"rollout {i} has {len(r.sampler_logprobs)} sampler logprobs for "
                             f"{len(r.completion_ids)} completion tokens: ask the engine for them "
                             "(generate(..., return_logprob=True)); GRPO's ratio needs the sampler's logprobs")


def _pad_float(rows: Sequence[Sequence[float]], width: int, device: str):
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out.to(device)
