"""A micro Qwen3 checkpoint (vocab 320, hidden 64, 2 layers) saved with real safetensors: seconds on a CPU.
For merge and merged-sync tests that need a real base checkpoint but no learnable behaviour."""
from __future__ import annotations

from pathlib import Path


def micro_model(path: Path, tied: bool = True, dtype: str = "bfloat16", seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    (Path(path) / "tokenizer_config.json").write_text("{}")  # stands for the tokenizer files: must be copied
    return Path(path)
