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


# Input/output features of each projection, from a Qwen-style config.json (hidden, heads, head_dim, mlp).
def _projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads, kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def synthetic_lora_adapter(model_path: str, out_dir: Path, rank: int = 16, alpha: int | None = None,
                           target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                           seed: int = 0, b_std: float = 0.02) -> Path:
    """A PEFT-format LoRA adapter with random bf16 A and B, written from config.json alone.

    For benchmarks on large shapes: make_peft_adapter loads the whole model (tens of seconds for 1.7B/4B on a
    CPU); this writes the same files (names, shapes, adapter_config.json) in well under a second."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_path) / "config.json").read_text())
    shapes = _projection_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for m in target_modules:
            fan_in, fan_out = shapes[m]
            block = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * b_std).bfloat16()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
           "target_modules": list(target_modules), "lora_dropout": 0.0, "bias": "none", "use_dora": False,
           "use_rslora": False, "fan_in_fan_out": False, "base_model_name_or_path": str(model_path)}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
