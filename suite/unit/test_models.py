"""The embedded default models: built locally from a shape, cached, loadable, with the real Qwen3 tokenizer."""
import json
import time

import pytest

from reference_impl.models import ModelError, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


def test_tiny_builds_in_seconds_loads_and_tokenizes(cache):
    t0 = time.monotonic()
    model = resolve_model("tiny", cache_dir=cache)
    assert time.monotonic() - t0 < 60
    assert model.has_weights and (model.path / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM
    import torch
    hf = AutoModelForCausalLM.from_pretrained(str(model.path), local_files_only=True)
    assert hf.dtype == torch.bfloat16 and hf.config.model_type == "qwen3"
    tok = load_tokenizer(model)
    text = "Split-GPU RL: 724 tok/s?"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(tok) >= 151643
    again = resolve_model("tiny", cache_dir=cache)  # cached: same dir, no rebuild
    assert again.path == model.path


def test_same_seed_same_weights_other_seed_differs(cache):
    from safetensors.torch import load_file
    a = load_file(str(resolve_model("tiny", seed=0, cache_dir=cache).path / "model.safetensors"))
    b = load_file(str(resolve_model("tiny", seed=1, cache_dir=cache).path / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not (a[key] == b[key]).all()


def test_config_only_dir_for_dummy_weights(cache):
    model = resolve_model("qwen3-4b", weights=False, cache_dir=cache)
    cfg = json.loads((model.path / "config.json").read_text())
    assert not model.has_weights and cfg["num_hidden_layers"] == 36 and cfg["hidden_size"] == 2560
    assert (model.path / "tokenizer.json").is_file()


def test_user_dir_accepted_and_hub_id_refused(cache, tmp_path):
    built = resolve_model("tiny", cache_dir=cache)
    assert resolve_model(str(built.path)).path == built.path
    with pytest.raises(ModelError, match="local path"):
        resolve_model("Qwen/Qwen3-1.7B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown shape|neither"):
        resolve_model("qwen3-99b")
