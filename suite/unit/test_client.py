"""SGLangClient against the in-thread FAKE SGLang (fixtures.fake_sglang): protocol and error paths only.

The fake is a test double of the SGLang 0.5.14 HTTP API; nothing here is evidence about SGLang on a GPU.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import FakeSGLangState
from reference_impl.client import SamplingParams, ServerHTTPError, ServerUnreachable, SGLangClient
from suite.unit.adapters_for_tests import make_adapter

GREEDY = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
PROMPT = list(range(100, 120))


@pytest.fixture
def adapters(tmp_path) -> dict[str, str]:
    return {"a1": make_adapter(tmp_path / "a1", seed=1), "a2": make_adapter(tmp_path / "a2", seed=2)}


def run_in_thread(fn):
    """Start fn in a thread; returns (thread, box) where box gets 'result' or 'error'."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def wait_until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- generation ------------------------------------------------------------------------------------------
def test_generate_batch_with_logprobs(client, adapters):
    client.load_lora_adapter("a1", adapters["a1"])
    prompts = [[1, 5, 9, 11], [7, 8, 9]]
    res = client.generate(prompts, GREEDY, lora=["a1", None], return_logprob=True, logprob_start_len=0)
    assert len(res) == 2
    for r, p in zip(res, prompts):
        assert r.prompt_tokens == len(p) and r.completion_tokens == 5 and len(r.output_ids) == 5
        assert r.finish_reason == "length"
        assert len(r.input_logprobs) == len(p) and r.input_logprobs[0] is None
        assert all(isinstance(x, float) and x < 0 for x in r.input_logprobs[1:])
        assert len(r.output_logprobs) == 5 and all(x < 0 for x in r.output_logprobs)
        assert r.meta["input_token_logprobs"][1][1] == p[1]  # entries are [logprob, token_id, text]
        assert r.weight_version == "default" and r.e2e_latency_s is not None
    # without return_logprob no logprob lists come back
    plain = client.generate(prompts[:1], GREEDY)[0]
    assert plain.output_logprobs == [] and plain.input_logprobs == []


def test_lora_per_item_and_weights_determine_numbers(client, adapters, tmp_path):
    client.load_lora_adapter("a1", adapters["a1"])
    client.load_lora_adapter("a2", adapters["a2"])
    client.load_lora_adapter("a1-copy", adapters["a1"])  # same weights under another name
    kw = dict(return_logprob=True, logprob_start_len=0)
    r = client.generate([PROMPT] * 4, GREEDY, lora=["a1", "a2", None, "a1-copy"], **kw)
    assert r[0].input_logprobs != r[1].input_logprobs != r[2].input_logprobs
    assert r[0].input_logprobs == r[3].input_logprobs and r[0].output_ids == r[3].output_ids
    # a single name applies to every item
    both = client.generate([PROMPT, PROMPT], GREEDY, lora="a2", **kw)
    assert both[0].output_logprobs == both[1].output_logprobs == r[1].output_logprobs


def test_flat_input_ids_answer_one_object(fake):
    js = requests.post(fake.url + "/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": 2, "ignore_eos": True}}, timeout=5).json()
    assert isinstance(js, dict) and len(js["output_ids"]) == 2


# -- LoRA load / unload -------------------------------------------------------------------------------------
def test_load_unload_happy_path(client, adapters, fake):
    assert client.load_lora_adapter("a1", adapters["a1"]) == {"a1": adapters["a1"]}
    assert client.load_lora_adapter("a2", adapters["a2"]) == {"a1": adapters["a1"], "a2": adapters["a2"]}
    cards = requests.get(fake.url + "/v1/models", timeout=5).json()["data"]
    assert [c["id"] for c in cards] == ["fake-model", "a1", "a2"]
    assert cards[1]["root"] == adapters["a1"] and cards[1]["parent"] == "fake-model"
    assert client.unload_lora_adapter("a1") == {"a2": adapters["a2"]}
    assert client.models() == ["fake-model", "a2"]


def _expect_400(call, needle: str) -> ServerHTTPError:
    with pytest.raises(ServerHTTPError) as ei:
        call()
    assert ei.value.status == 400, ei.value
    assert needle in ei.value.error_message, ei.value.error_message
    return ei.value


def test_error_already_loaded(client, adapters):
    client.load_lora_adapter("a1", adapters["a1"])
    _expect_400(lambda: client.load_lora_adapter("a1", adapters["a2"]),
                "Failed to load LoRA adapter a1 because it is already loaded")


def test_error_unknown_unload(client, adapters):
    client.load_lora_adapter("a1", adapters["a1"])
    e = _expect_400(lambda: client.unload_lora_adapter("nope"), "LoRA with name nope does not exist. Loaded LoRAs:")
    assert "a1" in e.error_message


def test_error_never_loaded_name_on_generate(client):
    _expect_400(lambda: client.generate([PROMPT], GREEDY, lora="ghost"),
                "Got LoRA adapter that has never been loaded: ghost")


@pytest.mark.parametrize("kw,needle", [
    ({"use_dora": True}, "doesn't support DoRA adapters"),
    ({"r": 32}, "incompatible with the current LoRA memory pool configuration"),
    ({"target_modules": ("q_proj", "gate_proj")}, "incompatible with the current LoRA memory pool configuration"),
    ({"peft_type": "IA3"}, "peft_type must be LORA"),
], ids=["dora", "rank-above-pool", "module-outside-pool", "not-lora"])
def test_error_adapter_rejected(client, tmp_path, kw, needle):
    path = make_adapter(tmp_path / "bad", **kw)
    _expect_400(lambda: client.load_lora_adapter("bad", path), needle)
    assert client.models() == ["fake-model"]


def test_error_path_not_a_dir(client, tmp_path):
    _expect_400(lambda: client.load_lora_adapter("x", str(tmp_path / "missing")), "is not a local directory")


def test_rslora_is_silently_accepted(client, tmp_path):
    """SGLang 0.5.14 ignores use_rslora (wrong scale, no error): the suite must catch that itself."""
    path = make_adapter(tmp_path / "rs", use_rslora=True)
    assert client.load_lora_adapter("rs", path) == {"rs": path}


def test_all_linear_pool_and_fused_names(tmp_path):
    st = FakeSGLangState(enable_lora=True, max_lora_rank=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                            "down_proj"])
    with FakeSGLangServer(st) as srv:
        path = make_adapter(tmp_path / "al", r=8, target_modules="all-linear")
        assert "al" in SGLangClient(srv.url, timeout_s=5).load_lora_adapter("al", path)


def test_resurrection_after_unload(client, adapters, fake):
    """Real SGLang reloads an unloaded-but-known name from its cached path when a request names it."""
    client.load_lora_adapter("a1", adapters["a1"])
    before = client.generate([PROMPT], GREEDY, lora="a1")[0]
    assert client.unload_lora_adapter("a1") == {}
    after = client.generate([PROMPT], GREEDY, lora="a1")[0]
    assert after.output_ids == before.output_ids
    assert "a1" in client.models() and fake.state.counters["resurrect"] == 1
    # ...so a same-name explicit reload now races with it (notes: prefer versioned names)
    _expect_400(lambda: client.load_lora_adapter("a1", adapters["a2"]), "already loaded")


def test_unload_waits_for_in_flight_requests(client, adapters, fake):
    client.load_lora_adapter("a1", adapters["a1"])
    fake.state.request_delay_s = 0.6
    t, box = run_in_thread(lambda: client.generate([PROMPT], GREEDY, lora="a1"))
    wait_until(lambda: fake.state.busy > 0)
    t0 = time.monotonic()
    assert client.unload_lora_adapter("a1") == {}
    assert time.monotonic() - t0 > 0.2  # blocked until the request finished
    t.join(timeout=5)
    assert "result" in box and box["result"][0].completion_tokens == 5


# -- cache ---------------------------------------------------------------------------------------------
def test_flush_cache_busy_is_400(client, fake):
    fake.state.request_delay_s = 0.8
    t, box = run_in_thread(lambda: client.generate([PROMPT], GREEDY))
    try:
        wait_until(lambda: fake.state.busy > 0)
        _expect_400(client.flush_cache, "Flush cache failed.")
        client.flush_cache(wait_idle_s=5)  # ?timeout= waits for idle, then flushes
    finally:
        t.join(timeout=5)
    assert "result" in box
    fake.state.request_delay_s = 0.0
    client.flush_cache()


def test_cached_tokens(client, adapters):
    client.load_lora_adapter("a1", adapters["a1"])
    client.load_lora_adapter("a2", adapters["a2"])
    cached = lambda **kw: client.generate([PROMPT], GREEDY, **kw)[0].cached_tokens  # noqa: E731
    assert cached(lora="a1") == 0
    assert cached(lora="a1") == len(PROMPT) - 1
    assert cached(lora="a2") == 0  # other lora_id: disjoint tree
    assert cached() == 0  # base model
    assert cached(lora="a1", return_logprob=True, logprob_start_len=0) == 0  # capped at logprob_start_len
    assert cached(lora="a1", return_logprob=True, logprob_start_len=5) == 5
    client.unload_lora_adapter("a1")
    client.load_lora_adapter("a1", adapters["a1"])  # same name, same path: new lora_id -> cold
    assert cached(lora="a1") == 0
    assert cached(lora="a1") == len(PROMPT) - 1
    client.flush_cache()
    assert cached(lora="a1") == 0


# -- memory and info -------------------------------------------------------------------------------------
def test_release_resume_memory(tmp_path):
    with FakeSGLangServer(FakeSGLangState(memory_saver=True)) as srv:
        c = SGLangClient(srv.url, timeout_s=5)
        assert set(c.memory_usage()) >= {"weight", "kvcache", "token_capacity", "graph"}
        c.release_memory_occupation()
        with pytest.raises(ServerHTTPError) as ei:
            c.generate([PROMPT], GREEDY)
        assert ei.value.status == 500
        c.resume_memory_occupation()
        assert c.generate([PROMPT], GREEDY)[0].completion_tokens == 5
    with FakeSGLangServer(FakeSGLangState(memory_saver=False)) as srv:  # no --enable-memory-saver: a no-op
        c = SGLangClient(srv.url, timeout_s=5)
        c.release_memory_occupation()
        assert c.generate([PROMPT], GREEDY)[0].completion_tokens == 5


def test_info_endpoints(client):
    assert client.health()
    assert client.model_info()["model_path"] == "fake-model"
    assert client.server_info()["max_lora_rank"] == 16


def test_lora_disabled(tmp_path):
    with FakeSGLangServer(FakeSGLangState()) as srv:
        c = SGLangClient(srv.url, timeout_s=5)
        _expect_400(lambda: c.load_lora_adapter("a", make_adapter(tmp_path / "a")), "LoRA is not enabled")
        _expect_400(lambda: c.generate([PROMPT], GREEDY, lora="a"), "LoRA is not enabled")


# -- unreachable servers -----------------------------------------------------------------------------------
def test_unreachable_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable):
        c.server_info()
    assert not c.health(timeout_s=1)
    assert time.monotonic() - t0 < 3


def test_unreachable_server_that_never_answers():
    with socket.socket() as s:  # accepts connections (kernel backlog) but never replies
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        c = SGLangClient(f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(ServerUnreachable, match="no answer"):
            c.generate([PROMPT], GREEDY)
        assert time.monotonic() - t0 < 3
        t0 = time.monotonic()
        assert not c.health(timeout_s=0.5)
        assert time.monotonic() - t0 < 3
