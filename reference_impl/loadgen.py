"""Closed-loop load generator: one request per prompt, at most C in flight, against SGLang or vLLM.

Two senders per backend build the SAME request body for a prompt so their throughput can be compared side by side:
  raw      plain `requests` POST of the JSON body (a thread-local Session per worker): SGLang's /generate,
           vLLM's /v1/completions
  harness  the reference implementation's client (SGLangClient / VLLMClient).generate, thread-local per worker
SGLang's body is batched-of-one (`"input_ids": [ids]`), exactly what SGLangClient sends for one prompt; vLLM's is
vllm_client.completion_request, what VLLMClient sends for one prompt.

GPU-free: runs against any HTTP server of those shapes (the CPU tests use the FAKE servers).
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import requests

from .client import generate_request

TOKEN_LO, TOKEN_HI = 1000, 150000  # ordinary Qwen3 BPE ids: no specials, no EOS


def make_prompts(count: int, prompt_len: int, seed: int, round_idx: int, purpose: str = "load",
                 lo: int = TOKEN_LO, hi: int = TOKEN_HI) -> list[list[int]]:
    """`count` random prompts of `prompt_len` ids in [lo, hi). The seed includes the round and purpose, so
    each round (and the TTFT probe) gets new prompts: no prefix-cache hit can flatter a later round."""
    rng = random.Random(f"{seed}:{purpose}:{round_idx}")
    return [[rng.randrange(lo, hi) for _ in range(prompt_len)] for _ in range(count)]


def sampling_json(gen_len: int, temperature: float = 1.0) -> dict:
    """The sampling params both paths send: equal to SamplingParams(max_new_tokens=gen_len,
    temperature=temperature, ignore_eos=True).as_json() (top_p 1.0 and top_k -1 are its defaults)."""
    return {"max_new_tokens": int(gen_len), "temperature": float(temperature), "top_p": 1.0, "top_k": -1,
            "ignore_eos": True}


def generate_body(prompt: Sequence[int], gen_len: int, lora: str | None, temperature: float = 1.0) -> dict:
    """The body a GRPO rollout sends (loop.rollout through SGLangClient): with the sampler's output logprobs,
    which the ratio needs, so raw and harness measure the same request."""
    return generate_request([prompt], sampling_json(gen_len, temperature), lora, return_logprob=True)


@dataclass
class Reply:
    """What one request returned, as the server counted it (meta_info) plus len(output_ids)."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    output_ids: int
    latency_s: float = 0.0


@dataclass
class PathResult:
    """One closed-loop pass over a prompt set: totals and the wall time from first send to last reply."""
    path: str
    concurrency: int
    wall_s: float
    replies: list[Reply] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.replies)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.replies)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.replies)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.replies)

    @property
    def latencies_s(self) -> list[float]:
        return [r.latency_s for r in self.replies]


class RawSender:
    """Plain HTTP: `requests` POST of generate_body() (the client's request body); no client object, session or
    response parsing of reference_impl involved."""
    path = "raw"

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def __call__(self, prompt, gen_len: int, lora: str | None, temperature: float = 1.0) -> Reply:
        r = self._session().post(self.url + "/generate", json=generate_body(prompt, gen_len, lora, temperature),
                                 timeout=self.timeout_s)
        if r.status_code != 200:
            raise RuntimeError(f"/generate -> HTTP {r.status_code}: {r.text[:500]}")
        js = r.json()
        item = js[0] if isinstance(js, list) else js
        meta = item.get("meta_info") or {}
        self.check_meta(meta)
        return Reply(int(meta.get("prompt_tokens", 0)), int(meta.get("completion_tokens", 0)),
                     int(meta.get("cached_tokens", 0) or 0), len(item.get("output_ids") or []))

    def check_meta(self, meta: dict) -> None:
        """A hook for senders that must verify each reply (raise to fail the request); none here."""

    def flush_cache(self, wait_idle_s: float = 30.0) -> None:
        """Empty the radix cache (setup between passes, never timed); waits for the server to go idle."""
        r = requests.post(self.url + "/flush_cache", params={"timeout": wait_idle_s}, timeout=wait_idle_s + 30)
        if r.status_code != 200:
            raise RuntimeError(f"/flush_cache -> HTTP {r.status_code}: {r.text[:300]}")


class HarnessSender:
    """The reference implementation's rollout path: SGLangClient.generate([prompt], SamplingParams(...), lora,
    return_logprob=True), the request loop.rollout sends (GRPO needs the sampler's logprobs)."""
    path = "harness"

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.url, self.timeout_s = base_url, timeout_s
        self._local = threading.local()

    def make_client(self):
        from .client import SGLangClient

        return SGLangClient(self.url, timeout_s=self.timeout_s)

    def __call__(self, prompt, gen_len: int, lora: str | None, temperature: float = 1.0) -> Reply:
        from .client import SamplingParams

        if not hasattr(self._local, "client"):
            self._local.client = self.make_client()
        res = self._local.client.generate([prompt], SamplingParams(max_new_tokens=gen_len, temperature=temperature,
                                                                   ignore_eos=True), lora=lora,
                                              return_logprob=True)[0]
        return Reply(res.prompt_tokens, res.completion_tokens, res.cached_tokens, len(res.output_ids))


class VLLMRawSender(RawSender):
    """Plain HTTP to vLLM: `requests` POST of vllm_client.completion_request() to /v1/completions, one prompt per
    request (as VLLMClient sends them). `model` is the served base name; an adapter is named in its place."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 600.0):
        super().__init__(base_url, timeout_s)
        self.model = model

    def __call__(self, prompt, gen_len: int, lora: str | None, temperature: float = 1.0) -> Reply:
        from .client import SamplingParams
        from .vllm_client import completion_request

        sampling = SamplingParams(max_new_tokens=gen_len, temperature=temperature, ignore_eos=True)
        r = self._session().post(self.url + "/v1/completions", timeout=self.timeout_s,
                                 json=completion_request(prompt, sampling, lora or self.model, return_logprob=True))
        if r.status_code != 200:
            raise RuntimeError(f"/v1/completions -> HTTP {r.status_code}: {r.text[:500]}")
        js = r.json()
        usage, choice = js.get("usage") or {}, (js.get("choices") or [{}])[0]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return Reply(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), int(cached),
                     len(choice.get("token_ids") or []))

    def flush_cache(self, wait_idle_s: float = 30.0) -> None:
        """POST /reset_prefix_cache (a dev route); vLLM answers success=false while blocks are in use: retried."""
        from .vllm_client import VLLMClient

        VLLMClient(self.url, timeout_s=wait_idle_s + 30, model=self.model).flush_cache(wait_idle_s=wait_idle_s)


class VLLMHarnessSender(HarnessSender):
    """The reference implementation's rollout path on vLLM: VLLMClient.generate([prompt], ..., return_logprob=True)."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 600.0):
        super().__init__(base_url, timeout_s)
        self.model = model

    def make_client(self):
        from .vllm_client import VLLMClient

        return VLLMClient(self.url, timeout_s=self.timeout_s, model=self.model, max_workers=1)


def senders_for(backend: str, base_url: str, model: str | None = None, timeout_s: float = 600.0) -> list:
    """[raw, harness] for the backend; vLLM needs the served base model's name."""
    if backend == "sglang":
        return [RawSender(base_url, timeout_s), HarnessSender(base_url, timeout_s)]
    if backend == "vllm":
        if not model:
            raise ValueError("vLLM senders need the served model name")
        return [VLLMRawSender(base_url, model, timeout_s), VLLMHarnessSender(base_url, model, timeout_s)]
    raise ValueError(f"unknown backend {backend!r} (sglang or vllm)")


Sender = Callable[..., Reply]


class ClosedLoop:
    """A pool of C workers that lives across rounds (connections are made once, in the warm-up round).
    Submitting every prompt at once to C workers is a closed loop: a worker sends its next request as
    soon as its previous reply arrives, so at most C requests are in flight."""

    def __init__(self, concurrency: int):
        if concurrency < 1:
            raise ValueError(f"concurrency {concurrency} must be >= 1")
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loadgen")

    def run(self, send: Sender, prompts: Sequence[Sequence[int]], gen_len: int, lora: str | None,
            temperature: float = 1.0) -> PathResult:
        def one(prompt) -> Reply:
            t = time.perf_counter()
            reply = send(prompt, gen_len, lora, temperature)
            reply.latency_s = time.perf_counter() - t
            return reply

        t0 = time.perf_counter()
        futures = [self._pool.submit(one, p) for p in prompts]
        replies = [f.result() for f in futures]  # re-raises the first failure
        return PathResult(getattr(send, "path", "custom"), self.concurrency, time.perf_counter() - t0, replies)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ClosedLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
