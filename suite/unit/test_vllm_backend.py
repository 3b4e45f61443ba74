"""The vLLM comparison backend on CPU: VLLMServerConfig argv/env, VLLMServer lifecycle with a real child process,
VLLMClient protocol mapping, HotReload unchanged, and the vllm #42125 stale-prefix check.

Everything here runs against fixtures.fake_vllm, a TEST DOUBLE of vLLM's HTTP API: these tests check our
process handling and protocol mapping, never vLLM or a GPU.
"""
from __future__ import annotations

import dataclasses

import json
import sys
from pathlib import Path

import pytest

from fixtures.fake_vllm import FakeVLLMServer, FakeVLLMState
from reference_impl.client import SamplingParams, ServerHTTPError, ServerUnreachable
from reference_impl.conformance import (ConformanceError, assert_cold, assert_differs, assert_warm,
                                        check_inplace_reload)
from reference_impl.procs import pids_in_group
from reference_impl.server import ServerStartError
from reference_impl.sync import HotReload, version_name
from reference_impl.vllm_client import VLLMClient
from reference_impl.vllm_server import VLLMServer, VLLMServerConfig
from suite.unit.adapters_for_tests import make_adapter

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = list(range(100, 140))  # 40 tokens: 2 full blocks of 16


@pytest.fixture
def adapters(tmp_path):
    return [make_adapter(tmp_path / f"a{i}", r=8, seed=i) for i in range(3)]


@pytest.fixture
def fake():
    with FakeVLLMServer(FakeVLLMState(model="fake-model", max_lora_rank=16, sleep_mode=True)) as srv:
        yield srv


@pytest.fixture
def client(fake) -> VLLMClient:
    return VLLMClient(fake.url, timeout_s=10)


# -- config -> argv / env -------------------------------------------------------------------------------
def test_argv_and_env(tmp_path):
    cfg = VLLMServerConfig(python="/venv/bin/python", model_path="/m", gpu_ids="1", max_lora_rank=32, max_loras=2,
                           max_cpu_loras=6, gpu_memory_utilization=0.4, max_model_len=2048, sleep_mode=True,
                           extra_args=["--foo"], extra_env={"X": "1"})
    argv = cfg.argv(23456)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    s = " ".join(argv)
    for frag in ("--model /m", "--host 127.0.0.1", "--port 23456", "--dtype bfloat16", "--tensor-parallel-size 1",
                 "--gpu-memory-utilization 0.4", "--max-model-len 2048", "--enable-lora", "--max-lora-rank 32",
                 "--max-loras 2", "--max-cpu-loras 6", "--enforce-eager", "--enable-sleep-mode",
                 "--enable-prefix-caching", "--enable-prompt-tokens-details", "--attention-backend TRITON_ATTN"):
        assert frag in s, frag
    assert argv[-1] == "--foo"
    env = cfg.child_env({"PATH": "/usr/bin", "PYTHONPATH": "/trainer", "VIRTUAL_ENV": "/t",
                         "VLLM_ATTENTION_BACKEND": "FLASH_ATTN"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_ATTENTION_BACKEND" not in env and env["X"] == "1"  # ignored by 0.26.0: the flag decides
    assert env["VLLM_HOST_IP"] == "127.0.0.1"  # torch.distributed's init_method on loopback
    assert cfg.child_env({"VLLM_HOST_IP": "10.0.0.5"})["VLLM_HOST_IP"] == "10.0.0.5"  # a user's choice stays
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["PATH"].startswith("/venv/bin")
    plain = VLLMServerConfig(python="/p", model_path="/m", dev_mode=False, enforce_eager=False, max_cpu_loras=None)
    assert "VLLM_SERVER_DEV_MODE" not in plain.child_env({"VLLM_SERVER_DEV_MODE": "1"})
    a = plain.argv(1)
    assert "--enable-sleep-mode" not in a and "--enforce-eager" not in a and "--max-cpu-loras" not in a
    assert "--max-cudagraph-capture-size" not in a and "--max-cudagraph-capture-size" not in s  # vLLM's default
    capped = " ".join(dataclasses.replace(plain, max_cudagraph_capture_size=32).argv(1))
    assert "--max-cudagraph-capture-size 32" in capped
    eager = dataclasses.replace(cfg, max_cudagraph_capture_size=32).argv(1)
    assert "--max-cudagraph-capture-size" not in eager  # eager: no graphs to cap


def test_python_from_env(monkeypatch):
    monkeypatch.setenv("SPLITRL_VLLM_PYTHON", "/opt/vllm-venv/bin/python")
    assert VLLMServerConfig(model_path="/m").python == "/opt/vllm-venv/bin/python"
    monkeypatch.delenv("SPLITRL_VLLM_PYTHON")
    with pytest.raises(ServerStartError, match="SPLITRL_VLLM_PYTHON"):
        VLLMServer(VLLMServerConfig(model_path="/m")).start()


# -- lifecycle with a real child (the fake) -------------------------------------------------------------
def _cfg(tmp_path: Path, **kw) -> VLLMServerConfig:
    (tmp_path / "model").mkdir(exist_ok=True)
    kw.setdefault("startup_timeout_s", 20)
    return VLLMServerConfig(python=sys.executable, model_path=str(tmp_path / "model"),
                            launch_module="fixtures.fake_vllm", log_dir=tmp_path / "logs", **kw)


def test_lifecycle_start_use_stop(tmp_path, adapters, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "spawn_child")
    srv = VLLMServer(_cfg(tmp_path, sleep_mode=True))
    with srv:
        pgid = srv.pid
        assert srv.client.health() and len(pids_in_group(pgid)) == 2
        assert srv.client.models() == [srv.model_name]
        assert srv.client.load_lora_adapter("policy-v0", adapters[0]) == {"policy-v0": adapters[0]}
        out = srv.client.generate([PROMPT], GREEDY, lora="policy-v0")
        assert len(out[0].output_ids) == 8
        log = srv.log_path.read_text()
        assert "TRITON_ATTN" in log and "CUDA_VISIBLE_DEVICES=0" in log
    assert srv.stopped_by == "term" and pids_in_group(pgid) == []


def test_fail_fast_with_log_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "exit_at_start")
    srv = VLLMServer(_cfg(tmp_path, startup_timeout_s=60))
    with pytest.raises(ServerStartError, match="exited with code 3") as ei:
        srv.start()
    assert "fake vLLM startup failure" in str(ei.value)
    assert pids_in_group(srv.pid) == []


def test_stop_kills_a_server_ignoring_term(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "ignore_term")
    srv = VLLMServer(_cfg(tmp_path)).start()
    assert srv.stop(term_timeout_s=1) == "kill"
    assert pids_in_group(srv.pid) == []


def test_restart_applies_changes(tmp_path):
    srv = VLLMServer(_cfg(tmp_path))
    with srv:
        assert srv.client.health()
        srv.restart(served_model_name="served")
        assert srv.client.models() == ["served"]


def test_startup_adapters_are_json_lora_modules_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = VLLMServerConfig(python="/p", model_path="/m", **VLLMServerConfig(python="/p").startup_adapter_changes(
        "policy-v3", "adapters/a=b,c"))
    argv = VLLMServer.absolute_paths(cfg).argv(1)
    item = argv[argv.index("--lora-modules") + 1]
    assert json.loads(item) == {"name": "policy-v3", "path": str(tmp_path / "adapters/a=b,c")}
    with pytest.raises(ValueError, match="enable-lora"):
        VLLMServerConfig(python="/p", enable_lora=False).startup_adapter_changes("x", "/a")


def test_restart_strategy_registers_the_new_adapter_at_start(tmp_path, adapters):
    """The one-GPU fallback on vLLM: stop, start with --lora-modules, the new version served, the old group gone."""
    from reference_impl.sync import Restart

    with VLLMServer(_cfg(tmp_path)) as srv:
        strategy = Restart(srv)
        old_group = srv.pid
        assert "stop_s" in strategy.pause_for_training() and strategy.current is None
        rec = strategy.publish(1, adapters[1])
        assert pids_in_group(old_group) == [] and strategy.current == "policy-v1"
        assert "policy-v1" in srv.client.models() and rec.extra["restart_s"] > 0
        assert len(srv.client.generate([PROMPT], GREEDY, lora="policy-v1")[0].output_ids) == 8
        log = srv.log_path.read_text()  # the new process's banner: registered at start, not loaded afterwards
        assert "'lora_modules': ['{" in log and "POST /v1/load_lora_adapter" not in log


# -- client protocol and error mapping ------------------------------------------------------------------
def test_error_mapping(client, adapters, tmp_path):
    with pytest.raises(ServerHTTPError) as ei:
        client.unload_lora_adapter("nope")
    assert ei.value.status == 404 and "cannot be found" in ei.value.error_message
    client.load_lora_adapter("a", adapters[0])
    with pytest.raises(ServerHTTPError) as ei:
        client.load_lora_adapter("a", adapters[1])
    assert ei.value.status == 400 and "load_inplace" in ei.value.error_message
    with pytest.raises(ServerHTTPError) as ei:
        client.load_lora_adapter("b", str(tmp_path / "missing"))
    assert ei.value.status == 404 and "No adapter found" in ei.value.error_message
    big = make_adapter(tmp_path / "big", r=32)
    with pytest.raises(ServerHTTPError, match="max_lora_rank") as ei:
        client.load_lora_adapter("big", big)
    assert ei.value.status == 500
    with pytest.raises(ServerHTTPError, match="does not exist") as ei:
        client.generate([PROMPT], GREEDY, lora="unknown")
    assert ei.value.status == 404
    dead = VLLMClient("http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(ServerUnreachable):
        dead.models()
    assert dead.health(timeout_s=1) is False


def test_generate_mapping(client, adapters):
    client.load_lora_adapter("a", adapters[0])
    r = client.generate([PROMPT, PROMPT[:5]], GREEDY, lora=["a", None], return_logprob=True, logprob_start_len=0)
    assert [x.prompt_tokens for x in r] == [40, 5]
    assert all(len(x.output_ids) == 8 == len(x.output_logprobs) == x.completion_tokens for x in r)
    assert r[0].input_logprobs[0] is None and len(r[0].input_logprobs) == 40
    assert all(v < 0 for v in r[0].input_logprobs[1:]) and r[0].finish_reason == "length"
    assert r[0].output_logprobs != r[1].output_logprobs
    # start > 0: the slice, as SGLang's logprob_start_len
    assert client.generate([PROMPT], GREEDY, lora="a", return_logprob=True, logprob_start_len=10)[0].input_logprobs \
        == r[0].input_logprobs[10:]


def test_prefix_cache_counters_and_flush(client, adapters):
    client.load_lora_adapter("a", adapters[0])
    first = client.generate([PROMPT], GREEDY, lora="a")[0]
    assert_cold(first.cached_tokens, "first")
    again = client.generate([PROMPT], GREEDY, lora="a")[0]
    assert_warm(again.cached_tokens, len(PROMPT), "repeat", page_size=16)
    assert client.prefix_cache_counters() == {"queries": 80.0, "hits": 32.0}
    client.flush_cache()
    assert client.generate([PROMPT], GREEDY, lora="a")[0].cached_tokens == 0


def test_sleep_wake_mapping(client, fake):
    client.release_memory_occupation()
    assert client.is_sleeping() and fake.state.sleeping == 1
    with pytest.raises(ServerHTTPError):
        client.generate([PROMPT], GREEDY)
    client.resume_memory_occupation()
    assert not client.is_sleeping()
    assert client.generate([PROMPT], GREEDY)[0].cached_tokens == 0  # KV was dropped by sleep


def test_dev_routes_absent_without_dev_mode():
    with FakeVLLMServer(FakeVLLMState(dev_mode=False)) as srv:
        c = VLLMClient(srv.url, timeout_s=5)
        with pytest.raises(ServerHTTPError) as ei:
            c.flush_cache()
        assert ei.value.status == 404 and ei.value.error_message == "Not Found"


# -- sync strategies unchanged ---------------------------------------------------------------------------
def test_hot_reload_unchanged(client, adapters):
    sync = HotReload(client, timeout_s=10, run_tag="t1")
    sync.publish(0, adapters[0])
    assert sync.current == version_name(0, "t1")
    out0 = client.generate([PROMPT], GREEDY, lora=sync.current, return_logprob=True, logprob_start_len=0)
    rec = sync.publish(1, adapters[1])
    assert sync.current == "policy-t1-v1" and rec.extra["loaded_adapters"] == 1
    assert client.models() == ["fake-model", "policy-t1-v1"]
    out1 = client.generate([PROMPT], GREEDY, lora=sync.current, return_logprob=True, logprob_start_len=0)
    assert_differs([out1[0].input_logprobs], [out0[0].input_logprobs], "v1 vs v0")


def test_same_name_load_inplace(client, adapters):
    client.load_lora_adapter("policy", adapters[0])
    v0 = client.generate([PROMPT], GREEDY, lora="policy", return_logprob=True, logprob_start_len=0)[0]
    assert client.load_lora_adapter("policy", adapters[1], load_inplace=True) == {"policy": adapters[1]}
    v1 = client.generate([PROMPT], GREEDY, lora="policy", return_logprob=True, logprob_start_len=0)[0]
    assert_differs([v1.input_logprobs], [v0.input_logprobs], "inplace reload")


# -- vllm #42125: stale prefix cache after a same-name reload ------------------------------------------
def stale_prefix_check(client: VLLMClient, adapters) -> None:
    """The GPU suite's vllm #42125 check (reference_impl.conformance.check_inplace_reload), on the fake."""
    check_inplace_reload(client, "policy", adapters[0], adapters[1], PROMPT, GREEDY)


def test_stale_prefix_check_passes_on_correct_fake(client, adapters):
    stale_prefix_check(client, adapters)


def test_stale_prefix_bug_is_caught(adapters):
    with FakeVLLMServer(FakeVLLMState(bugs={"stale_prefix_on_inplace_reload"})) as srv:
        with pytest.raises(ConformanceError, match="differ|cached"):
            stale_prefix_check(VLLMClient(srv.url, timeout_s=5), adapters)
    with FakeVLLMServer(FakeVLLMState(bugs={"stale_prefix_on_inplace_reload"})) as srv:  # assert_cold alone
        c = VLLMClient(srv.url, timeout_s=5)
        c.load_lora_adapter("policy", adapters[0])
        c.generate([PROMPT], GREEDY, lora="policy")
        c.load_lora_adapter("policy", adapters[1], load_inplace=True)
        with pytest.raises(ConformanceError, match="stale KV"):
            assert_cold(c.generate([PROMPT], GREEDY, lora="policy")[0].cached_tokens, "after load_inplace")


# -- vLLM 0.26.0: prefix blocks keyed by the adapter's name (run m) -------------------------------------
def test_name_keyed_prefix_is_caught_in_place_and_after_unload(adapters):
    """What run m found on the GPU, on the fake that mimics it: both same-name reload paths reuse stale KV."""
    with FakeVLLMServer(FakeVLLMState(bugs={"prefix_keyed_by_lora_name"})) as srv:
        with pytest.raises(ConformanceError, match="differ|cached"):
            stale_prefix_check(VLLMClient(srv.url, timeout_s=5), adapters)
    with FakeVLLMServer(FakeVLLMState(bugs={"prefix_keyed_by_lora_name"})) as srv:
        c = VLLMClient(srv.url, timeout_s=5)
        c.load_lora_adapter("pc", adapters[0])
        c.generate([PROMPT], GREEDY, lora="pc")
        c.unload_lora_adapter("pc")
        c.load_lora_adapter("pc", adapters[1])
        with pytest.raises(ConformanceError, match="stale KV"):
            assert_cold(c.generate([PROMPT], GREEDY, lora="pc")[0].cached_tokens, "same-name reload")
        c.load_lora_adapter("pc-fresh", adapters[1])  # a new name starts cold even there
        assert c.generate([PROMPT], GREEDY, lora="pc-fresh")[0].cached_tokens == 0


def test_a_second_run_on_the_same_server_never_meets_the_first_runs_kv(adapters):
    """A persistent server outlives a run (the step benchmark ran split, then pipelined, on one vLLM server). With
    vLLM 0.26.0's name-keyed prefix cache (the fake's bug mode), a second run that published the first run's names
    would roll out on the first run's KV; each hot-reload strategy tags its names, so it starts cold."""
    with FakeVLLMServer(FakeVLLMState(bugs={"prefix_keyed_by_lora_name"})) as srv:
        c = VLLMClient(srv.url, timeout_s=5)

        def second_run_cached(tags: tuple[str | None, str | None]) -> int:
            first, second = (HotReload(c, run_tag=t) for t in tags)
            first.publish(0, adapters[0])
            c.generate([PROMPT], GREEDY, lora=first.current)
            c.unload_lora_adapter(first.current)  # the first run ends; the server stays up
            second.publish(0, adapters[1])
            cached = c.generate([PROMPT], GREEDY, lora=second.current)[0].cached_tokens
            c.unload_lora_adapter(second.current)
            return cached

        assert second_run_cached((None, None)) == 0  # default: a fresh tag per strategy
        with pytest.raises(ConformanceError, match="stale KV"):  # the untagged names of before
            assert_cold(second_run_cached(("", "")), "second run, same names")


def test_same_name_unload_and_load_is_cold_on_the_correct_fake(client, adapters):
    client.load_lora_adapter("pc", adapters[0])
    client.generate([PROMPT], GREEDY, lora="pc")
    client.unload_lora_adapter("pc")
    client.load_lora_adapter("pc", adapters[1])
    assert_cold(client.generate([PROMPT], GREEDY, lora="pc")[0].cached_tokens, "same-name reload")


def test_the_known_vllm_failure_is_an_xfail_on_vllm_only():
    from suite.conformance.probes import vllm_same_name_stale_kv_is_known
    with pytest.raises(pytest.xfail.Exception, match="keys prefix-cache blocks by the adapter's name"):
        with vllm_same_name_stale_kv_is_known("vllm"):
            assert_cold(496, "same-name reload")
    with pytest.raises(ConformanceError, match="496 cached"):
        with vllm_same_name_stale_kv_is_known("sglang"):
            assert_cold(496, "same-name reload")
    with vllm_same_name_stale_kv_is_known("vllm"):  # a vLLM without the bug passes
        assert_cold(0, "same-name reload")
