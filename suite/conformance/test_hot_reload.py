"""Hot-reload correctness (conformance 1) and the served policy changing every step (conformance 2).

Tolerance: reference_impl.conformance (bf16 on both sides: 0.15 per position and 0.05 on the mean for a policy
near uniform, growing with its sharpness |ref| - ln V; the module docstring says why). Catches: OpenPipe/ART #661 (adapter never changes), verl #5220 (base model served).
"""
import pytest

from reference_impl import conformance as C
from reference_impl.loop import LoopConfig, rollout
from reference_impl.server import ALL_LINEAR, ATTENTION_ONLY
from reference_impl.sync import HotReload, version_name

from .probes import reference_logprobs, served_logprobs

pytestmark = pytest.mark.gpu

SLOW_UNSLOTH = pytest.mark.slow


def _cases():
    for source in ("peft", "unsloth"):
        for rank in (8, 16, 64):
            for name, modules in (("attn", ATTENTION_ONLY), ("all", ALL_LINEAR)):
                marks = [SLOW_UNSLOTH] if source == "unsloth" and (rank, name) != (16, "all") else []
                yield pytest.param(source, rank, modules, id=f"{source}-r{rank}-{name}", marks=marks)


@pytest.mark.parametrize("source,rank,modules", list(_cases()))
def test_served_logprobs_equal_hf_peft(lora_server, hf_reference, adapter_factory, results_writer, source, rank,
                                       modules, unsloth_available):
    if source == "unsloth" and not unsloth_available:
        pytest.skip("unsloth is not importable in this environment")
    client = lora_server.client
    adapter = adapter_factory(rank=rank, modules=modules, source=source)
    name = f"hr-{adapter.name}"
    client.load_lora_adapter(name, str(adapter))
    try:
        served = served_logprobs(client, name)
        noise = C.assert_matches(served, reference_logprobs(hf_reference, adapter), f"{name} vs HF+PEFT")
        effect = C.assert_differs(served, served_logprobs(client, None), f"{name} vs base", noise)
    finally:
        client.unload_lora_adapter(name)
    from reference_impl.results import ResultRow
    params = {"rank": rank, "modules": len(modules), "source": source}
    results_writer.append([ResultRow("conformance", "hot_reload_match", "logprob_max_abs_diff_ratio", noise.max_abs,
                                     params=params),
                           ResultRow("conformance", "hot_reload_match", "logprob_mean_abs_diff_ratio",
                                     noise.mean_abs, params=params),
                           ResultRow("conformance", "hot_reload_match", "adapter_effect_mean_abs_ratio",
                                     effect.mean_abs, params=params)])


def test_served_policy_changes_every_step(lora_server, gpu_trainer, hf_reference):
    """Four real training steps, each synced by hot reload: each rollout names the current version, /v1/models
    shows it (and not the retired one), its logprobs match the trainer's adapter and differ from the last."""
    from reference_impl.tasks import WordStartTask

    client = lora_server.client
    strategy = HotReload(client)
    task = WordStartTask(str(gpu_trainer.cfg.model_path))
    cfg = LoopConfig(prompts_per_step=2, group_size=4, max_new_tokens=8)
    strategy.publish(100, str(gpu_trainer.save_adapter(version_name(100))))
    previous, retired = None, []
    try:
        for step in range(4):
            rolls = rollout(client, strategy, task, cfg, step)
            assert {r.adapter for r in rolls} == {strategy.current}
            gpu_trainer.train_step(rolls, cfg.group_size)
            path = gpu_trainer.save_adapter(version_name(101 + step))
            retired.append(strategy.current)
            strategy.publish(101 + step, str(path))
            C.assert_served(client.models(), strategy.current, retired)
            served = served_logprobs(client, strategy.current)
            # the same file loaded fresh under a new name: any difference is the server serving stale weights
            client.load_lora_adapter(f"fresh-{step}", str(path))
            fresh = served_logprobs(client, f"fresh-{step}")
            client.unload_lora_adapter(f"fresh-{step}")
            C.assert_matches(served, fresh, f"step {step}: {strategy.current} vs the same file loaded fresh")
            reference = reference_logprobs(hf_reference, path)
            try:
                noise = C.assert_matches(served, reference, f"step {step}")
            except C.ConformanceError as e:
                raise C.ConformanceError(f"{e} [{_scale_note(reference, path)}]") from None
            if previous is not None:
                C.assert_differs(served, previous, f"step {step} vs step {step - 1}", noise)
            previous = served
    finally:
        client.unload_lora_adapter(strategy.current)


def _scale_note(reference, adapter_dir) -> str:
    """What a reader needs to tell bf16 rounding of large logits from a serving bug."""
    from safetensors.torch import load_file
    flat = [abs(x) for row in reference for x in row]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    big = max(float(t.abs().max()) for t in tensors.values())
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    return (f"reference |logprob| mean {sum(flat) / len(flat):.2f} max {max(flat):.2f}; adapter max |w| {big:.3f} "
            f"dtypes {dtypes}")
