"""The suite catches the bugs it exists for: each conformance check fails on a server that has the bug.

The GPU conformance tests (suite/conformance) judge SGLang with the check functions of
reference_impl.conformance. Here the same checks run, driven the same way, against the FAKE SGLang
(fixtures.fake_sglang) in its opt-in BUG MODES (fixtures.fake_sglang_state.BUGS), and must raise
ConformanceError on the buggy fake and pass on the normal one:

    1  hot-reload correctness          stale_adapter (OpenPipe/ART #661), serve_base (verl #5220)
    2  policy changes every step       stale_adapter, serve_base
    4  prefix cache cold after reload  keep_radix_on_reload (vllm #42125)
    6  adapter lifecycle bounded       never_unload (and a sync that never unloads: the seed PR)
    7  restart serves newest adapter   restart_without_adapter (the seed PR's restart)

The fake's "logprobs" are a deterministic function of the adapter's weight bytes and the tokens, so the
reference for an adapter is what a second, non-buggy fake with only that adapter loaded answers (on a GPU
it is HF+PEFT). Nothing here is evidence about SGLang; it is evidence that the checks can fail.
"""
from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass, field, replace

import pytest

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import BUGS, FakeSGLangState
from reference_impl import conformance as C
from reference_impl.client import SamplingParams, ServerHTTPError, SGLangClient
from reference_impl.conformance import ConformanceError
from reference_impl.loop import LoopConfig, rollout
from reference_impl.server import ATTENTION_ONLY, LoraPoolConfig, SGLangServer, ServerConfig
from reference_impl.sync import HotReload, Restart, SyncError, version_name
from suite.unit.adapters_for_tests import ATTENTION, make_adapter

PROMPTS = [[random.Random(n).randrange(10, 151643) for _ in range(n)] for n in (16, 33)]
LONG = [random.Random(7).randrange(10, 151643) for _ in range(64)]
GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


# ---------------------------------------------------------------- the two sides of every comparison

def served_logprobs(client, lora, prompts=PROMPTS):
    """Input logprobs from position 0 (a request that never reuses the radix cache), as the GPU probes ask."""
    res = client.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0), lora=lora,
                          return_logprob=True, logprob_start_len=0)
    return [r.input_logprobs[1:len(p)] for r, p in zip(res, prompts)]


def probe(client, lora, prompt=LONG):
    """A cache-eligible greedy request (no input logprobs): (cached_tokens, output_ids, output_logprobs)."""
    r = client.generate([prompt], GREEDY, lora=lora, return_logprob=True)[0]
    return r.cached_tokens, r.output_ids, r.output_logprobs


class Reference:
    """A second, non-buggy fake: what a correct server answers for an adapter that is the only one loaded."""

    def __init__(self, client: SGLangClient):
        self.client = client

    @contextlib.contextmanager
    def _loaded(self, path):
        if path is None:
            yield None
            return
        self.client.load_lora_adapter("ref", str(path))
        try:
            yield "ref"
        finally:
            self.client.unload_lora_adapter("ref")

    def logprobs(self, path, prompts=PROMPTS):
        with self._loaded(path) as name:
            return served_logprobs(self.client, name, prompts)

    def probe(self, path, prompt=LONG):
        with self._loaded(path) as name:
            return probe(self.client, name, prompt)


def fake_state(bugs=()) -> FakeSGLangState:
    return FakeSGLangState(model_path="fake-model", enable_lora=True, max_lora_rank=16, target_modules=ATTENTION,
                           bugs=bugs)


@pytest.fixture(scope="module")
def reference():
    with FakeSGLangServer(fake_state()) as srv:
        yield Reference(SGLangClient(srv.url, timeout_s=10))


@contextlib.contextmanager
def serving(bugs=()):
    with FakeSGLangServer(fake_state(bugs)) as srv:
        yield SGLangClient(srv.url, timeout_s=10), srv.state


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[str]:
    """Six adapter versions with different weights, the same shape (so memory compares like for like)."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"a{i}", r=16, hidden=256, layers=2, seed=i) for i in range(6)]
