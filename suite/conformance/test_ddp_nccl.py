"""Data-parallel training over NCCL on the training GPUs (the seed's 1 inference + 3 training layout, or 2 + 2):
each rank takes the step one process takes on the whole batch, and the ranks hold the same adapter after
every step. The CPU twin (gloo) is suite/unit/test_ddp.py; `splitrl run` uses the same DistContext.

    pytest suite/conformance/test_ddp_nccl.py -m gpu --inference-gpus 0 --training-gpus 1,2,3
"""
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpus(3)]

STEPS = 3


@pytest.fixture(scope="module")
def training_world(gpu_plan):
    plan = gpu_plan["plan"]
    if plan is None or plan.mode != "split" or len(plan.training) < 2:
        pytest.skip("needs a training group of 2+ GPUs: pass e.g. --inference-gpus 0 --training-gpus 1,2,3")
    return len(plan.training)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_nccl_ranks_take_the_single_process_step(training_world, model_dir, tmp_path, loss_type):
    import torch

    from suite.ddp_ranks import free_port, single_process_step, train_steps_rank

    n_groups = 2 * training_world  # whole groups per rank, two each
    path = str(model_dir.path)
    torch.multiprocessing.spawn(single_process_step, nprocs=1,
                                args=(path, loss_type, str(tmp_path), "cuda:0", n_groups))
    expected = torch.load(tmp_path / "single.pt")
    want = expected["grads"]
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0, "the single-process gradient is zero: the comparison would be vacuous"
    torch.multiprocessing.spawn(train_steps_rank, nprocs=training_world, args=(
        training_world, free_port(), path, loss_type, str(tmp_path), "nccl", n_groups, STEPS))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(training_world)]
    for rank, g in enumerate(got):
        # GPU float32 sums differ in order between one batch and its shards: a tolerance well below what a
        # missing all-reduce (one shard's gradient) or a wrong average (x world) would produce
        assert g["loss"] == pytest.approx(expected["loss"], rel=1e-3, abs=1e-5), rank
        for k in want:
            torch.testing.assert_close(g["grads"][k], want[k], rtol=1e-2, atol=1e-3 * scale, msg=f"rank {rank} {k}")
        assert g["spreads"] == [0.0] * STEPS, f"rank {rank}: ranks diverged (checksum spread per step)"
        for k in got[0]["state"]:
            assert torch.equal(g["state"][k], got[0]["state"][k]), f"rank {rank} {k} differs from rank 0"
