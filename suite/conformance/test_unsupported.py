"""Unsupported adapters (conformance 3): a clear error, the server stays healthy, the previous version is served.

rsLoRA is the silent one: SGLang 0.5.14 accepts it and scales by alpha/r, so the reference implementation must
refuse it before the server sees it (check_adapter_dir); the raw server's acceptance is recorded as the reason.

vLLM 0.26.0 differs (run m, 2x H100): it refuses DoRA and a rank above --max-lora-rank with HTTP 500 ("Call to
add_lora method failed: vLLM does not yet support DoRA." / "LoRA rank 128 is greater than max_lora_rank 64."), and
it takes an adapter with lm_head among its modules (it has no target-module pool), so for that one, too, the
pre-check is the only guard.
"""
import pytest

from reference_impl import conformance as C
from reference_impl.client import ServerHTTPError
from reference_impl.server import ALL_LINEAR
from reference_impl.sync import HotReload, SyncError
from reference_impl.trainer import AdapterFormatError, check_adapter_dir

from .probes import served_logprobs

pytestmark = pytest.mark.gpu
POOL_RANK = 64


@pytest.fixture(scope="module")
def serving_v1(lora_server, adapter_factory):
    strategy = HotReload(lora_server.client)
    strategy.publish(1, str(adapter_factory(rank=16)))
    yield strategy
    lora_server.client.unload_lora_adapter(strategy.current)


BAD = {
    "rslora": dict(rank=16, use_rslora=True),
    "dora": dict(rank=16, use_dora=True),
    "rank_above_pool": dict(rank=128),
    "module_outside_pool": dict(rank=16, modules=ALL_LINEAR + ("lm_head",)),
}
SERVER_TAKES = {"sglang": {"rslora"}, "vllm": {"rslora", "module_outside_pool"}}  # without the pre-check
REFUSAL_STATUS = {"sglang": 400, "vllm": 500}  # vLLM wraps add_lora's error in a 500, with the reason


@pytest.mark.parametrize("kind", list(BAD))
def test_refused_clearly_and_previous_version_still_served(lora_server, adapter_factory, serving_v1, kind, backend):
    client = lora_server.client
    before = served_logprobs(client, serving_v1.current)
    bad = adapter_factory(**BAD[kind])
    with pytest.raises(AdapterFormatError) as refused:
        check_adapter_dir(bad, max_rank=POOL_RANK, pool_modules=ALL_LINEAR)
    assert str(bad) in str(refused.value)
    if kind in SERVER_TAKES[backend]:  # the server itself would take it: that is why the pre-check exists
        client.load_lora_adapter(f"raw-{kind}", str(bad))
        client.unload_lora_adapter(f"raw-{kind}")
    else:
        with pytest.raises(SyncError):
            HotReload(client).publish(99, str(bad))
        with pytest.raises(ServerHTTPError) as server_said:
            client.load_lora_adapter(f"raw-{kind}", str(bad))
        assert server_said.value.status == REFUSAL_STATUS[backend] and server_said.value.error_message
    assert client.health()
    C.assert_served(client.models(), serving_v1.current)
    C.assert_matches(served_logprobs(client, serving_v1.current), before, f"{serving_v1.current} after {kind}")
