"""The GRPO loop end to end on a CPU with REAL engines: the in-process HF+PEFT engine (reference_impl.hf_engine)
serves the adapters the PEFT trainer saves, so weights really flow trainer -> saved adapter -> engine.

The proof: with hot reload the toy task's reward rises clearly; the control (NoSync: rollouts stay on
policy-v0, same seed, same trainer) stays flat. Measured on a 2-core CPU with 4 prompts x 8 samples x 8 tokens
and lr 2e-2 over 20 steps: hot reload 0.34 (mean of steps 0-2) -> 1.00 (steps 17-19; the reward is near 1 from
step 5-7 on, for seeds 0 and 1); control 0.32 -> 0.37 (its policy never changes: only sampling noise, ~0.02 on
a 3-step mean). The bounds (+0.25 and < +0.10) leave room for other CPUs' float differences. Each run takes
~110 s on 2 idle cores; both run once per session (module fixtures).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from reference_impl.hf_engine import HFEngine  # noqa: E402
from reference_impl.loop import (EXTRA_METRICS, STEP_METRICS, LoopConfig, StepRecord, run_loop,  # noqa: E402
                                 step_rows)
from reference_impl.results import ResultsWriter, read_results  # noqa: E402
from reference_impl.server import ALL_LINEAR, ATTENTION_ONLY  # noqa: E402
from reference_impl.sync import HotReload, NoSync, version_name  # noqa: E402
from reference_impl.tasks import WordStartTask  # noqa: E402
from reference_impl.trainer import (AdapterFormatError, LoraSpec, LoraTrainer, Rollout, TrainerConfig,  # noqa: E402
                                    check_adapter_dir)
from suite.unit.adapters_for_tests import make_adapter  # noqa: E402

STEPS = 20
LOOP = LoopConfig(steps=STEPS, prompts_per_step=4, group_size=8, max_new_tokens=8, temperature=1.0)
LR = 2e-2
# deterministic and as measured; the machine may have only 2 cores (suite/unit/conftest.py)
pytestmark = pytest.mark.usefixtures("two_torch_threads")


class RecordingEngine:
    """Wraps the real engine: every generate must name the strategy's current adapter."""

    def __init__(self, engine, strategy):
        self.engine, self.strategy, self.calls = engine, strategy, []

    def generate(self, input_ids, sampling, lora=None, **kw):
        self.calls.append(lora)
        assert lora is not None, "a rollout without an adapter would be served by the base model"
        assert lora == self.strategy.current, f"rollout names {lora}, the current adapter is {self.strategy.current}"
        assert lora in self.engine.adapters, f"{lora} is not loaded in the engine: {list(self.engine.adapters)}"
        return self.engine.generate(input_ids, sampling, lora=lora, **kw)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@dataclass
class LoopRun:
    records: list[StepRecord]
    generate_calls: list
    train_stats: list[dict]
    loaded_at_end: list[str]
    saved: list[str] = field(default_factory=list)

    def rewards(self) -> list[float]:
        return [r.reward for r in self.records]

    def first3(self) -> float:
        return sum(self.rewards()[:3]) / 3

    def last3(self) -> float:
        return sum(self.rewards()[-3:]) / 3


def run_grpo(model_dir, strategy_cls) -> LoopRun:
    engine = HFEngine(str(model_dir.path), seed=0)
    trainer = LoraTrainer(TrainerConfig(model_path=str(model_dir.path), dtype="float32", lr=LR, seed=0))
    strategy = strategy_cls(engine, run_tag="t1")
    recording = RecordingEngine(engine, strategy)
    stats, saved = [], []
    train_step, save_adapter = trainer.train_step, trainer.save_adapter

    def recording_train_step(rolls, group_size):
        out = train_step(rolls, group_size)
        stats.append(out)
        return out

    def recording_save(name):
        saved.append(name)
        return save_adapter(name)

    trainer.train_step, trainer.save_adapter = recording_train_step, recording_save
    try:
        records = run_loop(LOOP, trainer, recording, strategy, WordStartTask(str(model_dir.path), seed=0))
    finally:
        trainer.close()
    return LoopRun(records, recording.calls, stats, list(engine.adapters), saved)


@pytest.fixture(scope="module")
def hot_run(tiny) -> LoopRun:
    return run_grpo(tiny, HotReload)


@pytest.fixture(scope="module")
def control_run(tiny) -> LoopRun:
    return run_grpo(tiny, NoSync)


def _fmt(run: LoopRun) -> str:
    return " ".join(f"{r:.2f}" for r in run.rewards())


# ---------------------------------------------------------------- (a) weights flow: reward rises only with sync

def test_hot_reload_reward_rises(hot_run):
    assert len(hot_run.records) == STEPS
    assert hot_run.last3() >= hot_run.first3() + 0.25, f"reward did not rise with hot reload: {_fmt(hot_run)}"
    assert all(0.0 <= r <= 1.0 for r in hot_run.rewards())


def test_control_reward_stays_flat(control_run, hot_run):
    assert control_run.last3() < control_run.first3() + 0.1, f"control reward moved: {_fmt(control_run)}"
    assert control_run.records[0].reward == pytest.approx(hot_run.records[0].reward), \
        "same seed, same v0: step 0 must be the same rollout"
    assert hot_run.last3() >= control_run.last3() + 0.25


def test_sync_keeps_the_ratio_at_one_the_control_lags(hot_run, control_run):
    """With sync, rollouts come from the trainer's current weights: the GRPO ratio exp(new - old) is 1 up to
    float noise. In the control the rollout policy lags the trainer, so the ratio is not 1 after step 0: it is
    computed from the sampler's logprobs, not 1 by construction."""
    for step, s in enumerate(hot_run.train_stats):
        assert abs(s["ratio_mean"] - 1) < 1e-3 and s["ratio_max"] < 1.01, (step, s)
    first, later = control_run.train_stats[0], control_run.train_stats[1:]
    assert abs(first["ratio_mean"] - 1) < 1e-3 and first["ratio_max"] < 1.01, first
    for step, s in enumerate(later, start=1):
        assert abs(s["ratio_mean"] - 1) > 1e-3 or abs(s["ratio_max"] - 1) > 0.05, (step, s)
    assert max(abs(s["ratio_mean"] - 1) for s in later) > 0.1
    assert sum(s["clip_ratio"] for s in later) > 0, "the lagging policy never hit the clip range"


# ---------------------------------------------------------------- (b) every rollout names the current adapter

def test_every_rollout_names_the_current_adapter(hot_run, control_run):
    assert hot_run.generate_calls == [version_name(s, "t1") for s in range(STEPS)]
    assert [r.adapter for r in hot_run.records] == hot_run.generate_calls
    assert hot_run.loaded_at_end == [version_name(STEPS, "t1")], "old versions were not unloaded"
    assert hot_run.saved == [version_name(s) for s in range(STEPS + 1)]  # the trainer's dirs carry no run tag
    assert control_run.generate_calls == ["policy-t1-v0"] * STEPS
    assert control_run.loaded_at_end == ["policy-t1-v0"]


# ---------------------------------------------------------------- (c) step records -> results rows

def test_step_rows_are_valid_results_rows(hot_run, control_run, tmp_path):
    base = {"suite": "run", "test": "grpo_hot-reload", "backend": "hf", "mode": "cpu", "strategy": "hot-reload",
            "model": "tiny", "params": {"group_size": 8, "prompts": 4}}
    writer = ResultsWriter(tmp_path / "run.csv", fingerprint={})
    for rec in hot_run.records:
        rows = step_rows(rec, base)
        assert {r.metric for r in rows} == set(STEP_METRICS.values()) | {"rollout_output_tok_s"}
        assert all(r.params == {"group_size": 8, "prompts": 4, "step": rec.step} for r in rows)
        writer.append(rows)
    assert base["params"] == {"group_size": 8, "prompts": 4}, "step_rows must not modify its base"
    df = read_results(tmp_path / "run.csv")
    assert len(df) == STEPS * (len(STEP_METRICS) + 1)
    assert df["value"].map(math.isfinite).all()
    by = {m: df[df["metric"] == m]["value"].tolist() for m in STEP_METRICS.values()}
    assert by["reward"] == pytest.approx(hot_run.rewards())
    assert all(0 <= v <= 1 for v in by["reward"])
    assert all(v > 0 for m in ("rollout_s", "train_s", "sync_ms", "step_s") for v in by[m])
    assert by["output_tokens"] == [4 * 8 * 8] * STEPS
    assert by["cached_tokens"] == [0] * STEPS  # the HF engine has no prefix cache
    tok_s = df[df["metric"] == "rollout_output_tok_s"]["value"].tolist()
    assert tok_s == pytest.approx([t / r for t, r in zip(by["output_tokens"], by["rollout_s"])])
    assert all(0 <= v <= 4 for v in by["equal_reward_groups_count"])
    steps = [json.loads(p)["step"] for p in df[df["metric"] == "reward"]["params"]]
    assert steps == list(range(STEPS))
    assert all(r.extra.get("skipped") == 1 for r in control_run.records)


def test_ddp_steps_write_their_rank_spread(hot_run, tmp_path):
    """A data-parallel step records the ranks' weight spread; the row must pass the results schema (a metric
    without a known unit is refused, which once stopped a 3-rank GPU run after its first step)."""
    from dataclasses import replace
    rec = replace(hot_run.records[0], extra={"rank_spread": 0.0})
    base = {"suite": "run", "test": "grpo_hot-reload", "backend": "sglang", "mode": "split",
            "strategy": "hot-reload", "model": "tiny", "params": {"layout": "1+3", "tp": 1}}
    ResultsWriter(tmp_path / "run.csv", fingerprint={}).append(step_rows(rec, base))
    df = read_results(tmp_path / "run.csv")
    assert df[df["metric"] == "ddp_rank_param_spread"]["value"].tolist() == [0.0]


def test_step_rows_carry_strategy_timings():
    rec = StepRecord(step=3, adapter="policy-v3", reward=0.5, rollout_s=1.0, train_s=2.0, sync_ms=3000.0, step_s=6.0,
                     output_tokens=64, prompt_tokens=128, cached_tokens=0, loss=0.1, clip_ratio=0.0, ratio_mean=1.0,
                     equal_reward_groups=1, extra={"restart_s": 2.5, "start_s": 2.0, "stop_s": 0.4,
                                                   "released_mib": None, "loaded_adapters": 1})
    rows = step_rows(rec, {"suite": "run", "test": "t", "backend": "sglang", "strategy": "restart"})
    extra = {r.metric: r.value for r in rows if r.metric in EXTRA_METRICS.values()}
    assert extra == {"restart_s": 2.5, "server_start_s": 2.0, "server_stop_s": 0.4}
    assert all(r.params == {"step": 3} for r in rows)


class FakeClock:
    """Stands in for loop.time: perf_counter() reads `now`, which only the stubs below advance."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_one_gpu_pause_is_its_own_phase_and_the_settle_wait_is_not_in_the_step(monkeypatch):
    """A one-GPU strategy stops or releases the server before training. That pause is not training (train_s) but is
    part of the step; the NVML settle wait a release/resume strategy spends measuring itself is neither."""
    from types import SimpleNamespace

    from reference_impl import loop as loop_mod
    from reference_impl.client import GenerateResult
    from reference_impl.sync import SyncRecord

    clock = FakeClock()
    monkeypatch.setattr(loop_mod, "time", clock)
    durations = {"rollout": 1.0, "release": 0.5, "settle": 5.0, "train": 0.25, "sync": 0.125}

    class Strategy:
        name, current, current_version = "stub-release", None, None

        def publish(self, version, path):
            clock.now += durations["sync"] if version else 0.0
            self.current, self.current_version = version_name(version), version
            return SyncRecord(version, self.current, durations["sync"] * 1e3, {})

        def pause_for_training(self):
            clock.now += durations["release"] + durations["settle"]
            return {"release_s": durations["release"], "measure_s": durations["settle"]}

    def generate(batch, sampling, lora=None, **kw):
        clock.now += durations["rollout"]
        return [GenerateResult([7, 8], len(p), 2, 0, "length", [-1.0, -1.0]) for p in batch]

    def train_step(rolls, group_size):
        clock.now += durations["train"]
        return {"loss": 0.0, "equal_reward_groups": 0}

    trainer = SimpleNamespace(train_step=train_step, save_adapter=lambda name: f"/adapters/{name}")
    task = SimpleNamespace(prompts=lambda step, n: [[1, 2, 3]] * n, reward=lambda p, c: 0.5)
    rec = run_loop(LoopConfig(steps=1, prompts_per_step=1, group_size=2), trainer, SimpleNamespace(generate=generate),
                   Strategy(), task)[0]
    assert rec.train_s == durations["train"] and rec.rollout_s == durations["rollout"]
    assert rec.extra["pause_s"] == durations["release"]
    assert rec.step_s == sum(durations.values()) - durations["settle"]
    metrics = {r.metric for r in step_rows(rec, {"suite": "run", "test": "t", "backend": "sglang"})}
    assert {"pause_s", "measure_s", "release_s"} <= metrics


# ---------------------------------------------------------------- (d) saved adapters

@pytest.fixture(scope="module")
def trainer(tiny, tmp_path_factory):
    t = LoraTrainer(TrainerConfig(model_path=str(tiny.path), dtype="float32", lr=LR, seed=0,
                                  adapter_root=str(tmp_path_factory.mktemp("adapters"))))
    yield t
    t.close()


def test_saved_adapter_is_plain_lora_with_every_target_module(trainer, tiny):
    from safetensors import safe_open

    path = trainer.save_adapter("policy-v0")
    assert path == trainer.adapter_root / "policy-v0"
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert (cfg["r"], cfg["lora_alpha"]) == (16, 32)
    assert set(cfg["target_modules"]) == set(ALL_LINEAR)
    assert cfg["use_rslora"] is False and not cfg.get("use_dora")
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layers = tiny.config["num_hidden_layers"]
    for layer in range(layers):
        for module in ALL_LINEAR:
            for part in ("lora_A", "lora_B"):
                hits = [k for k in keys if re.search(rf"\.layers\.{layer}\.(self_attn|mlp)\.{module}\.{part}\.", k)]
                assert len(hits) == 1, (layer, module, part, hits)
    assert len(keys) == layers * len(ALL_LINEAR) * 2, sorted(keys)[:5]
    assert check_adapter_dir(path, max_rank=16, pool_modules=ALL_LINEAR)["r"] == 16


def test_save_is_atomic(trainer, monkeypatch):
    import reference_impl.trainer as trainer_mod

    first = trainer.save_adapter("policy-v7")
    again = trainer.save_adapter("policy-v7")  # same name: replaced, not nested
    assert again == first and (first / "adapter_config.json").is_file()
    assert not list(first.glob("policy-v7*")), "second save nested into the first"
    leftovers = [p.name for p in trainer.adapter_root.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temp dirs left behind: {leftovers}"

    def refuse(path, *a, **kw):
        raise AdapterFormatError(f"{path}: refused for the test")

    monkeypatch.setattr(trainer_mod, "check_adapter_dir", refuse)
    with pytest.raises(AdapterFormatError, match="refused for the test"):
        trainer.save_adapter("policy-v8")
    assert not (trainer.adapter_root / "policy-v8").exists(), "a refused adapter reached its final name"
    with pytest.raises(AdapterFormatError):
        trainer.save_adapter("policy-v7")
    assert (first / "adapter_config.json").is_file(), "a failed save destroyed the previous version"
    leftovers = [p.name for p in trainer.adapter_root.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temp dirs left behind after a failed save: {leftovers}"


@pytest.mark.parametrize("overrides,kw,message", [
    ({"use_rslora": True}, {}, "use_rslora=true: SGLang scales by alpha/r"),
    ({"use_dora": True}, {}, "use_dora=true: SGLang rejects DoRA"),
    ({"r": 32}, {"max_rank": 16}, "rank 32 is above the server's LoRA pool max rank 16"),
    ({"target_modules": ("q_proj", "gate_proj")}, {"pool_modules": ATTENTION_ONLY},
     r"target modules \['gate_proj'\] are outside the server's LoRA pool"),
    ({"rank_pattern": {"q_proj": 4}}, {}, "rank_pattern/alpha_pattern are ignored by SGLang"),
    ({"alpha_pattern": {"q_proj": 4}}, {}, "rank_pattern/alpha_pattern are ignored by SGLang"),
    ({"peft_type": "IA3"}, {}, "peft_type 'IA3' is not LORA"),
], ids=["rslora", "dora", "rank-above-pool", "module-outside-pool", "rank-pattern", "alpha-pattern", "ia3"])
def test_check_adapter_dir_refuses_what_sglang_serves_wrongly(tmp_path, overrides, kw, message):
    path = make_adapter(tmp_path / "a", **overrides)
    with pytest.raises(AdapterFormatError, match=message) as err:
        check_adapter_dir(Path(path), **kw)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_check_adapter_dir_accepts_plain_lora_and_names_a_missing_config(tmp_path):
    ok = Path(make_adapter(tmp_path / "ok", r=16))
    assert check_adapter_dir(ok, max_rank=16, pool_modules=ATTENTION_ONLY)["r"] == 16
    assert check_adapter_dir(Path(make_adapter(tmp_path / "al", target_modules="all-linear")),
                             pool_modules=ATTENTION_ONLY)["target_modules"] == "all-linear"
    multi = check_adapter_dir(Path(make_adapter(tmp_path / "m", r=8, alpha=8)), max_rank=8, pool_modules=ALL_LINEAR)
    assert multi["lora_alpha"] == 8
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        check_adapter_dir(tmp_path)


@pytest.mark.parametrize("kw", [{"use_rslora": True}, {"use_dora": True}])
def test_lora_spec_refuses_rslora_and_dora(kw):
    with pytest.raises(AdapterFormatError, match="not served correctly by SGLang 0.5.14"):
        LoraSpec(**kw)


# ---------------------------------------------------------------- (e) a training step; logprob batching

def _ragged_rollouts(seed: int = 0) -> list[Rollout]:
    import random

    rng = random.Random(seed)
    shapes = [(3, 4), (9, 1), (5, 6), (1, 3)]  # (prompt, completion) lengths: both ragged, a 1-token prompt
    return [Rollout([rng.randrange(10, 150000) for _ in range(p)], [rng.randrange(10, 150000) for _ in range(c)],
                    [-1.0] * c) for p, c in shapes]


def _plain_logprobs(trainer, rolls) -> list[list[float]]:
    """One unpadded full-logits forward per row: log_softmax over the vocabulary, gather the completion tokens."""
    out = []
    with torch.no_grad():
        for r in rolls:
            x = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = trainer.model(input_ids=x).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
            out.append(lp[len(r.prompt_ids) - 1:].tolist())
    return out


def test_training_step_changes_the_adapter_and_batched_logprobs_match_a_plain_forward(trainer):
    group = 4
    rolls = []
    for g in range(2):  # two groups with reward spread (GRPO advantages are nonzero)
        for i in range(group):
            r = _ragged_rollouts(seed=10 * g + i)[i]
            r.reward = float(i % 2)
            rolls.append(r)
    with torch.no_grad():
        logps, _ = trainer.completion_logprobs(rolls)
    for r, row in zip(rolls, logps):
        r.sampler_logprobs = row[:len(r.completion_ids)].tolist()  # on-policy old logprobs
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if "lora_" not in n and n.endswith("layers.0.self_attn.q_proj.base_layer.weight")}
    stats = trainer.train_step(rolls, group)
    assert math.isfinite(stats["loss"])
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["equal_reward_groups"] == 0 and stats["train_tokens"] == sum(len(r.completion_ids) for r in rolls)
    after = dict(trainer.model.named_parameters())
    changed_b = [n for n in lora if "lora_B" in n and not torch.equal(lora[n], after[n].detach())]
    assert len(changed_b) == len([n for n in lora if "lora_B" in n]), "some lora_B did not move"
    assert frozen and all(torch.equal(v, after[n].detach()) for n, v in frozen.items()), "base weights moved"

    # now that the adapter is nonzero: the padded batch equals one plain forward per row
    rolls = _ragged_rollouts(seed=3)
    with torch.no_grad():
        logps, mask = trainer.completion_logprobs(rolls)
    width = max(len(r.completion_ids) for r in rolls)
    assert logps.shape == mask.shape == (len(rolls), width)
    for i, (r, want) in enumerate(zip(rolls, _plain_logprobs(trainer, rolls))):
        c = len(r.completion_ids)
        assert mask[i].tolist() == [1.0] * c + [0.0] * (width - c)
        got = logps[i, :c].tolist()
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (i, got, want)


def test_train_step_refuses_rollouts_without_the_samplers_logprobs(trainer):
    """A rollout whose engine was not asked for logprobs has none: padding them as 0 would turn the GRPO ratio
    into pi(token) (found on the GPU: SGLang sends output logprobs only with return_logprob)."""
    rolls = _ragged_rollouts(seed=3)
    rolls[2].sampler_logprobs = []
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="rollout 2 has 0 sampler logprobs for 6 completion tokens"):
        trainer.train_step(rolls, group_size=2)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(v, after[n].detach()) for n, v in lora.items()), "the refused step moved the adapter"
