"""HTTP client for a vLLM 0.26 OpenAI api_server with the SGLangClient surface the sync strategies and loop use.

    SGLangClient                          vLLM endpoint
    health()                              GET  /health
    models()                              GET  /v1/models (base + adapters)
    load_lora_adapter(name, path)         POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace}
    unload_lora_adapter(name)             POST /v1/unload_lora_adapter {lora_name}
    generate(input_ids, sampling, lora)   POST /v1/completions, one request per prompt (sent concurrently; vLLM
                                          batches them): per-prompt usage.prompt_tokens_details.cached_tokens
    flush_cache()                         POST /reset_prefix_cache          (needs VLLM_SERVER_DEV_MODE=1)
    release/resume_memory_occupation()    POST /sleep?level=1, POST /wake_up (needs --enable-sleep-mode + dev mode)
    prefix_cache_counters()               GET  /metrics vllm:prefix_cache_queries / vllm:prefix_cache_hits

load/unload answer plain text on success; the returned dict of loaded adapters {name: path} is read back from
/v1/models (vLLM's answer does not carry it). vLLM has no pinning; `pinned` is accepted and ignored. Errors:
ServerHTTPError with vLLM's own message ({"error": {"message"}}), ServerUnreachable when it cannot be reached.
Every call has a timeout.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import requests

from .client import GenerateResult, HttpClient, SamplingParams, ServerHTTPError, error_message_of

_METRIC_RE = re.compile(r"^(vllm:prefix_cache_(?:queries|hits))(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+\-naif]+)\s*$")


class VLLMClient(HttpClient):
    def __init__(self, base_url: str, timeout_s: float = 120.0, model: str | None = None, max_workers: int = 64):
        super().__init__(base_url, timeout_s)
        self._model = model          # the served base model name; None: read from /v1/models on first use
        self.max_workers = max_workers
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max_workers)
        self._session.mount("http://", adapter)

    @staticmethod
    def error_message(response: requests.Response) -> str:
        return _vllm_error_message(response)

    def _cards(self, timeout_s: float | None = None) -> list[dict]:
        return list(self._json("GET", "/v1/models", timeout_s=timeout_s).get("data", []))

    def models(self) -> list[str]:
        return [card["id"] for card in self._cards()]

    def loaded_adapters(self, timeout_s: float | None = None) -> dict[str, str]:
        """{adapter name: path}: the /v1/models cards that have a parent (the base has none)."""
        return {c["id"]: c.get("root") for c in self._cards(timeout_s) if c.get("parent")}

    @property
    def model(self) -> str:
        if self._model is None:
            base = [c for c in self._cards() if not c.get("parent")]
            if not base:
                raise ServerHTTPError("/v1/models", 200, "no base model card")
            self._model = base[0]["id"]
        return self._model

    # -- generation ------------------------------------------------------------------------------------
    def completion_body(self, prompt: Sequence[int], sampling: SamplingParams, lora: str | None,
                        return_logprob: bool, logprob_start_len: int, top_logprobs_num: int) -> dict:
        return completion_request(prompt, sampling, lora or self.model, return_logprob, logprob_start_len,
                                  top_logprobs_num)

    def generate(self, input_ids: Sequence[Sequence[int]], sampling: SamplingParams,
                 lora: str | Sequence[str | None] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 timeout_s: float | None = None) -> list[GenerateResult]:
        """One /v1/completions per prompt, sent concurrently; `lora` is the adapter NAME (or one per prompt)."""
        prompts = [list(map(int, ids)) for ids in input_ids]
        names = list(lora) if isinstance(lora, (list, tuple)) else [lora] * len(prompts)
        if len(names) != len(prompts):
            raise ValueError(f"{len(names)} adapter names for {len(prompts)} prompts")
        bodies = [self.completion_body(p, sampling, n, return_logprob, logprob_start_len, top_logprobs_num)
                  for p, n in zip(prompts, names)]

        def one(i: int) -> GenerateResult:
            js = self._json("POST", "/v1/completions", bodies[i], timeout_s=timeout_s)
            return result_from_completion(js, prompts[i], logprob_start_len if return_logprob else -1)

        if len(bodies) == 1:
            return [one(0)]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(bodies))) as pool:
            return list(pool.map(one, range(len(bodies))))

    # -- LoRA --------------------------------------------------------------------------------------------
    def load_lora_adapter(self, name: str, path: str, pinned: bool = False, timeout_s: float | None = None,
                          load_inplace: bool = False) -> dict:
        """Returns loaded adapters {name: path}. `load_inplace=True` replaces the weights under the same name
        (vLLM keeps the adapter's lora_int_id: see vllm #42125 on its prefix cache)."""
        self._request("POST", "/v1/load_lora_adapter",
                      {"lora_name": name, "lora_path": str(path), "load_inplace": bool(load_inplace)},
                      timeout_s=timeout_s)
        return self.loaded_adapters(timeout_s)

    def unload_lora_adapter(self, name: str, timeout_s: float | None = None) -> dict:
        self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, timeout_s=timeout_s)
        return self.loaded_adapters(timeout_s)

    # -- cache and memory --------------------------------------------------------------------------------
    def flush_cache(self, wait_idle_s: float = 0.0) -> None:
        """POST /reset_prefix_cache; vLLM answers success=false while blocks are in use: retried up to wait_idle_s."""
        import time
        deadline = time.monotonic() + wait_idle_s
        while True:
            js = self._json("POST", "/reset_prefix_cache")
            if not isinstance(js, dict) or js.get("success", True):
                return
            if time.monotonic() >= deadline:
                raise ServerHTTPError("/reset_prefix_cache", 200, "success=false (blocks still in use)")
            time.sleep(0.1)

    def prefix_cache_counters(self, timeout_s: float | None = None) -> dict[str, float]:
        """{'queries': n, 'hits': n} summed over engines, from the Prometheus text of /metrics."""
        out = {"queries": 0.0, "hits": 0.0}
        for line in self._request("GET", "/metrics", timeout_s=timeout_s).text.splitlines():
            m = _METRIC_RE.match(line.strip())
            if m:
                out[m.group(1).rsplit("_", 1)[1]] += float(m.group(2))
        return out

    def release_memory_occupation(self, tags: list[str] | None = None, timeout_s: float | None = None,
                                  level: int = 1) -> None:
        """vLLM sleep: level 1 offloads weights to CPU and drops the KV cache; level 2 drops the weights too."""
        self._request("POST", "/sleep", params={"level": str(level)}, timeout_s=timeout_s)

    def resume_memory_occupation(self, tags: list[str] | None = None, timeout_s: float | None = None) -> None:
        self._request("POST", "/wake_up", params={"tags": list(tags)} if tags else None, timeout_s=timeout_s)

    def is_sleeping(self, timeout_s: float | None = None) -> bool:
        return bool(self._json("GET", "/is_sleeping", timeout_s=timeout_s).get("is_sleeping"))


def completion_request(prompt: Sequence[int], sampling: SamplingParams, model: str, return_logprob: bool = False,
                       logprob_start_len: int = -1, top_logprobs_num: int = 0) -> dict:
    """The /v1/completions body for one prompt: what VLLMClient.generate sends, and the benchmark's raw path."""
    body: dict[str, Any] = {"model": model, "prompt": [int(t) for t in prompt],
                            "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                            "top_p": sampling.top_p, "top_k": sampling.top_k, "ignore_eos": sampling.ignore_eos,
                            "return_token_ids": True, "return_tokens_as_token_ids": True, "stream": False}
    if sampling.stop_token_ids:
        body["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.sampling_seed is not None:
        body["seed"] = sampling.sampling_seed
    if return_logprob:
        body["logprobs"] = max(0, int(top_logprobs_num))
        if logprob_start_len >= 0:
            body["prompt_logprobs"] = max(0, int(top_logprobs_num))
    return body


def _vllm_error_message(r: requests.Response) -> str:
    try:
        js = r.json()
    except ValueError:
        js = None
    if isinstance(js, dict) and "detail" in js and not js.get("error"):  # FastAPI's own 404/405/422 shape
        return str(js["detail"])
    return error_message_of(r)


def _token_id(tok: Any) -> int:
    s = str(tok)
    return int(s.split(":", 1)[1]) if s.startswith("token_id:") else int(s)


def result_from_completion(js: dict, prompt: list[int], logprob_start_len: int = -1) -> GenerateResult:
    """One /v1/completions answer (one prompt, one choice) as a GenerateResult."""
    choices = js.get("choices") or []
    if len(choices) != 1:
        raise ServerHTTPError("/v1/completions", 200, f"expected 1 choice, got {len(choices)}")
    ch, usage = choices[0], js.get("usage") or {}
    lp = ch.get("logprobs") or {}
    out_ids = ch.get("token_ids")
    if out_ids is None:
        out_ids = [_token_id(t) for t in lp.get("tokens") or []]
    details = usage.get("prompt_tokens_details") or {}
    input_lps: list[float | None] = []
    if logprob_start_len >= 0 and ch.get("prompt_logprobs") is not None:
        for i, entry in enumerate(ch["prompt_logprobs"]):
            if entry is None:
                input_lps.append(None)
                continue
            tok = str(prompt[i]) if i < len(prompt) else None
            e = entry.get(tok) if tok is not None else None
            if e is None:  # keys may be token_id:N strings
                e = next((v for k, v in entry.items() if _token_id(k) == prompt[i]), None)
            input_lps.append(None if e is None else float(e["logprob"] if isinstance(e, dict) else e))
        input_lps = input_lps[logprob_start_len:]
    return GenerateResult(output_ids=[int(t) for t in out_ids],
                          prompt_tokens=int(usage.get("prompt_tokens", len(prompt))),
                          completion_tokens=int(usage.get("completion_tokens", len(out_ids))),
                          cached_tokens=int(details.get("cached_tokens") or 0),
                          finish_reason=str(ch.get("finish_reason") or ""),
                          output_logprobs=[float(x) for x in lp.get("token_logprobs") or [] if x is not None],
                          input_logprobs=input_lps, meta={"id": js.get("id"), "model": js.get("model"),
                                                          "stop_reason": ch.get("stop_reason")})


__all__ = ["VLLMClient", "completion_request", "result_from_completion"]
