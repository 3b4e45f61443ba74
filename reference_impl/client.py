"""Typed HTTP client for the SGLang endpoints the suite uses (SGLang 0.5.14; see shared notes).

Every call has a timeout. A non-200 answer raises ServerHTTPError carrying SGLang's own error message; a
server that cannot be reached raises ServerUnreachable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import requests


class ServerHTTPError(RuntimeError):
    def __init__(self, endpoint: str, status: int, error_message: str):
        super().__init__(f"{endpoint} -> HTTP {status}: {error_message}")
        self.endpoint, self.status, self.error_message = endpoint, status, error_message


class ServerUnreachable(RuntimeError):
    pass


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    sampling_seed: int | None = None

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class GenerateResult:
    output_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)  # entry 0 is None (no context)
    weight_version: str | None = None
    e2e_latency_s: float | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, js: dict) -> "GenerateResult":
        meta = js.get("meta_info", {})
        finish = meta.get("finish_reason") or {}
        return cls(output_ids=list(js.get("output_ids") or []),
                   prompt_tokens=int(meta.get("prompt_tokens", 0)),
                   completion_tokens=int(meta.get("completion_tokens", 0)),
                   cached_tokens=int(meta.get("cached_tokens", 0) or 0),
                   finish_reason=finish.get("type", "") if isinstance(finish, dict) else str(finish),
                   output_logprobs=[e[0] for e in meta.get("output_token_logprobs") or []],
                   input_logprobs=[e[0] for e in meta.get("input_token_logprobs") or []],
                   weight_version=meta.get("weight_version"), e2e_latency_s=meta.get("e2e_latency"), meta=meta)


def error_message_of(response: requests.Response) -> str:
    """SGLang answers errors in several shapes: {error_message}, {error:{message}}, {message}, or text."""
    try:
        js = response.json()
    except ValueError:
        return response.text.strip()[:2000] or response.reason
    if isinstance(js, dict):
        if js.get("error_message"):
            return str(js["error_message"])
        err = js.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if js.get("message"):
            return str(js["message"])
        if err:
            return str(err)
    return str(js)[:2000]


class HttpClient:
    """Plumbing shared by the servers' clients: one session, a timeout on every call, typed errors."""

    def __init__(self, base_url: str, timeout_s: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()

    @staticmethod
    def error_message(response: requests.Response) -> str:
        return error_message_of(response)

    def _request(self, method: str, endpoint: str, body: Any = None, timeout_s: float | None = None,
                 params: dict | None = None) -> requests.Response:
        url = self.base_url + endpoint
        try:
            r = self._session.request(method, url, json=body, params=params,
                                      timeout=timeout_s or self.timeout_s)
        except requests.Timeout as e:
            raise ServerUnreachable(f"{endpoint}: no answer within {timeout_s or self.timeout_s:g}s") from e
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            raise ServerUnreachable(f"{endpoint}: cannot connect to {self.base_url} ({e.__class__.__name__})") from e
        if r.status_code != 200:
            raise ServerHTTPError(endpoint, r.status_code, self.error_message(r))
        return r

    def _json(self, method: str, endpoint: str, body: Any = None, **kw) -> Any:
        r = self._request(method, endpoint, body, **kw)
        try:
            return r.json()
        except ValueError:
            return r.text

    def health(self, timeout_s: float = 10.0) -> bool:
        try:
            self._request("GET", "/health", timeout_s=timeout_s)
            return True
        except (ServerUnreachable, ServerHTTPError):
            return False


def generate_request(input_ids: Sequence[Sequence[int]], sampling_json: dict,
                     lora: str | Sequence[str | None] | None = None, return_logprob: bool = False,
                     logprob_start_len: int = -1, top_logprobs_num: int = 0,
                     extra_key: str | None = None) -> dict[str, Any]:
    """The /generate body: SGLangClient.generate sends it, and the benchmark's raw path posts the same one."""
    body: dict[str, Any] = {"input_ids": [list(map(int, ids)) for ids in input_ids], "sampling_params": sampling_json}
    if extra_key is not None:
        body["extra_key"] = extra_key
    if lora is not None:
        body["lora_path"] = lora if isinstance(lora, str) else list(lora)
    if return_logprob:
        body.update(return_logprob=True, logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num)
    return body


class SGLangClient(HttpClient):
    # -- info ------------------------------------------------------------------------------------------
    def server_info(self) -> dict:
        return self._json("GET", "/server_info")

    def memory_usage(self) -> dict:
        """{'weight': GB, 'kvcache': GB, 'token_capacity': n, 'graph': GB} from /server_info."""
        states = self.server_info().get("internal_states") or [{}]
        return dict(states[0].get("memory_usage") or {})

    def models(self) -> list[str]:
        return [card["id"] for card in self._json("GET", "/v1/models").get("data", [])]

    def model_info(self) -> dict:
        return self._json("GET", "/model_info")

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, input_ids: Sequence[Sequence[int]], sampling: SamplingParams,
                 lora: str | Sequence[str | None] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0,
                 timeout_s: float | None = None, extra_key: str | None = None) -> list[GenerateResult]:
        """One batched /generate from token ids; `lora` is the adapter NAME (or one per prompt). `extra_key`
        namespaces the radix cache: a request only reuses prefixes cached under the same key."""
        body = generate_request(input_ids, sampling.as_json(), lora, return_logprob, logprob_start_len,
                                top_logprobs_num, extra_key)
        js = self._json("POST", "/generate", body, timeout_s=timeout_s)
        items = js if isinstance(js, list) else [js]
        if len(items) != len(body["input_ids"]):
            raise ServerHTTPError("/generate", 200, f"asked for {len(body['input_ids'])} results, got {len(items)}")
        return [GenerateResult.from_json(it) for it in items]

    # -- LoRA --------------------------------------------------------------------------------------------
    def load_lora_adapter(self, name: str, path: str, pinned: bool = False, timeout_s: float | None = None) -> dict:
        """Returns loaded_adapters {name: path}. Raises ServerHTTPError (400) with SGLang's reason."""
        js = self._json("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": pinned},
                        timeout_s=timeout_s)
        return _lora_update_result("/load_lora_adapter", js)

    def unload_lora_adapter(self, name: str, timeout_s: float | None = None) -> dict:
        js = self._json("POST", "/unload_lora_adapter", {"lora_name": name}, timeout_s=timeout_s)
        return _lora_update_result("/unload_lora_adapter", js)

    # -- full-weight updates (merged sync) ---------------------------------------------------------------
    def update_weights_from_disk(self, model_path: str, *, load_format: str | None = None,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 abort_all_requests: bool = False, timeout_s: float | None = 600.0) -> dict:
        """Load a full HF checkpoint dir into the running server. Returns SGLang's answer (success, message,
        num_paused_requests). A 400 or success=false (SGLang has rolled back to the previous weights) raises
        ServerHTTPError naming SGLang's message. Flushing while requests RUN crashes SGLang 0.5.14's scheduler:
        pause_generation(mode="retract") first (see shared notes section 3)."""
        body: dict[str, Any] = {"model_path": str(model_path), "flush_cache": flush_cache,
                                "abort_all_requests": abort_all_requests}
        if load_format is not None:
            body["load_format"] = load_format  # "auto" on a --load-format dummy server, else its loader fails
        if weight_version is not None:
            body["weight_version"] = weight_version
        js = self._json("POST", "/update_weights_from_disk", body, timeout_s=timeout_s)
        if not isinstance(js, dict) or not js.get("success", False):
            msg = (js.get("message") or js.get("error_message")) if isinstance(js, dict) else str(js)
            raise ServerHTTPError("/update_weights_from_disk", 200, msg or "success=false")
        return js

    def pause_generation(self, mode: str = "retract", timeout_s: float | None = None) -> Any:
        """mode: "abort" (SGLang's default: running requests fail), "retract" (back to the queue, KV freed,
        recomputed after continue), "in_place" (kept running state: a flush would then crash the scheduler)."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode {mode!r}: use abort, retract or in_place")
        return self._json("POST", "/pause_generation", {"mode": mode}, timeout_s=timeout_s)

    def continue_generation(self, timeout_s: float | None = None) -> Any:
        return self._json("POST", "/continue_generation", {}, timeout_s=timeout_s)

    def weight_version(self) -> str | None:
        return self.model_info().get("weight_version")

    # -- cache and memory --------------------------------------------------------------------------------
    def flush_cache(self, wait_idle_s: float = 0.0) -> None:
        params = {"timeout": wait_idle_s} if wait_idle_s > 0 else None
        self._request("POST", "/flush_cache", params=params, timeout_s=self.timeout_s + wait_idle_s)

    def release_memory_occupation(self, tags: list[str] | None = None, timeout_s: float | None = None) -> None:
        self._request("POST", "/release_memory_occupation", {"tags": tags}, timeout_s=timeout_s)

    def resume_memory_occupation(self, tags: list[str] | None = None, timeout_s: float | None = None) -> None:
        self._request("POST", "/resume_memory_occupation", {"tags": tags}, timeout_s=timeout_s)


def _lora_update_result(endpoint: str, js: Any) -> dict:
    if not isinstance(js, dict) or not js.get("success", False):
        msg = js.get("error_message") if isinstance(js, dict) else str(js)
        raise ServerHTTPError(endpoint, 200, msg or "success=false")
    return dict(js.get("loaded_adapters") or {})
