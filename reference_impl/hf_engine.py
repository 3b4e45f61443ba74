"""An in-process HF+PEFT rollout engine with SGLang's adapter API (load/unload by name from a saved dir).

It is a real inference engine, not a test double: it loads the adapters the trainer saved and samples with
their weights. It serves two purposes: the loop and the sync strategies run end to end on a CPU (CI proves
that weights flow through saved adapters), and it is the "HF generate" peer baseline on a GPU.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from .client import GenerateResult, SamplingParams, ServerHTTPError

BASE_NAME = "base"


class HFEngine:
    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32", seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = device
        self.base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                         local_files_only=True).to(device).eval()
        self.model = self.base           # becomes a PeftModel at the first adapter load
        self.adapters: dict[str, str] = {}
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.model_path = str(model_path)
        self.weight_version = "default"  # as SGLang: reported with every result, set by full-weight updates

    # -- the SGLangClient surface the sync strategies and the loop use ---------------------------------
    def health(self, timeout_s: float = 0) -> bool:
        return True

    def models(self) -> list[str]:
        return [BASE_NAME, *self.adapters]

    def load_lora_adapter(self, name: str, path: str, pinned: bool = False, timeout_s: float = 0) -> dict:
        from peft import PeftModel

        if name in self.adapters:
            raise ServerHTTPError("/load_lora_adapter", 400,
                                  f"Failed to load LoRA adapter {name} because it is already loaded")
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)
        self._cast_adapter(name)
        self.adapters[name] = path
        return dict(self.adapters)

    # -- full-weight updates (the merged strategy) -------------------------------------------------------
    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 abort_all_requests: bool = False, timeout_s: float | None = None) -> dict:
        """Copy every base weight from the checkpoint dir into the model (same names, shapes); an incomplete or
        mismatched checkpoint changes nothing and raises, as SGLang rolls back on a load error."""
        from safetensors.torch import load_file

        if self.adapters:
            raise ServerHTTPError("/update_weights_from_disk", 400, "HFEngine: unload the LoRA adapters before a "
                                  f"full-weight update (loaded: {list(self.adapters)})")
        shards = sorted(Path(model_path).glob("*.safetensors"))
        if not shards:
            raise ServerHTTPError("/update_weights_from_disk", 400, f"Failed to update weights: no safetensors "
                                  f"in {model_path}; rolled back to the original weights")
        new = {}
        for shard in shards:
            new.update(load_file(str(shard)))
        params = dict(self.base.named_parameters())
        tied = self.base.get_output_embeddings() is not None and \
            self.base.get_output_embeddings().weight is self.base.get_input_embeddings().weight
        absent = [n for n in params if n not in new and not (tied and n == "lm_head.weight")]
        bad = [n for n, t in new.items() if n not in params or tuple(t.shape) != tuple(params[n].shape)]
        if absent or bad:
            raise ServerHTTPError("/update_weights_from_disk", 400, "Failed to update weights: checkpoint does not "
                                  f"fit the model (missing {absent[:3]}, unexpected/misshaped {bad[:3]}); rolled "
                                  "back to the original weights")
        with self.torch.no_grad():
            for n, t in new.items():
                params[n].copy_(t.to(params[n].dtype))
        self.model_path = str(model_path)
        if weight_version is not None:
            self.weight_version = weight_version
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def pause_generation(self, mode: str = "retract", timeout_s: float | None = None) -> dict:
        return {}  # in-process and synchronous: nothing is ever in flight during a sync

    def continue_generation(self, timeout_s: float | None = None) -> dict:
        return {}

    def model_info(self) -> dict:
        return {"model_path": self.model_path, "weight_version": self.weight_version, "is_generation": True}

    def _cast_adapter(self, name: str) -> None:
        """Hold the adapter in the model's dtype, as a server does. PEFT keeps LoRA weights in float32 (it even
        upcasts bf16 files) and so computes the LoRA path more precisely than any bf16 server; with the large
        LoRA weights of a sharply trained policy that alone moved logprobs by ~0.2 nats (2xH200, H100 runs)."""
        dtype = self.base.dtype
        with self.torch.no_grad():
            for pname, p in self.model.named_parameters():
                if f".{name}." in pname and "lora_" in pname and p.dtype != dtype:
                    p.data = p.data.to(dtype)

    def unload_lora_adapter(self, name: str, timeout_s: float = 0) -> dict:
        if name not in self.adapters:
            raise ServerHTTPError("/unload_lora_adapter", 400,
                                  f"LoRA with name {name} does not exist. Loaded LoRAs: {list(self.adapters)}")
        if len(self.adapters) == 1:
            # PEFT cannot delete its last adapter: go back to the plain base model instead.
            self.base = self.model.unload()
            self.model = self.base
        else:
            if self.model.active_adapter == name:
                self.model.set_adapter(next(a for a in self.adapters if a != name))
            self.model.delete_adapter(name)
        del self.adapters[name]
        return dict(self.adapters)

    def generate(self, input_ids: Sequence[Sequence[int]], sampling: SamplingParams, lora: str | None = None,
                 return_logprob: bool = False, logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 timeout_s: float | None = None, extra_key: str | None = None) -> list[GenerateResult]:
        # extra_key namespaces SGLang's prefix cache; this engine keeps no cache across calls, so it is moot here
        if lora is not None and not isinstance(lora, str):
            raise ValueError("HFEngine serves one adapter per batch")
        if lora is not None and lora not in self.adapters:
            raise ServerHTTPError("/generate", 400, f"Got LoRA adapter that has never been loaded: {lora}")
        t0 = time.perf_counter()
        with self._adapter(lora):
            out_ids, out_lps = self._sample(input_ids, sampling)
        dt = time.perf_counter() - t0
        return [GenerateResult(output_ids=o, prompt_tokens=len(p), completion_tokens=len(o), cached_tokens=0,
                               finish_reason="length", output_logprobs=lp, e2e_latency_s=dt,
                               weight_version=self.weight_version)
                for p, o, lp in zip(input_ids, out_ids, out_lps)]

    # -- internals -----------------------------------------------------------------------------------
    def _adapter(self, lora: str | None):
        import contextlib

        if lora is None:
            return self.model.disable_adapter() if self.model is not self.base else contextlib.nullcontext()
        self.model.set_adapter(lora)
        return contextlib.nullcontext()

    def _sample(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams):
        """Plain ancestral sampling with a KV cache; logprobs are of the sampled tokens at temperature T
        (as SGLang reports them). Greedy when temperature == 0. Always max_new_tokens (ignore_eos)."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p))
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        past, tokens, logps = None, [], []
        step_in = ids
        with torch.no_grad():
            for _ in range(sampling.max_new_tokens):
                out = self.model(input_ids=step_in, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                nxt, lp = _pick(torch, logits, sampling.temperature, self.generator)
                tokens.append(nxt)
                logps.append(lp)
                step_in = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(step_in)], dim=1)
                pos = pos[:, -1:] + 1
        toks = torch.stack(tokens, 1).cpu().tolist()
        lps = torch.stack(logps, 1).cpu().tolist()
        return toks, lps


def _pick(torch, logits, temperature: float, generator):
    if temperature <= 0:
        lsm = torch.log_softmax(logits, -1)
        nxt = lsm.argmax(-1)
    else:
        lsm = torch.log_softmax(logits / temperature, -1)
        nxt = torch.multinomial(lsm.exp().cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return nxt, lsm.gather(-1, nxt[:, None]).squeeze(-1)


def input_logprobs(engine: HFEngine, prompts: Sequence[Sequence[int]], lora: str | None) -> list[list[float]]:
    """HF+PEFT logprobs of each prompt token given its prefix (position 0 has none), one forward per prompt:
    the reference SGLang's `input_token_logprobs` (logprob_start_len=0) is compared with."""
    torch = engine.torch
    out = []
    with engine._adapter(lora), torch.no_grad():
        for ids in prompts:
            x = torch.tensor([list(ids)], device=engine.device)
            logits = engine.model(input_ids=x).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
            out.append(lp.cpu().tolist())
    return out
