"""Fixtures shared by the CPU protocol tests: a FAKE SGLang in a thread (a test double, never GPU evidence)."""
import pytest

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import FakeSGLangState
from reference_impl.client import SGLangClient
from suite.unit.adapters_for_tests import ATTENTION


@pytest.fixture
def state() -> FakeSGLangState:
    """A LoRA-enabled fake with a small pool (rank <= 16, attention modules)."""
    return FakeSGLangState(model_path="fake-model", enable_lora=True, max_lora_rank=16, target_modules=ATTENTION)


@pytest.fixture
def fake(state):
    with FakeSGLangServer(state) as srv:
        yield srv


@pytest.fixture
def client(fake) -> SGLangClient:
    return SGLangClient(fake.url, timeout_s=10)


@pytest.fixture
def fake_model_dir(tmp_path) -> str:
    """A model dir the fake server accepts (it reads no weights)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)
