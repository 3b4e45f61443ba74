"""Tiny PEFT-shaped adapter dirs for CPU tests (adapter_config.json + a real, small adapter_model.safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapter(path: Path, r: int = 8, alpha: int = 16, target_modules=ATTENTION, seed: int = 0,
                 hidden: int = 32, layers: int = 1, **config_overrides) -> str:
    """Write an adapter dir; different `seed` -> different weight bytes. Returns the absolute path as str."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": list(target_modules) if not isinstance(target_modules, str) else target_modules,
              "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False,
              "base_model_name_or_path": "fake-model"}
    config.update(config_overrides)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    gen = torch.Generator().manual_seed(seed)
    mods = ATTENTION if isinstance(target_modules, str) else target_modules
    tensors = {}
    for layer in range(layers):
        for m in mods:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, hidden, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, r, generator=gen)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path.resolve())
