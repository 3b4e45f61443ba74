"""Merge a saved PEFT LoRA adapter into the base model's weights and write a complete HF model dir.

    merger = WeightMerger("/path/to/base")            # the base checkpoint is read once, kept in CPU memory
    result = merger.merge("/path/to/policy-v3", "policy-v3")
    result.path  # <root>/policy-v3: config.json, *.safetensors (base names and dtypes), tokenizer files

W' = W + (alpha / r) * B @ A, computed in fp32 (on CUDA when available), cast back to W's dtype. The output
has exactly the base checkpoint's tensor names, dtypes and shard layout, so a server loads it with the same
loader as the base (SGLang /update_weights_from_disk). It is written to a temp sibling and renamed, so a
server never sees half a model; only the newest `keep` merged dirs are kept, so tmpfs does not fill.

Refused with MergeError (never merged wrongly): DoRA, rank/alpha patterns, LoRA on embeddings, bias
training, modules_to_save, fan_in_fan_out, target modules missing from the base, LoRA on a tied lm_head.
rsLoRA is merged with its own scale alpha / sqrt(r).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DEFAULT_SHM_ROOT = Path("/dev/shm/splitrl-merged")


class MergeError(ValueError):
    """An adapter this merger cannot merge exactly; the message says why."""


@dataclass(frozen=True)
class MergeResult:
    path: Path
    merge_ms: float         # B @ A, scale, add, cast (device time included: synchronised)
    write_ms: float         # safetensors + copied files + rename
    load_base_ms: float     # reading the base checkpoint (0 once it is cached)
    tensors_merged: int
    bytes_written: int


@dataclass(frozen=True)
class AdapterScales:
    scale: float
    rank: int
    config: dict


def adapter_scale(config: dict) -> AdapterScales:
    """The scale PEFT applies to B @ A for a plain (or rs) LoRA; MergeError for what this merger refuses."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        problems.append("use_dora=true: DoRA rescales each column by a learned magnitude; merging it as plain "
                        "LoRA would be wrong")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern: per-module ranks or alphas are not supported by this merger")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r}: trained biases are not merged")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config.get('modules_to_save')}: fully trained modules are not merged")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true (Conv1D weights): not supported")
    r, alpha = int(config.get("r", 0)), float(config.get("lora_alpha", 0))
    if r <= 0:
        problems.append(f"rank r={config.get('r')!r} must be a positive integer")
    if problems:
        raise MergeError("cannot merge this adapter: " + "; ".join(problems))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return AdapterScales(scale, r, config)


def base_key(lora_key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj.weight', 'A')."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in lora_key:
            module, _, _ = lora_key.partition(marker)
            if module.startswith("base_model.model."):
                module = module[len("base_model.model."):]
            return f"{module}.weight", part[-1]
    return None


def default_merge_root(need_bytes: int = 0) -> Path:
    """/dev/shm/splitrl-merged when tmpfs exists and has room for `need_bytes`, else the temp dir (disk)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        try:
            free = shutil.disk_usage(shm).free
        except OSError:
            free = 0
        if free > need_bytes:
            return DEFAULT_SHM_ROOT
    return Path(tempfile.gettempdir()) / "splitrl-merged"


class WeightMerger:
    """Merges adapters into one base checkpoint; keeps the base state dict in CPU memory between merges, and
    the targeted base tensors also on the merge device (CUDA: the trainer's GPU; bf16, the model's size)."""

    def __init__(self, base_path: str | os.PathLike, root: str | os.PathLike | None = None, keep: int = 2,
                 device: str | None = None):
        import torch

        self.torch = torch
        self.base_path = Path(base_path)
        self.shards = sorted(self.base_path.glob("*.safetensors"))
        if not self.shards:
            raise MergeError(f"{self.base_path}: no *.safetensors weights (a config-only or .bin checkpoint "
                             "cannot be merged: build it with real weights)")
        self.config = json.loads((self.base_path / "config.json").read_text())
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self.keep = max(1, keep)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base_bytes = sum(p.stat().st_size for p in self.shards)
        # room for `keep` finished dirs plus the one being written
        parent = Path(root) if root is not None else default_merge_root((self.keep + 1) * base_bytes)
        parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="run-", dir=parent))  # own dir: concurrent runs never clash
        self._base: dict[str, dict] | None = None  # shard file name -> {tensor name: CPU tensor}
        self._written: list[Path] = []
        self._device_base: dict[str, object] = {}  # tensor name -> base tensor on self.device (CUDA only)

    # -- base ----------------------------------------------------------------------------------------
    def base_state(self) -> dict[str, dict]:
        if self._base is None:
            from safetensors.torch import load_file
            self._base = {p.name: load_file(str(p), device="cpu") for p in self.shards}
        return self._base

    def _on_device(self, name: str, w):
        """The base tensor on the merge device, kept there across merges: copying the base from the CPU each
        time (and casting it to fp32 there) was most of a merge on the GPU (~1.5 s of 2 s for a 0.6B shape)."""
        if not self.device.startswith("cuda"):
            return w
        if name not in self._device_base:
            self._device_base[name] = w.to(self.device, non_blocking=False)
        return self._device_base[name]

    def _where(self) -> dict[str, str]:
        return {name: shard for shard, tensors in self.base_state().items() for name in tensors}

    # -- merge ---------------------------------------------------------------------------------------
    def merged_tensors(self, adapter_dir: str | os.PathLike) -> tuple[dict[str, "object"], float, float]:
        """{base tensor name: merged tensor (base dtype, CPU)}, merge_ms, load_base_ms."""
        from safetensors.torch import load_file

        torch = self.torch
        adapter_dir = Path(adapter_dir)
        cfg_path = adapter_dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise MergeError(f"{adapter_dir}: no adapter_config.json (not a PEFT LoRA adapter dir)")
        scales = adapter_scale(json.loads(cfg_path.read_text()))
        t0 = time.perf_counter()
        where = self._where()
        load_base_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        pairs: dict[str, dict[str, object]] = {}
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        if self.tied and any(".lm_head." in f".{k}" or "embed_tokens" in k for k in tensors):
            raise MergeError(f"{adapter_dir}: the adapter touches lm_head/embed_tokens, but lm_head is tied to "
                             "embed_tokens (tie_word_embeddings): merging into one would untie them")
        for key, tensor in tensors.items():
            parsed = base_key(key)
            if parsed is None:
                raise MergeError(f"{adapter_dir}: tensor {key!r} is not a LoRA A/B weight (embedding LoRA, bias or "
                                 "modules_to_save are not merged)")
            pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
        missing = sorted(k for k in pairs if k not in where)
        if missing:
            raise MergeError(f"{adapter_dir}: target modules missing from the base checkpoint {self.base_path}: "
                             f"{missing[:4]}")
        out = {}
        for name, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise MergeError(f"{adapter_dir}: {name} has lora_{''.join(ab)} but not both A and B")
            w = self._on_device(name, self.base_state()[where[name]][name])
            a = ab["A"].to(self.device, torch.float32)
            b = ab["B"].to(self.device, torch.float32)
            if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
                raise MergeError(f"{name}: B{tuple(b.shape)} @ A{tuple(a.shape)} does not fit the base weight "
                                 f"{tuple(w.shape)}")
            # copy=True: never add into the cached base tensor (a float32 CPU base would otherwise be aliased)
            merged = w.to(self.device, torch.float32, copy=True).addmm_(b, a, alpha=scales.scale)
            out[name] = merged.to(w.dtype).cpu()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3, load_base_ms

    def merge(self, adapter_dir: str | os.PathLike, name: str) -> MergeResult:
        """Merge and write <root>/<name> atomically; older merged dirs beyond `keep` are removed."""
        from safetensors.torch import save_file

        merged, merge_ms, load_base_ms = self.merged_tensors(adapter_dir)
        t0 = time.perf_counter()
        final = self.root / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        written = 0
        try:
            for item in self.base_path.iterdir():
                if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(item, tmp / item.name)  # config, generation config, tokenizer, shard index
            for shard, tensors in self.base_state().items():
                out = {k: merged.get(k, v) for k, v in tensors.items()}
                save_file(out, str(tmp / shard), metadata={"format": "pt"})
                written += (tmp / shard).stat().st_size
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_ms = (time.perf_counter() - t0) * 1e3
        self._written = [p for p in self._written if p != final] + [final]
        for old in self._written[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self._written = self._written[-self.keep:]
        return MergeResult(final, merge_ms, write_ms, load_base_ms, len(merged), written)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._written = []
        self._device_base.clear()
