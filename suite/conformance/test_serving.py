"""Serving on a real GPU: the server starts on the tiny model with the real Qwen3 tokenizer, generates from
token ids with logprobs, reports its memory, stops with nothing left; a second config works in the same session."""
import pytest

from reference_impl.client import SamplingParams
from reference_impl.procs import pids_in_group

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


def test_second_config_in_same_session_and_clean_stop(server_pool, lora_server, plain_server):
    """The session's second config (no LoRA: fixtures/gpu.py PLAIN_SERVER) serves next to the LoRA server; stopping
    it leaves no process of its group and the LoRA server untouched. Afterwards the pool relaunches it on demand."""
    from fixtures.gpu import PLAIN_SERVER

    assert plain_server.port != lora_server.port
    res = plain_server.client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, temperature=0))
    assert res[0].completion_tokens == 4
    pgid = plain_server.pid
    server_pool.release(**PLAIN_SERVER)
    assert plain_server.stopped_by in ("term", "kill")
    assert pids_in_group(pgid) == []
    assert lora_server.client.health()  # the shared server is untouched
