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


@pytest.fixture(scope="module")
def micro_base(tmp_path_factory):
    """A few-KB Qwen3-shaped model with real safetensors (suite/unit/micro_model.py): the merged-sync tests'
    base checkpoint."""
    from suite.unit.micro_model import micro_model
    return micro_model(tmp_path_factory.mktemp("base") / "m")


@pytest.fixture(scope="module")
def micro_adapters(micro_base, tmp_path_factory) -> list:
    """Three distinct rank-8 PEFT adapters for micro_base (paths)."""
    from reference_impl.adapters import make_peft_adapter
    root = tmp_path_factory.mktemp("adapters")
    return [make_peft_adapter(str(micro_base), root / f"a{i}", rank=8, seed=i, b_std=0.05) for i in range(3)]


@pytest.fixture(scope="module")
def tiny():
    """The embedded tiny model (built on first use, ~10 s, then cached by shape)."""
    from reference_impl.models import resolve_model
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def two_torch_threads():
    """Two CPU threads for the module (request it with usefixtures): the real-engine loop tests are
    deterministic at a fixed thread count and were measured with two (CI machines may have only 2 cores)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
