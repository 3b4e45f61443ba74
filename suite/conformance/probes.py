"""Fixed prompts and the two sides of every logprob comparison (SGLang served vs HF+PEFT reference)."""
from __future__ import annotations

import random
from contextlib import contextmanager

import pytest

from reference_impl.conformance import ConformanceError
from reference_impl.client import SamplingParams
from reference_impl.hf_engine import input_logprobs

PROMPTS = [[random.Random(n).randrange(10, 151643) for _ in range(n)] for n in (16, 33, 64, 100)]


def served_logprobs(client, lora, prompts=PROMPTS):
    """SGLang's input logprobs from position 0 (a request that never reuses the radix cache)."""
    res = client.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0), lora=lora,
                          return_logprob=True, logprob_start_len=0)
    return [r.input_logprobs[1:len(p)] for r, p in zip(res, prompts)]


def reference_logprobs(hf_reference, adapter_dir, prompts=PROMPTS):
    """HF+PEFT logprobs for the adapter saved at `adapter_dir` (None: the base model)."""
    if adapter_dir is None:
        return input_logprobs(hf_reference, prompts, None)
    name = f"ref-{abs(hash(str(adapter_dir)))}"
    hf_reference.load_lora_adapter(name, str(adapter_dir))
    try:
        return input_logprobs(hf_reference, prompts, name)
    finally:
        hf_reference.unload_lora_adapter(name)


VLLM_SAME_NAME_STALE_KV = (
    "vLLM 0.26.0 keys prefix-cache blocks by the adapter's name alone (v1/core/kv_cache_utils.py, "
    "_gen_lora_extra_hash_keys), so a reload under the same name reuses KV computed with the old weights: the vllm "
    "#42125 class, found on the GPU in run m. The reference implementation never reuses a name (policy-<run tag>-vN)")


@contextmanager
def vllm_same_name_stale_kv_is_known(backend: str):
    """Around the same-name reload checks: on vLLM their failure is the upstream bug above, reported as xfail with
    the measured numbers (a vLLM that fixes it passes); on SGLang it fails."""
    try:
        yield
    except (ConformanceError, AssertionError) as e:
        if backend == "vllm":
            pytest.xfail(f"{VLLM_SAME_NAME_STALE_KV}: {e}")
        raise
