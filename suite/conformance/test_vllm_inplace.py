"""vLLM's same-name reload (`load_inplace`) must start cold and answer with the new weights: vllm #42125 kept the
old adapter's prefix KV. Runs with --backend vllm|both; SGLang has no in-place reload (every load mints a new
lora_id: its same-name case is in test_prefix_cache.py)."""
import pytest

from reference_impl import conformance as C
from reference_impl.client import SamplingParams

from .probes import vllm_same_name_stale_kv_is_known
from .test_prefix_cache import LONG

pytestmark = pytest.mark.gpu


def test_inplace_reload_is_cold_and_fresh(lora_server, adapter_factory, backend):
    if backend != "vllm":
        pytest.skip("load_inplace is vLLM's; SGLang's same-name reload is covered by test_prefix_cache.py")
    old, new = adapter_factory(rank=16, seed=91), adapter_factory(rank=16, seed=92)
    try:
        with vllm_same_name_stale_kv_is_known(backend):
            C.check_inplace_reload(lora_server.client, "inplace", str(old), str(new), LONG,
                                   SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    finally:
        lora_server.client.unload_lora_adapter("inplace")
