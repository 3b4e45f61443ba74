"""Serving on a real GPU: the server starts on the tiny model with the real Qwen3 tokenizer, generates from
token ids with logprobs, reports its memory, stops with nothing left; a second config works in the same session."""
import pytest

from reference_impl.client import SamplingParams
from reference_impl.procs import pids_in_group
from reference_impl.server import SGLangServer

from fixtures.plugin import sglang_only

from .probes import PROMPTS

pytestmark = pytest.mark.gpu


def test_generates_from_token_ids_with_logprobs(lora_server):
    res = lora_server.client.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True),
                                      return_logprob=True, logprob_start_len=0)
    for r, p in zip(res, PROMPTS[:2]):
        assert r.completion_tokens == 8 and len(r.output_ids) == 8
        assert len(r.input_logprobs) == len(p) and r.input_logprobs[0] is None
        assert all(lp is not None and lp <= 0 for lp in r.input_logprobs[1:] + r.output_logprobs)


def test_reports_memory(lora_server, backend):
    sglang_only(backend, "reads SGLang's /server_info memory_usage")
    mem = lora_server.client.memory_usage()
    assert mem.get("weight", 0) > 0 and mem.get("token_capacity", 0) > 0, mem


def test_second_config_in_same_session_and_clean_stop(server_pool, lora_server, backend):
    sglang_only(backend, "builds a second SGLang config (vLLM's lifecycle: suite/unit/test_vllm_backend.py)")
    import dataclasses
    cfg = dataclasses.replace(server_pool.base, lora=None, mem_fraction_static=0.15)
    with SGLangServer(cfg) as other:
        assert other.port != lora_server.port
        res = other.client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, temperature=0))
        assert res[0].completion_tokens == 4
        pgid = other.pid
    assert other.stopped_by in ("term", "kill")
    assert pids_in_group(pgid) == []
    assert lora_server.client.health()  # the shared server is untouched
