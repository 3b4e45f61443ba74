"""Inventory filtering, spec parsing and split planning, on hand-built inventories."""
import pytest

from reference_impl.devices import (
    GpuInfo, NoGpuError, PlanError, apply_cuda_visible_devices, format_plan, inventory_status,
    make_plan, parse_inventory_spec, read_inventory, read_nvml_gpus,
)

UUIDS = ["GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "GPU-8932aaaa-0000-0000-0000-000000000001",
         "GPU-1b2c3d4e-0000-0000-0000-000000000002", "GPU-77777777-0000-0000-0000-000000000003"]


def physical(n=4):
    return [GpuInfo(i, i, UUIDS[i], "NVIDIA H100 80GB HBM3", 81559, 80000) for i in range(n)]


def picked(cvd):
    gpus = apply_cuda_visible_devices(physical(), cvd)
    assert [g.ordinal for g in gpus] == list(range(len(gpus)))  # always renumbered
    return [g.index for g in gpus]


# ---------------------------------------------------------------- CUDA_VISIBLE_DEVICES

@pytest.mark.parametrize("cvd, expected", [
    (None, [0, 1, 2, 3]),
    ("", []),
    ("  ", []),
    ("2", [2]),
    ("3,1", [3, 1]),            # listed order, not physical order
    (" 2 , 0 ", [2, 0]),        # whitespace around entries is tolerated
    (UUIDS[2], [2]),            # full UUID
    ("GPU-1b2c,0", [2, 0]),     # unique prefix, mixed with an index
    ("GPU-8932,1", []),         # ambiguous prefix is invalid → nothing before it
    ("1,GPU-8932,2", [1]),      # ... and stops parsing there
    ("0,7,1", [0]),             # unknown index stops parsing (CUDA semantics)
    ("1,abc,2", [1]),           # junk stops parsing
    ("-1", []),                 # the usual "hide everything" idiom
    ("1,,2", [1]),              # empty entry stops parsing
    ("0,0,1", [0]),             # a repeated GPU is treated as invalid
    ("GPU-ffff", []),           # unknown UUID
])
def test_cuda_visible_devices(cvd, expected):
    assert picked(cvd) == expected


def test_cuda_visible_devices_keeps_identity():
    gpu = apply_cuda_visible_devices(physical(), "3")[0]
    assert (gpu.ordinal, gpu.index, gpu.uuid) == (0, 3, UUIDS[3])


def test_mig_entry_is_rejected_clearly():
    with pytest.raises(PlanError, match="MIG.*whole GPUs"):
        apply_cuda_visible_devices(physical(), "MIG-GPU-8932f937/1/0")


# ---------------------------------------------------------------- this machine (no GPU)

def test_no_gpu_here_gives_empty_inventory_with_reason():
    if read_nvml_gpus():
        pytest.skip("NVML sees GPUs: this test covers the GPU-less path")
    assert read_inventory() == []
    gpus, reason = inventory_status()
    assert gpus == [] and reason.startswith("NVML unavailable:")
    plan = make_plan(gpus)
    assert plan.mode == "none" and plan.sync_strategy == "none"
    with pytest.raises(NoGpuError, match=r"no GPU visible \(NVML unavailable.*\): this needs"):
        plan.require_gpu(reason)
    assert "none" in format_plan(plan, reason)


def test_nvml_module_that_cannot_init_gives_empty_list():
    class BrokenNvml:
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")
    assert read_nvml_gpus(BrokenNvml()) == []


# ---------------------------------------------------------------- inventory specs

def test_spec_single_kind():
    gpus = parse_inventory_spec("4xH100-80GB")
    assert [g.ordinal for g in gpus] == [0, 1, 2, 3] == [g.index for g in gpus]
    assert {g.label for g in gpus} == {"H100-80GB"}
    assert gpus[0].total_mib == gpus[0].free_mib == 80 * 1024
    assert [g.uuid for g in gpus] == [f"GPU-spec-{i}" for i in range(4)]


def test_spec_mixed_and_case_insensitive():
    gpus = parse_inventory_spec("2xH100-80GB, 2XA100-40gb")
    assert [g.label for g in gpus] == ["H100-80GB"] * 2 + ["A100-40GB"] * 2
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert parse_inventory_spec("1xL4-24GB")[0].label == "L4-24GB"
    assert parse_inventory_spec("8xH200-141GB")[7].label == "H200-141GB"
    assert parse_inventory_spec("none") == []


@pytest.mark.parametrize("spec", ["", "H100", "4xH100", "0xH100-80GB", "4xH100-80", "4*H100-80GB",
                                  "4xH100-80GB,", "x-80GB"])
def test_bad_spec_names_expected_format(spec):
    with pytest.raises(PlanError, match="expected COUNTxNAME-MEMGB.*4xH100-80GB"):
        parse_inventory_spec(spec)


@pytest.mark.parametrize("name, mib, label", [
    ("NVIDIA H100 80GB HBM3", 81559, "H100-80GB"),
    ("NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"),
    ("NVIDIA H100 PCIe", 81559, "H100-PCIe-80GB"),
    ("NVIDIA L4", 23034, "L4-22GB"),
])
def test_label_from_real_nvml_names(name, mib, label):
    assert GpuInfo(0, 0, "GPU-x", name, mib, mib).label == label


# ---------------------------------------------------------------- default plans

def test_plan_zero_gpus():
    plan = make_plan([])
    assert (plan.mode, plan.inference, plan.training) == ("none", (), ())
    assert plan.inference_cvd() == plan.training_cvd() == ""


def test_plan_one_gpu_is_shared_with_restart():
    plan = make_plan(parse_inventory_spec("1xL4-24GB"))
    assert plan.mode == "shared" and plan.sync_strategy == "restart"
    assert plan.inference == plan.training and plan.inference_cvd() == "0"
    plan.require_gpu()  # does not raise


@pytest.mark.parametrize("n, tp, inf, trn", [
    (2, 1, "0", "1"), (4, 1, "0", "1,2,3"), (4, 2, "0,1", "2,3"),
    (8, 1, "0", "1,2,3,4,5,6,7"), (8, 4, "0,1,2,3", "4,5,6,7"),
])
def test_plan_split_defaults(n, tp, inf, trn):
    plan = make_plan(parse_inventory_spec(f"{n}xH100-80GB"), tp_size=tp)
    assert (plan.mode, plan.sync_strategy, plan.tp_size) == ("split", "hot-reload", tp)
    assert (plan.inference_cvd(), plan.training_cvd()) == (inf, trn)
    assert plan.child_env("inference") == {"CUDA_VISIBLE_DEVICES": inf,
                                           "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_child_cvd_uses_physical_indices_after_cvd_filtering():
    visible = apply_cuda_visible_devices(physical(), "3,1")
    plan = make_plan(visible)
    assert (plan.inference_cvd(), plan.training_cvd()) == ("3", "1")
    text = format_plan(plan)
    assert "CUDA_VISIBLE_DEVICES=3" in text and "hot-reload" in text and "#0 (physical 3)" in text


def test_as_dict_is_plain_data():
    d = make_plan(parse_inventory_spec("2xH100-80GB")).as_dict()
    assert d["mode"] == "split" and d["inference"][0]["label"] == "H100-80GB"
    assert d["training_cvd"] == "1"


# ---------------------------------------------------------------- explicit groups

def test_explicit_both_sides():
    plan = make_plan(parse_inventory_spec("4xH100-80GB"), ["0", "1"], ["3"], tp_size=2)
    assert (plan.inference_cvd(), plan.training_cvd()) == ("0,1", "3")
    assert any("2 visible but unused" in n for n in plan.notes)


def test_only_training_given_inference_gets_rest():
    plan = make_plan(parse_inventory_spec("4xH100-80GB"), training_gpus=["0", "1"], tp_size=2)
    assert (plan.inference_cvd(), plan.training_cvd()) == ("2,3", "0,1")


def test_only_inference_given_training_gets_rest_and_comma_lists_work():
    plan = make_plan(parse_inventory_spec("4xH100-80GB"), inference_gpus=["2,3"], tp_size=2)
    assert (plan.inference_cvd(), plan.training_cvd()) == ("2,3", "0,1")


def test_ids_may_be_uuids_or_prefixes():
    plan = make_plan(physical(), inference_gpus=[UUIDS[3]], training_gpus=["GPU-1b2c"])
    assert (plan.inference_cvd(), plan.training_cvd()) == ("3", "2")


def test_same_single_gpu_on_both_sides_is_explicit_shared():
    plan = make_plan(parse_inventory_spec("4xH100-80GB"), ["1"], ["1"])
    assert plan.mode == "shared" and plan.sync_strategy == "restart"
    assert plan.inference_cvd() == plan.training_cvd() == "1"


def test_mixed_inventory_notes_difference():
    plan = make_plan(parse_inventory_spec("1xH200-141GB,2xA100-40GB"))
    assert any("differ" in n for n in plan.notes)


# ---------------------------------------------------------------- rejections name the fix

def reject(match, *args, **kwargs):
    with pytest.raises(PlanError, match=match):
        make_plan(*args, **kwargs)


def test_overlap_is_rejected():
    reject(r"--inference-gpus 0,1 overlaps --training-gpus 1 .*give each GPU to one side",
           parse_inventory_spec("4xH100-80GB"), ["0", "1"], ["1"], tp_size=2)


def test_unknown_id_is_rejected():
    reject(r"unknown GPU '5'.*visible GPUs are 0 \(GPU-spec-0\), 1 \(GPU-spec-1\)",
           parse_inventory_spec("2xH100-80GB"), ["5"])
    reject(r"unknown GPU 'GPU-nope'", parse_inventory_spec("2xH100-80GB"), None, ["GPU-nope"])
    reject(r"unknown GPU '0'.*visible GPUs are none", [], ["0"])


def test_duplicate_and_empty_side_are_rejected():
    inv = parse_inventory_spec("4xH100-80GB")
    reject(r"lists GPU '1' twice", inv, ["1", "1"])
    reject(r"--training-gpus is empty: list at least one GPU", inv, None, [])


def test_tp_too_large_for_explicit_group():
    reject(r"tp_size 2 needs 2 inference GPUs, got 1: pass --inference-gpus 0,1 or --tp 1",
           parse_inventory_spec("4xH100-80GB"), ["0"], tp_size=2)


def test_tp_too_large_for_one_gpu():
    reject(r"tp_size 2 needs 2 inference GPUs, got 1: pass --tp 1",
           parse_inventory_spec("1xH100-80GB"), tp_size=2)


def test_tp_smaller_than_explicit_group():
    reject(r"--inference-gpus 0,1 has 2 GPUs but tp_size is 1: pass --tp 2",
           parse_inventory_spec("4xH100-80GB"), ["0", "1"])


def test_tp_taking_every_gpu_leaves_no_trainer():
    reject(r"tp_size 2 needs 2 inference GPUs plus one for training.*pass --tp 1 or less",
           parse_inventory_spec("2xH100-80GB"), tp_size=2)
    reject(r"tp_size 0 is invalid: pass --tp 1", parse_inventory_spec("2xH100-80GB"), tp_size=0)


def test_empty_training_side_is_rejected():
    reject(r"training group is empty.*pass --training-gpus",
           parse_inventory_spec("2xH100-80GB"), ["0", "1"], tp_size=2)
    reject(r"training group is empty.*same single GPU to both flags",
           parse_inventory_spec("1xH100-80GB"), ["0"])
    reject(r"--training-gpus 0,1 takes every visible GPU",
           parse_inventory_spec("2xH100-80GB"), None, ["0", "1"])


def test_model_too_large():
    gib = 1024**3
    inv = parse_inventory_spec("1xL4-24GB,3xH100-80GB")
    # 30 GiB of weights on a 24 GiB L4 (21.6 GiB usable at 0.9): needs tp 2.
    reject(r"model weights 30.0 GiB .* GPU 0 \(L4-24GB, 24.0 GiB\) holds only 21.6 GiB .*"
           r"use --tp 2 \(2 inference GPUs\) or a smaller model shape",
           inv, model_weight_bytes=30 * gib)
    # The same model fits an H100, and at tp 2 it fits the smallest of the group.
    assert make_plan(inv, ["1"], model_weight_bytes=30 * gib).mode == "split"
    assert make_plan(inv, ["0", "1"], tp_size=2, model_weight_bytes=30 * gib).tp_size == 2
