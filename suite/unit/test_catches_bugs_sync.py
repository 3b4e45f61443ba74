"""The suite catches the bug (conformance 1 and 2): each check passes on the normal fake and raises on a fake
with the bug (fixtures/fake_sglang bug modes). The fake is a test double, never GPU evidence."""
from dataclasses import dataclass, field

import pytest

from fixtures.fake_sglang_state import BUGS
from reference_impl import conformance as C
from reference_impl.conformance import ConformanceError
from reference_impl.loop import LoopConfig, rollout
from reference_impl.sync import HotReload

from .bugcatch_common import adapters, fake_state, reference, served_logprobs, serving  # noqa: F401 (fixtures)


def test_bug_modes_are_opt_in_and_named():
    assert fake_state().bugs == frozenset()
    assert set(BUGS) == {"stale_adapter", "serve_base", "keep_radix_on_reload", "never_unload",
                         "restart_without_adapter", "ignore_weight_update", "update_label_only",
                         "no_flush_on_update"}
    with pytest.raises(ValueError, match="unknown fake SGLang bug"):
        fake_state(bugs="stale_adaptor")


# ---------------------------------------------------------------- 1: hot-reload correctness

@dataclass
class HotReloadRun:
    served: list = field(default_factory=list)      # per adapter: served input logprobs
    references: list = field(default_factory=list)  # per adapter: the correct server's
    base: list = field(default_factory=list)        # per adapter: served base logprobs, same server


def drive_hot_reload(client, reference, paths) -> HotReloadRun:
    """As suite/conformance/test_hot_reload.py::test_served_logprobs_equal_hf_peft, one adapter after another on
    one server: load under a name, probe it and the base model, unload."""
    run = HotReloadRun()
    for i, path in enumerate(paths):
        name = f"hr-{i}"
        client.load_lora_adapter(name, path)
        try:
            run.served.append(served_logprobs(client, name))
            run.base.append(served_logprobs(client, None))
        finally:
            client.unload_lora_adapter(name)
        run.references.append(reference.logprobs(path))
    return run


def check_hot_reload(run: HotReloadRun) -> None:
    for i, (served, ref, base) in enumerate(zip(run.served, run.references, run.base)):
        noise = C.assert_matches(served, ref, f"adapter {i} vs reference")
        C.assert_differs(served, base, f"adapter {i} vs base", noise)


def test_1_hot_reload_checks_pass_on_the_normal_fake(reference, adapters):
    with serving() as (client, _):
        run = drive_hot_reload(client, reference, adapters[:3])
    check_hot_reload(run)
    assert all(C.logprob_diff(s, r).max_abs == 0 for s, r in zip(run.served, run.references))


def test_1_hot_reload_catches_a_stale_adapter(reference, adapters):
    with serving({"stale_adapter"}) as (client, _):
        run = drive_hot_reload(client, reference, adapters[:3])
    with pytest.raises(ConformanceError, match="adapter 1 vs reference: served logprobs differ"):
        check_hot_reload(run)
    with pytest.raises(ConformanceError, match="differ from the reference"):
        C.assert_matches(run.served[2], run.references[2], "adapter 2")


def test_1_hot_reload_catches_the_base_model_served(reference, adapters):
    with serving({"serve_base"}) as (client, _):
        run = drive_hot_reload(client, reference, adapters[:1])
    with pytest.raises(ConformanceError, match="adapter 0 vs reference: served logprobs differ"):
        check_hot_reload(run)
    with pytest.raises(ConformanceError, match="the served policy did not change"):
        C.assert_differs(run.served[0], run.base[0], "adapter 0 vs base")


# ---------------------------------------------------------------- 2: the served policy changes every step

class Task:
    name = "fixed"

    def prompts(self, step, count):
        return [[10 + step, 20 + i, 30, 40, 50, 60] for i in range(count)]

    def reward(self, prompt_ids, completion_ids):
        return 0.5


@dataclass
class StepsRun:
    rollout_adapters: list = field(default_factory=list)  # per step: the set of adapters the rollout named
    currents: list = field(default_factory=list)
    retired: list = field(default_factory=list)
    models: list = field(default_factory=list)            # /v1/models after each sync
    served: list = field(default_factory=list)
    references: list = field(default_factory=list)


def drive_policy_steps(client, reference, paths) -> StepsRun:
    """As test_hot_reload.py::test_served_policy_changes_every_step: rollout on the current version, then sync
    the next one by hot reload; after every sync probe /v1/models and the served logprobs."""
    strategy = HotReload(client, run_tag="t1")
    cfg = LoopConfig(prompts_per_step=2, group_size=2, max_new_tokens=4)
    strategy.publish(0, paths[0])
    run = StepsRun()
    for step, path in enumerate(paths[1:]):
        rolls = rollout(client, strategy, Task(), cfg, step)
        run.rollout_adapters.append({r.adapter for r in rolls})
        run.retired.append(strategy.current)
        strategy.publish(step + 1, path)
        run.currents.append(strategy.current)
        run.models.append(client.models())
        run.served.append(served_logprobs(client, strategy.current))
        run.references.append(reference.logprobs(path))
    return run


def check_policy_steps(run: StepsRun) -> None:
    previous = None
    for step, served in enumerate(run.served):
        assert run.rollout_adapters[step] == {run.retired[step]}, "a rollout did not name the current adapter"
        C.assert_served(run.models[step], run.currents[step], run.retired[:step + 1])
        noise = C.assert_matches(served, run.references[step], f"step {step}")
        if previous is not None:
            C.assert_differs(served, previous, f"step {step} vs step {step - 1}", noise)
        previous = served


def test_2_policy_steps_checks_pass_on_the_normal_fake(reference, adapters):
    with serving() as (client, _):
        run = drive_policy_steps(client, reference, adapters[:4])
    check_policy_steps(run)
    assert run.currents == ["policy-t1-v1", "policy-t1-v2", "policy-t1-v3"]


def test_2_policy_steps_catch_a_policy_that_never_changes(reference, adapters):
    with serving({"stale_adapter"}) as (client, _):
        run = drive_policy_steps(client, reference, adapters[:4])
    with pytest.raises(ConformanceError, match="step 0: served logprobs differ from the reference"):
        check_policy_steps(run)
    # every step serves v0's weights: consecutive versions are indistinguishable
    with pytest.raises(ConformanceError, match="the served policy did not change"):
        C.assert_differs(run.served[1], run.served[0], "step 1 vs step 0")


def test_2_policy_steps_catch_the_base_model_served(reference, adapters):
    with serving({"serve_base"}) as (client, _):
        run = drive_policy_steps(client, reference, adapters[:3])
        base = served_logprobs(client, None)
    with pytest.raises(ConformanceError, match="step 0: served logprobs differ from the reference"):
        check_policy_steps(run)
    with pytest.raises(ConformanceError, match="the served policy did not change"):
        C.assert_differs(run.served[0], base, "policy vs base")


def test_2_a_sync_that_never_retires_versions_is_caught(reference, adapters):
    """The seed PR's bug on a correct server: old versions stay loaded (assert_served's retired list)."""
    with serving() as (client, _):
        strategy = HotReload(client, keep_previous=True, run_tag="t1")
        strategy.publish(0, adapters[0])
        strategy.publish(1, adapters[1])
        with pytest.raises(ConformanceError, match=r"retired adapters still loaded: \['policy-t1-v0'\]"):
            C.assert_served(client.models(), strategy.current, ["policy-t1-v0"])
        C.assert_served(client.models(), "policy-t1-v1")
        with pytest.raises(ConformanceError, match="policy-v9 is not served"):
            C.assert_served(client.models(), "policy-v9")
