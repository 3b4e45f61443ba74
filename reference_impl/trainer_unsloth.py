"""Unsloth backend of the LoRA trainer (GPU only; installed through the `unsloth` extra or the device kit).

Unsloth must be imported before transformers/peft, and writes a compile cache to the working directory:
both are handled here. Settings follow what ran on the GPU machine (shared notes, gpu-verified.md).
"""
from __future__ import annotations

import os
import sys
import tempfile


def prepare_unsloth_env() -> None:
    """Offline flags and a scratch compile cache; call before `import unsloth`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")  # we need logits for per-token logprobs
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION",
                          os.path.join(tempfile.gettempdir(), f"splitrl-unsloth-cache-{os.getuid()}"))


def import_unsloth_first() -> None:
    """Unsloth patches transformers/peft when imported; it must come first in the process."""
    prepare_unsloth_env()
    import unsloth  # noqa: F401


def load_unsloth_model(cfg):
    prepare_unsloth_env()
    if "transformers" in sys.modules and "unsloth" not in sys.modules:
        # Unsloth patches transformers at import; importing it late silently loses its kernels.
        print("[splitrl] warning: transformers was imported before unsloth", file=sys.stderr)
    import torch
    import unsloth  # noqa: F401  (patches transformers/peft)
    from unsloth import FastLanguageModel

    if not torch.cuda.is_available():
        raise RuntimeError("the Unsloth trainer needs a CUDA GPU: use --trainer peft on a machine without one")
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=cfg.model_path, max_seq_length=cfg.max_seq_len, dtype=torch.bfloat16, load_in_4bit=False,
        load_in_8bit=False, full_finetuning=False, fast_inference=False, local_files_only=True,
        fix_tokenizer=False)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
        target_modules=list(cfg.lora.target_modules), use_gradient_checkpointing=False,
        random_state=cfg.seed, use_rslora=False)
    FastLanguageModel.for_training(model)
    from .trainer import perturb_lora_b
    perturb_lora_b(model, cfg.lora.init_b_std, cfg.seed)
    return model, f"cuda:{torch.cuda.current_device()}"  # each DDP rank set its own device first
