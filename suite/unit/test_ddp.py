"""Data-parallel training over several training ranks (gloo on CPU here; NCCL on GPUs): every rank must take
exactly the step one process takes on the whole batch, and ranks must stay identical through the loop."""
import pytest

torch = pytest.importorskip("torch")

from reference_impl.ddp import DistContext  # noqa: E402
from reference_impl.devices import parse_inventory_spec  # noqa: E402
from reference_impl.job import RunConfig, ddp_relaunch_argv  # noqa: E402
from suite.ddp_ranks import (GROUP, free_port, join_group, lora_state, make_rollouts, make_trainer,  # noqa: E402
                             spread_rank, train_steps_rank)


@pytest.fixture(scope="module")
def tiny_path():
    from reference_impl.models import resolve_model
    return str(resolve_model("tiny").path)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_ranks_take_the_single_process_step(tiny_path, tmp_path, loss_type):
    """Compared on the gradient the optimizer gets: Adam's first step is ~lr*sign(g), so float32 summation
    order alone can flip single near-zero weights, which says nothing about the data-parallel arithmetic."""
    from suite.ddp_ranks import single_process_step
    torch.multiprocessing.spawn(single_process_step, args=(tiny_path, loss_type, str(tmp_path)), nprocs=1)
    expected = torch.load(tmp_path / "single.pt")
    want = expected["grads"]
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0, "the single-process gradient is zero: the comparison would be vacuous"
    torch.multiprocessing.spawn(train_steps_rank, args=(2, free_port(), tiny_path, loss_type, str(tmp_path)),
                                nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
        assert got["spreads"] == [0.0]  # both ranks hold the same adapter after the step
        for k in want:
            torch.testing.assert_close(got["grads"][k], want[k], rtol=1e-3, atol=1e-5 * scale)


def test_rank_spread_sees_ranks_that_differ(tmp_path):
    """The divergence check itself: three ranks offering 0, 1, 2 must each read a spread of 2."""
    torch.multiprocessing.spawn(spread_rank, args=(3, free_port(), str(tmp_path)), nprocs=3)
    assert [torch.load(tmp_path / f"spread{r}.pt") for r in range(3)] == [2.0, 2.0, 2.0]


def test_a_failing_rank_closes_without_waiting_for_the_others(tmp_path):
    import multiprocessing

    from suite.ddp_ranks import abandoning_rank
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=abandoning_rank, args=(r, 2, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        procs[0].join(60)
        assert procs[0].exitcode == 0, "rank 0 did not finish: its close blocked on the waiting rank"
        assert torch.load(tmp_path / "abort_s.pt") < 5.0
    finally:
        for p in procs:
            p.kill()
            p.join(10)


def _loop_rank(rank, world, port, model_path, out_dir, pipelined=False):
    from reference_impl.loop import LoopConfig, follow_loop, run_loop
    dist = join_group(rank, world, port, "gloo")
    cfg = LoopConfig(steps=2, prompts_per_step=2, group_size=GROUP, max_new_tokens=4)
    try:
        trainer = make_trainer(model_path, "dapo")
        if dist.is_main:
            from reference_impl.hf_engine import HFEngine
            from reference_impl.sync import HotReload
            from reference_impl.tasks import WordStartTask
            engine = HFEngine(model_path)
            if pipelined:  # the rollout worker lives on rank 0 only; rollouts are broadcast from the main thread
                from reference_impl.pipeline import run_pipelined
                recs = run_pipelined(cfg, trainer, engine, HotReload(engine), WordStartTask(model_path), dist=dist)
                assert [r.staleness_max for r in recs][0] == 0 and max(r.staleness_max for r in recs) <= 1
            else:
                recs = run_loop(cfg, trainer, engine, HotReload(engine), WordStartTask(model_path), dist=dist)
            assert [r.extra["rank_spread"] for r in recs] == [0.0, 0.0]  # recorded, and the ranks agree
        else:
            follow_loop(cfg, trainer, dist)
        torch.save(lora_state(trainer), f"{out_dir}/loop{rank}.pt")
    finally:
        dist.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_ranks_stay_identical_through_the_loop(tiny_path, tmp_path, pipelined):
    torch.multiprocessing.spawn(_loop_rank, args=(2, free_port(), tiny_path, str(tmp_path), pipelined), nprocs=2)
    a, b = torch.load(tmp_path / "loop0.pt"), torch.load(tmp_path / "loop1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_relaunch_keeps_collectives_on_loopback(monkeypatch):
    from reference_impl.ddp import relaunch_env
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    env = relaunch_env()
    assert env["NCCL_SOCKET_IFNAME"] == "lo" and env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert env["SPLITRL_DDP_WORKER"] == "1" and env["NCCL_NVLS_ENABLE"] == "0"


def test_uneven_groups_are_refused():
    ctx = DistContext(rank=0, world=3, local_rank=0)
    with pytest.raises(ValueError, match="multiple of the training GPUs"):
        ctx.shard(4 * GROUP, GROUP)
    assert list(DistContext(rank=1, world=2, local_rank=1).shard(4 * GROUP, GROUP)) == list(range(8, 16))


def test_splitrl_run_relaunches_itself_for_a_training_group_of_several_gpus(monkeypatch):
    monkeypatch.delenv("SPLITRL_DDP_WORKER", raising=False)
    args = ["run", "--steps", "3"]
    argv = ddp_relaunch_argv(RunConfig(), args, inventory=parse_inventory_spec("4xH100-80GB"))
    assert argv[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=3" in argv and argv[-5:] == ["-m", "reference_impl.cli", *args]
    two_by_two = RunConfig(tp=2)
    assert "--nproc-per-node=2" in ddp_relaunch_argv(two_by_two, args, parse_inventory_spec("4xH100-80GB"))
    assert ddp_relaunch_argv(RunConfig(), args, inventory=parse_inventory_spec("2xH100-80GB")) is None
    assert ddp_relaunch_argv(RunConfig(engine="hf"), args, inventory=parse_inventory_spec("4xH100-80GB")) is None
    monkeypatch.setenv("SPLITRL_DDP_WORKER", "1")  # already a rank: never relaunch again
    assert ddp_relaunch_argv(RunConfig(), args, inventory=parse_inventory_spec("4xH100-80GB")) is None


@pytest.mark.parametrize("spec,tp,inference,training", [("4xH100-80GB", 1, "0", "1,2,3"),
                                                        ("4xH100-80GB", 2, "0,1", "2,3")])
def test_four_gpu_layouts_reach_the_server_and_the_trainer(spec, tp, inference, training):
    """The seed's layouts: 1 inference + 3 DDP training, and a TP=2 inference group + 2 training GPUs."""
    import sys

    from reference_impl.devices import make_plan
    from reference_impl.job import _server_config

    plan = make_plan(parse_inventory_spec(spec), tp_size=tp)
    cfg = RunConfig(tp=tp, sglang_python=sys.executable)
    server = _server_config(cfg, plan, "/models/x", "hot-reload")
    argv, env = server.argv(30000), server.child_env({})
    assert argv[argv.index("--tp-size") + 1] == str(tp) and env["CUDA_VISIBLE_DEVICES"] == inference
    assert plan.training_cvd() == training
    launch = ddp_relaunch_argv(cfg, ["run"], inventory=parse_inventory_spec(spec))
    assert f"--nproc-per-node={len(training.split(','))}" in launch


@pytest.mark.parametrize("spec,tp,layout", [("4xH100-80GB", 1, "1+3"), ("4xH100-80GB", 2, "2+2"),
                                            ("2xH100-80GB", 1, "1+1")])
def test_run_rows_name_the_layout(spec, tp, layout):
    """`splitrl run` rows carry the split, so runs of one model on several layouts stay apart in compare."""
    from reference_impl.devices import make_plan
    from reference_impl.job import _layout_params

    assert _layout_params(make_plan(parse_inventory_spec(spec), tp_size=tp)) == {"layout": layout, "tp": tp}
    assert _layout_params(None) == {}  # the HF engine on a CPU machine has no plan


def test_run_writes_one_peak_vram_row_per_gpu_of_the_plan():
    from reference_impl.devices import make_plan
    from reference_impl.job import _vram_rows

    class StoppedSampler:  # what run_job's NvmlSampler holds at the end of a run
        error, stopped = None, False

        def stop(self):
            self.stopped = True

        def peak_mib(self):
            return {0: 70000.0, 3: 21000.5}

    base = {"suite": "run", "test": "grpo_hot-reload", "backend": "sglang", "mode": "split",
            "strategy": "hot-reload", "model": "qwen3-1.7b", "params": {"layout": "1+3", "tp": 1}}
    sampler = StoppedSampler()
    plan = make_plan(parse_inventory_spec("4xH100-80GB"), ["0"], ["1", "2", "3"])
    rows = _vram_rows(sampler, base, plan)
    assert sampler.stopped
    assert [(r.metric, r.value, r.params) for r in rows] == [
        ("peak_vram_mib", 70000.0, {"layout": "1+3", "tp": 1, "gpu": 0, "role": "inference"}),
        ("peak_vram_mib", 21000.5, {"layout": "1+3", "tp": 1, "gpu": 3, "role": "training"})]
    assert "role" not in _vram_rows(sampler, base)[0].params  # no plan (not a GPU run): no role to name
    sampler.error = "NVML sampling failed: gone"
    assert _vram_rows(sampler, base) == []  # a broken sampler writes nothing rather than a wrong peak
