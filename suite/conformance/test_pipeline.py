"""Pipelined split (reference_impl.pipeline) against the real server: rollouts of step n+1 overlap training of
step n, the new adapter is hot-loaded between batches.

Checks, on the tiny model for 8 steps (k = 1): every request completes (none fails across the syncs, each
returns its full length); every sample's recorded version is within [step-1, step] and one per batch; and the
recorded version is the one the server used, proven on a subset (the first and last sample of each batch):
the sampler's logprobs of the completion match the HF+PEFT reference of that version's saved adapter within
reference_impl.conformance's bf16 tolerance on every step, and differ clearly from the adjacent version's on at
least half of the steps (once the reward saturates, groups have equal rewards, the policy stops moving and
adjacent versions coincide: CPU run, suite/unit/test_pipeline.py). Under ~90 s.
"""
from __future__ import annotations

import pytest

from reference_impl import conformance as C
from reference_impl.hf_engine import input_logprobs
from reference_impl.loop import LoopConfig
from reference_impl.pipeline import PipelineConfig, run_pipelined
from reference_impl.sync import HotReload, version_name

pytestmark = [pytest.mark.gpu, pytest.mark.gpus(2)]

STEPS, K = 8, 1
LOOP = LoopConfig(steps=STEPS, prompts_per_step=4, group_size=8, max_new_tokens=16, temperature=1.0)


class CountingClient:
    """The server's client; counts requests and failures (a failure is re-raised: the loop must stop)."""

    def __init__(self, client):
        self.client, self.requests, self.failures = client, 0, []

    def generate(self, batch, sampling, **kw):
        try:
            results = self.client.generate(batch, sampling, **kw)
        except Exception as e:
            self.failures.append(repr(e))
            raise
        self.requests += len(batch)
        short = [len(r.output_ids) for r in results if len(r.output_ids) != sampling.max_new_tokens]
        assert not short, f"requests returned fewer than {sampling.max_new_tokens} tokens: {short}"
        return results

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture
def pipeline_trainer(model_dir, unsloth_available, pytestconfig, tmp_path):
    """A fresh policy trainer (the session gpu_trainer's state belongs to other tests); its adapter dirs live
    until the test ends, so every recorded version can be checked against its saved adapter."""
    from reference_impl.job import DEFAULT_PIPELINE_TIS_CAP
    from reference_impl.trainer import LoraSpec, LoraTrainer, TrainerConfig

    choice = pytestconfig.getoption("--trainer")
    backend = choice if choice != "auto" else ("unsloth" if unsloth_available else "peft")
    trainer = LoraTrainer(TrainerConfig(model_path=str(model_dir.path), backend=backend, device="cuda",
                                        lora=LoraSpec(rank=16, alpha=32, init_b_std=0.02), lr=2e-2,
                                        tis_cap=DEFAULT_PIPELINE_TIS_CAP, adapter_root=str(tmp_path / "policy")))
    yield trainer
    trainer.close()


def test_pipelined_versions_are_what_the_server_used(lora_server, hf_reference, pipeline_trainer, results_writer):
    from reference_impl.tasks import WordStartTask

    client = CountingClient(lora_server.client)
    strategy = HotReload(lora_server.client)
    batches = []
    train_step = pipeline_trainer.train_step

    def recording(rolls, group_size, *a):
        batches.append(rolls)
        return train_step(rolls, group_size, *a)

    pipeline_trainer.train_step = recording
    try:
        records = run_pipelined(LOOP, pipeline_trainer, client, strategy,
                                WordStartTask(str(pipeline_trainer.cfg.model_path)),
                                PipelineConfig(max_staleness=K, wait_timeout_s=300))
        C.assert_served(lora_server.client.models(), strategy.adapter_name(STEPS),
                        [strategy.adapter_name(v) for v in range(STEPS)])
    finally:
        if strategy.current:
            lora_server.client.unload_lora_adapter(strategy.current)
    assert not client.failures and client.requests == STEPS * LOOP.prompts_per_step * LOOP.group_size
    lags = []
    for step, rolls in enumerate(batches):
        versions = {r.version for r in rolls}
        assert len(versions) == 1, f"step {step}: one batch mixes versions {versions}"
        v = versions.pop()
        assert step - K <= v <= step and {r.adapter for r in rolls} == {strategy.adapter_name(v)}, (step, v)
        lags.append(step - v)
    assert [r.staleness_max for r in records] == lags and 1 in lags, f"never overlapped: {lags}"

    root = pipeline_trainer.adapter_root
    worst, clear = None, []
    for step, rolls in enumerate(batches):
        subset = [rolls[0], rolls[-1]]
        v = subset[0].version
        sampled = [r.sampler_logprobs for r in subset]
        noise = C.assert_matches(sampled, _reference(hf_reference, root / version_name(v), subset),
                                 f"step {step}: sampler logprobs vs HF+PEFT of {version_name(v)}")
        other = v + 1  # saved by the trainer before this step's update (v <= step)
        try:
            C.assert_differs(sampled, _reference(hf_reference, root / version_name(other), subset),
                             f"step {step}: {version_name(v)} vs the adjacent {version_name(other)}", noise)
            clear.append(True)
        except C.ConformanceError:
            clear.append(False)
        worst = noise if worst is None or noise.max_abs > worst.max_abs else worst
    assert sum(clear) >= STEPS // 2, (f"the recorded version is not distinguishable from the adjacent one on "
                                      f"enough steps (clear per step: {clear}, rewards "
                                      f"{[round(r.reward, 2) for r in records]})")
    from reference_impl.results import ResultRow
    params = {"steps": STEPS, "max_staleness": K}
    results_writer.append([
        ResultRow("conformance", "pipeline_versions", "logprob_max_abs_diff_ratio", worst.max_abs, params=params),
        ResultRow("conformance", "pipeline_versions", "staleness_max_steps", max(lags), params=params)])


def _reference(hf_reference, adapter_dir, rolls):
    """HF+PEFT logprobs of each sample's completion tokens under the adapter saved at adapter_dir."""
    name = f"pipe-ref-{adapter_dir.name}"
    hf_reference.load_lora_adapter(name, str(adapter_dir))
    try:
        rows = input_logprobs(hf_reference, [r.prompt_ids + r.completion_ids for r in rolls], name)
    finally:
        hf_reference.unload_lora_adapter(name)
    return [row[len(r.prompt_ids) - 1:] for row, r in zip(rows, rolls)]
