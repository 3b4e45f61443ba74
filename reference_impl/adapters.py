"""Adapters made with PEFT for tests and benchmarks (the trainer makes the real ones).

PEFT initialises lora_B to zero, which is a no-op adapter: these get a nonzero B so that serving them changes
outputs measurably.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def make_peft_adapter(model_path: str, out_dir: Path, rank: int = 16, alpha: int | None = None,
                      target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 0,
                      b_std: float = 0.02, **config_overrides) -> Path:
    """A PEFT LoRA on `model_path` with random A and B, saved as bf16 with save_pretrained.

    config_overrides are written into adapter_config.json afterwards (e.g. use_rslora=True, use_dora=True)
    to produce adapters a server must refuse or would serve wrongly."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .trainer import perturb_lora_b

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, local_files_only=True)
    lcfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    perturb_lora_b(model, b_std, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    if config_overrides:
        cfg_path = out_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(config_overrides)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir
