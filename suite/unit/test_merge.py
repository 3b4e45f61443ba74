"""reference_impl.merge against PEFT's own merge_and_unload(): same weights, same names and dtypes as the base
checkpoint, refusals for what it cannot merge exactly. Micro Qwen3 models (built here, seconds on a CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from reference_impl.adapters import make_peft_adapter, synthetic_lora_adapter  # noqa: E402
from reference_impl.merge import MergeError, WeightMerger, adapter_scale, base_key  # noqa: E402
from reference_impl.server import ALL_LINEAR, ATTENTION_ONLY  # noqa: E402
from suite.unit.micro_model import micro_model  # noqa: E402


@pytest.fixture(scope="module")
def tied_bf16(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("tied") / "m", tied=True)


@pytest.fixture(scope="module")
def untied_fp32(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("untied") / "m", tied=False, dtype="float32")


def peft_merged(base: Path, adapter: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def file_tensors(model_dir: Path) -> dict:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def check_equals_peft(base: Path, adapter: Path, merger: WeightMerger, name: str, exact: bool):
    result = merger.merge(adapter, name)
    ours, theirs, base_t = file_tensors(result.path), peft_merged(base, adapter), file_tensors(base)
    assert sorted(ours) == sorted(base_t), "merged checkpoint must have exactly the base's tensor names"
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in base_t.items()}
    changed = 0
    for k, v in ours.items():
        ref = theirs[k].to(v.dtype)
        if exact:
            torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6, msg=k)
        else:  # PEFT adds in bf16, we add in fp32 and round once: at most one bf16 rounding step apart
            torch.testing.assert_close(v.float(), ref.float(), rtol=8e-3, atol=1e-5, msg=k)
        changed += not torch.equal(v, base_t[k])
    assert changed == result.tensors_merged > 0
    return result


@pytest.mark.parametrize("modules", [ATTENTION_ONLY, ALL_LINEAR], ids=["attn", "all-linear"])
@pytest.mark.parametrize("rank", [8, 64])
def test_merge_equals_peft_merge_and_unload_bf16_tied(tied_bf16, tmp_path, modules, rank):
    adapter = make_peft_adapter(str(tied_bf16), tmp_path / "a", rank=rank, target_modules=modules, seed=rank,
                                b_std=0.05)
    merger = WeightMerger(tied_bf16, root=tmp_path / "merged", device="cpu")
    try:
        result = check_equals_peft(tied_bf16, adapter, merger, "policy-v1", exact=False)
        assert result.tensors_merged == 2 * len(modules)
        assert (result.path / "tokenizer_config.json").is_file() and (result.path / "config.json").is_file()
        assert json.loads((result.path / "config.json").read_text())["tie_word_embeddings"] is True
        with safe_open(str(result.path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # still tied: the loader ties it to embed_tokens again
    finally:
        merger.close()


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_merge_equals_peft_fp32_untied_and_rslora_scale(untied_fp32, tmp_path, rslora):
    adapter = make_peft_adapter(str(untied_fp32), tmp_path / "a", rank=16, alpha=8, target_modules=ALL_LINEAR,
                                seed=3, b_std=0.05, use_rslora=rslora)
    assert adapter_scale(json.loads((adapter / "adapter_config.json").read_text())).scale == \
        pytest.approx(8 / 4 if rslora else 8 / 16)
    merger = WeightMerger(untied_fp32, root=tmp_path / "merged", device="cpu")
    try:
        check_equals_peft(untied_fp32, adapter, merger, "policy-v1", exact=True)
    finally:
        merger.close()


def test_merged_dir_loads_and_matches_the_peft_model_logits(untied_fp32, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_peft_adapter(str(untied_fp32), tmp_path / "a", rank=8, target_modules=ALL_LINEAR, seed=5,
                                b_std=0.05)
    merger = WeightMerger(untied_fp32, root=tmp_path / "merged", device="cpu")
    try:
        path = merger.merge(adapter, "policy-v1").path
        x = torch.tensor([[5, 17, 99, 3, 250, 31]])
        merged = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(untied_fp32)), str(adapter)).eval()
        base = AutoModelForCausalLM.from_pretrained(str(untied_fp32)).eval()
        with torch.no_grad():
            a, b, c = merged(input_ids=x).logits, peft(input_ids=x).logits, base(input_ids=x).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert (a - c).abs().max() > 1e-3, "the adapter had no effect: the comparison would prove nothing"
    finally:
        merger.close()


def test_base_cache_is_never_modified_and_only_the_newest_dirs_are_kept(untied_fp32, tmp_path):
    adapters = [make_peft_adapter(str(untied_fp32), tmp_path / f"a{i}", rank=8, target_modules=ATTENTION_ONLY,
                                  seed=i, b_std=0.05) for i in range(3)]
    merger = WeightMerger(untied_fp32, root=tmp_path / "merged", keep=2, device="cpu")
    try:
        first = merger.merge(adapters[0], "policy-v0")
        assert first.load_base_ms > 0 and first.merge_ms > 0 and first.write_ms > 0 and first.bytes_written > 0
        v0 = file_tensors(first.path)
        results = [merger.merge(a, f"policy-v{i}") for i, a in enumerate(adapters[1:], start=1)]
        assert results[-1].load_base_ms < first.load_base_ms or results[-1].load_base_ms < 1.0  # cached
        for name, t in file_tensors(untied_fp32).items():  # the cache still holds the base, bit for bit
            assert torch.equal(merger.base_state()["model.safetensors"][name], t), name
        again = merger.merge(adapters[0], "policy-v9")  # v0's adapter again: same bytes as the first time
        assert all(torch.equal(file_tensors(again.path)[k], v) for k, v in v0.items())
        assert sorted(p.name for p in merger.root.iterdir()) == ["policy-v2", "policy-v9"], "old/temp dirs left"
    finally:
        merger.close()
    assert not merger.root.exists()


@pytest.mark.parametrize("override,message", [
    ({"use_dora": True}, "DoRA"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_refuses_adapters_it_cannot_merge_exactly(untied_fp32, tmp_path, override, message):
    adapter = make_peft_adapter(str(untied_fp32), tmp_path / "a", rank=8, seed=1, **override)
    merger = WeightMerger(untied_fp32, root=tmp_path / "merged", device="cpu")
    try:
        with pytest.raises(MergeError, match=message):
            merger.merge(adapter, "policy-v1")
        assert list(merger.root.iterdir()) == []
    finally:
        merger.close()


def test_refuses_modules_missing_from_the_base_and_a_tied_lm_head(tied_bf16, tmp_path):
    from suite.unit.adapters_for_tests import make_adapter

    wrong = make_adapter(tmp_path / "wrong", r=8, hidden=64, layers=3)  # layer 2 does not exist in the base
    merger = WeightMerger(tied_bf16, root=tmp_path / "merged", device="cpu")
    try:
        with pytest.raises(MergeError, match="missing from the base checkpoint.*layers.2"):
            merger.merge(wrong, "policy-v1")
        head = make_peft_adapter(str(tied_bf16), tmp_path / "head", rank=8, target_modules=("q_proj", "lm_head"))
        with pytest.raises(MergeError, match="lm_head is tied"):
            merger.merge(head, "policy-v2")
    finally:
        merger.close()


def test_synthetic_adapter_is_a_valid_peft_adapter_and_merges(tied_bf16, tmp_path):
    adapter = synthetic_lora_adapter(str(tied_bf16), tmp_path / "syn", rank=8, target_modules=ALL_LINEAR, seed=2)
    merger = WeightMerger(tied_bf16, root=tmp_path / "merged", device="cpu")
    try:
        check_equals_peft(tied_bf16, adapter, merger, "policy-v1", exact=False)
    finally:
        merger.close()


def test_base_key_maps_peft_names_to_checkpoint_names():
    assert base_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == \
        ("model.layers.0.self_attn.q_proj.weight", "A")
    assert base_key("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight") == \
        ("model.layers.3.mlp.down_proj.weight", "B")
    assert base_key("base_model.model.lm_head.weight") is None
