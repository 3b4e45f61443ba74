"""GPU inventory (through NVML, never CUDA) and the inference/training split plan.

NVML is used instead of torch.cuda so that reading the inventory never creates a CUDA
context in the parent process: the GPUs must stay free for the SGLang and trainer children.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

MIB = 1024 * 1024


class NoGpuError(RuntimeError):
    """No usable GPU; the message says why and what the caller needed one for."""


class PlanError(ValueError):
    """An impossible inventory/split request; the message says what to change."""


@dataclass(frozen=True)
class GpuInfo:
    ordinal: int  # position among the visible GPUs, 0..n-1
    index: int  # physical NVML index (PCI bus order)
    uuid: str
    name: str
    total_mib: int
    free_mib: int

    @property
    def label(self) -> str:
        """Short label such as "H100-80GB": memory-size and packaging tokens are dropped
        from the name because the rounded memory is appended anyway."""
        name = self.name.removeprefix("NVIDIA ").strip()
        tokens = [t for t in re.split(r"[\s\-]+", name)
                  if t and not re.fullmatch(r"\d+GB|HBM\w*|SXM\d*", t, re.IGNORECASE)]
        return "-".join(tokens + [f"{round(self.total_mib / 1024)}GB"])


# ---------------------------------------------------------------- NVML inventory

def open_nvml(nvml=None):
    """Initialised pynvml module, or NoGpuError("NVML unavailable: ...") if it can't init."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as err:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise NoGpuError(f"NVML unavailable: {err}") from err
    return nvml


def close_nvml(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass  # shutting down must never mask the real error


@contextmanager
def nvml_session(nvml=None):
    """open_nvml/close_nvml as a context; NVML reference-counts init, so nesting is fine."""
    lib = open_nvml(nvml)
    try:
        yield lib
    finally:
        close_nvml(lib)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_nvml(nvml=None) -> tuple[list[GpuInfo], str]:
    """All physical GPUs plus the reason when there are none."""
    try:
        with nvml_session(nvml) as lib:
            gpus = []
            for i in range(lib.nvmlDeviceGetCount()):
                handle = lib.nvmlDeviceGetHandleByIndex(i)
                mem = lib.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(GpuInfo(i, i, _text(lib.nvmlDeviceGetUUID(handle)),
                                    _text(lib.nvmlDeviceGetName(handle)),
                                    int(mem.total) // MIB, int(mem.free) // MIB))
    except NoGpuError as err:
        return [], str(err)
    except Exception as err:  # e.g. a GPU fell off the bus: report it rather than half a list
        return [], f"NVML error while listing GPUs: {err}"
    return gpus, "" if gpus else "NVML sees 0 GPUs"


def read_nvml_gpus(nvml=None) -> list[GpuInfo]:
    """Every physical GPU NVML reports; [] when NVML is unavailable (see inventory_status)."""
    return _read_nvml(nvml)[0]


def _match_uuid(entry: str, gpus: list[GpuInfo]) -> GpuInfo | None:
    hits = [g for g in gpus if g.uuid.lower().startswith(entry.lower())]
    return hits[0] if len(hits) == 1 else None  # ambiguous prefix counts as invalid


def apply_cuda_visible_devices(gpus: list[GpuInfo], cvd: str | None) -> list[GpuInfo]:
    """Filter/reorder `gpus` the way the CUDA runtime applies CUDA_VISIBLE_DEVICES.

    None → all GPUs; "" → none. Entries are physical indices or "GPU-<uuid>" (full or a
    unique prefix). As in CUDA, parsing stops at the first invalid entry (unknown index,
    ambiguous or unknown UUID, junk, empty entry) and everything before it is kept; a
    repeated GPU is treated the same way. "MIG-" slices are rejected with PlanError because
    the split needs whole GPUs. Indices are NVML (PCI bus) indices, which is why children get
    CUDA_DEVICE_ORDER=PCI_BUS_ID. Result keeps the listed order with ordinals 0..k-1.
    """
    if cvd is None:
        return [dataclasses.replace(g, ordinal=i) for i, g in enumerate(gpus)]
    by_index = {g.index: g for g in gpus}
    chosen: list[GpuInfo] = []
    for raw in cvd.split(",") if cvd.strip() else []:
        entry = raw.strip()
        if entry.upper().startswith("MIG-"):
            raise PlanError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is a MIG slice: splitrl needs "
                            "whole GPUs, list physical indices or GPU- UUIDs instead")
        if entry.isdigit():
            gpu = by_index.get(int(entry))
        elif entry.upper().startswith("GPU-"):
            gpu = _match_uuid(entry, gpus)
        else:
            gpu = None
        if gpu is None or gpu in chosen:
            break  # CUDA semantics: the first invalid entry ends the list
        chosen.append(gpu)
    return [dataclasses.replace(g, ordinal=i) for i, g in enumerate(chosen)]


def inventory_status(environ=os.environ) -> tuple[list[GpuInfo], str]:
    """Visible GPUs and, when there are none, a sentence saying why ("" otherwise).
    A MIG entry in CUDA_VISIBLE_DEVICES raises PlanError: that is a setting to fix, not "no GPU"."""
    gpus, reason = _read_nvml()
    if not gpus:
        return [], reason
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    visible = apply_cuda_visible_devices(gpus, cvd)
    if visible:
        return visible, ""
    if cvd is not None and not cvd.strip():
        return [], f"CUDA_VISIBLE_DEVICES={cvd!r} hides all GPUs"
    return [], (f"CUDA_VISIBLE_DEVICES={cvd!r} matches none of the {len(gpus)} GPUs NVML sees "
                f"(indices 0..{len(gpus) - 1})")


def read_inventory(environ=os.environ) -> list[GpuInfo]:
    return apply_cuda_visible_devices(read_nvml_gpus(), environ.get("CUDA_VISIBLE_DEVICES"))


_SPEC_ITEM = re.compile(r"(\d+)\s*x\s*([A-Za-z0-9][A-Za-z0-9\-]*?)-(\d+)\s*GB", re.IGNORECASE)


def parse_inventory_spec(spec: str) -> list[GpuInfo]:
    """Fake inventory for planning without GPUs: "4xH100-80GB", "2xH100-80GB,2xA100-40GB";
    "none" gives []. Memory is in GB (treated as GiB); free == total."""
    if spec.strip().lower() == "none":
        return []
    gpus: list[GpuInfo] = []
    for item in spec.split(","):
        m = _SPEC_ITEM.fullmatch(item.strip())
        if not m or int(m.group(1)) < 1:
            raise PlanError(f"bad inventory spec item {item.strip()!r} in {spec!r}: expected "
                            "COUNTxNAME-MEMGB items joined by commas, e.g. 4xH100-80GB or "
                            "2xH100-80GB,2xA100-40GB (or 'none')")
        count, model, gb = int(m.group(1)), m.group(2), int(m.group(3))
        for _ in range(count):
            n = len(gpus)
            gpus.append(GpuInfo(n, n, f"GPU-spec-{n}", f"{model}-{gb}GB", gb * 1024, gb * 1024))
    return gpus


# ---------------------------------------------------------------- split plan

@dataclass(frozen=True)
class SplitPlan:
    mode: str  # "none" | "shared" | "split"
    inference: tuple[GpuInfo, ...]
    training: tuple[GpuInfo, ...]
    tp_size: int
    sync_strategy: str  # "none" | "restart" | "hot-reload"
    notes: tuple[str, ...] = ()

    def inference_cvd(self) -> str:
        """CUDA_VISIBLE_DEVICES for the SGLang child (physical indices; pair with PCI_BUS_ID)."""
        return ",".join(str(g.index) for g in self.inference)

    def training_cvd(self) -> str:
        return ",".join(str(g.index) for g in self.training)

    def child_env(self, side: str) -> dict[str, str]:
        """Env additions for a child: PCI_BUS_ID makes CUDA number GPUs like NVML does."""
        cvd = {"inference": self.inference_cvd, "training": self.training_cvd}[side]()
        return {"CUDA_VISIBLE_DEVICES": cvd, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def require_gpu(self, reason: str = "",
                    needs: str = "an NVIDIA GPU for SGLang rollouts and LoRA training") -> None:
        if self.mode == "none":
            raise NoGpuError(f"no GPU visible ({reason or 'empty inventory'}): this needs {needs}")

    def as_dict(self) -> dict:
        side = lambda gpus: [dict(dataclasses.asdict(g), label=g.label) for g in gpus]
        return {"mode": self.mode, "inference": side(self.inference),
                "training": side(self.training), "tp_size": self.tp_size,
                "sync_strategy": self.sync_strategy, "notes": list(self.notes),
                "inference_cvd": self.inference_cvd(), "training_cvd": self.training_cvd()}


def _resolve_ids(ids: list[str], inventory: list[GpuInfo], flag: str) -> list[GpuInfo]:
    """Map visible ordinals ("0") or UUIDs / unique UUID prefixes to GPUs, in the given order."""
    known = ", ".join(f"{g.ordinal} ({g.uuid})" for g in inventory) or "none"
    out: list[GpuInfo] = []
    for gid in (p.strip() for raw in ids for p in str(raw).split(",")):
        if gid.isdigit() and int(gid) < len(inventory):
            gpu = inventory[int(gid)]
        else:
            gpu = _match_uuid(gid, inventory) if gid.upper().startswith("GPU-") else None
        if gpu is None:
            raise PlanError(f"{flag} names unknown GPU {gid!r}: use a visible ordinal or UUID; "
                            f"visible GPUs are {known}")
        if gpu in out:
            raise PlanError(f"{flag} lists GPU {gid!r} twice: name each GPU once")
        out.append(gpu)
    if not out:
        raise PlanError(f"{flag} is empty: list at least one GPU (e.g. {flag} 0) or omit the flag")
    return out


def _ids(gpus) -> str:
    return ",".join(str(g.ordinal) for g in gpus)


def _check_tp(tp_size: int, inference: list[GpuInfo], n_visible: int) -> None:
    n = len(inference)
    if tp_size > n:
        # Only suggest a larger group when enough GPUs exist to form it.
        want = ",".join(str(i) for i in range(tp_size))
        fix = f"pass --inference-gpus {want} or --tp {n}" if tp_size <= n_visible else \
            f"pass --tp {n}"
        raise PlanError(f"tp_size {tp_size} needs {tp_size} inference GPUs, got {n}: {fix}")
    if tp_size < n:
        raise PlanError(f"--inference-gpus {_ids(inference)} has {n} GPUs but tp_size is "
                        f"{tp_size}: pass --tp {n} or list {tp_size} inference GPU(s)")


def _check_fits(weight_bytes: int, tp_size: int, inference, mem_fraction: float) -> None:
    smallest = min(inference, key=lambda g: g.total_mib)
    usable = smallest.total_mib * MIB * mem_fraction
    if weight_bytes / tp_size > usable:
        need = math.ceil(weight_bytes / usable)
        gib = lambda b: f"{b / 1024**3:.1f} GiB"
        raise PlanError(
            f"model weights {gib(weight_bytes)} are {gib(weight_bytes / tp_size)} per GPU at "
            f"tp_size {tp_size}, but GPU {smallest.ordinal} ({smallest.label}, "
            f"{gib(smallest.total_mib * MIB)}) holds only {gib(usable)} at mem_fraction "
            f"{mem_fraction}: use --tp {need} ({need} inference GPUs) or a smaller model shape")


def _default_groups(inventory: list[GpuInfo], tp_size: int):
    if len(inventory) == 1:
        return inventory, inventory  # shared; _check_tp rejects tp_size > 1
    if tp_size >= len(inventory):
        raise PlanError(f"tp_size {tp_size} needs {tp_size} inference GPUs plus one for "
                        f"training, but {len(inventory)} are visible: pass --tp "
                        f"{len(inventory) - 1} or less, or add GPUs")
    return inventory[:tp_size], inventory[tp_size:]


def _pick_groups(inventory, inference_gpus, training_gpus, tp_size):
    """(inference, training) lists; a side not given gets every GPU the other side left."""
    if inference_gpus is None and training_gpus is None:
        return _default_groups(inventory, tp_size)
    inf = trn = None
    if inference_gpus is not None:
        inf = _resolve_ids(inference_gpus, inventory, "--inference-gpus")
    if training_gpus is not None:
        trn = _resolve_ids(training_gpus, inventory, "--training-gpus")
    if inf is not None and trn is not None:
        overlap = [g for g in inf if g in trn]
        if overlap and not (inf == trn and len(inf) == 1):  # same single GPU = asked to share
            raise PlanError(f"--inference-gpus {_ids(inf)} overlaps --training-gpus {_ids(trn)} "
                            f"on GPU {_ids(overlap)}: give each GPU to one side")
    inf = inf if inf is not None else [g for g in inventory if g not in trn]
    trn = trn if trn is not None else [g for g in inventory if g not in inf]
    share_fix = "or pass the same single GPU to both flags to share it"
    if not inf:
        raise PlanError(f"--training-gpus {_ids(trn)} takes every visible GPU: leave one for "
                        f"inference, {share_fix}")
    if not trn:
        raise PlanError(f"training group is empty: inference takes GPU(s) {_ids(inf)} of "
                        f"{len(inventory)} visible; pass --training-gpus with a free GPU, "
                        f"{share_fix}")
    return inf, trn


def make_plan(inventory: list[GpuInfo], inference_gpus: list[str] | None = None,
              training_gpus: list[str] | None = None, tp_size: int = 1,
              model_weight_bytes: int | None = None, mem_fraction: float = 0.9) -> SplitPlan:
    """0 GPUs → "none"; 1 → "shared" (restart to sync); N ≥ 2 → "split": inference = first
    tp_size GPUs, training = the rest (hot-reload). Explicit groups (visible ordinals or UUIDs)
    override; the same single GPU on both sides means shared."""
    if tp_size < 1:
        raise PlanError(f"tp_size {tp_size} is invalid: pass --tp 1 or more")
    if not 0 < mem_fraction <= 1:
        raise PlanError(f"mem_fraction {mem_fraction} must be in (0, 1]: pass e.g. 0.9")
    inventory = list(inventory)
    if not inventory and inference_gpus is None and training_gpus is None:
        return SplitPlan("none", (), (), tp_size, "none", ("no GPU visible: CPU-only tests only",))
    inf, trn = _pick_groups(inventory, inference_gpus, training_gpus, tp_size)
    _check_tp(tp_size, inf, len(inventory))
    if model_weight_bytes is not None:
        _check_fits(model_weight_bytes, tp_size, inf, mem_fraction)
    return _finish_plan(inventory, inf, trn, tp_size)


def _finish_plan(inventory, inf, trn, tp_size) -> SplitPlan:
    shared = inf == trn
    notes = []
    if shared:
        notes.append(f"shared GPU {inf[0].ordinal}: SGLang and the trainer split its memory; "
                     "weights sync by restarting SGLang")
    unused = [g for g in inventory if g not in inf and g not in trn]
    if unused:
        notes.append(f"GPU(s) {_ids(unused)} visible but unused")
    if not shared and {g.label for g in inf} != {g.label for g in trn}:
        notes.append("inference and training GPUs differ in model/memory")
    mode, sync = ("shared", "restart") if shared else ("split", "hot-reload")
    return SplitPlan(mode, tuple(inf), tuple(trn), tp_size, sync, tuple(notes))


def format_plan(plan: SplitPlan, reason: str = "") -> str:
    def side(gpus) -> str:
        return "; ".join(f"#{g.ordinal} (physical {g.index}) {g.name} {g.total_mib} MiB"
                         for g in gpus) or "-"
    env = "CUDA_VISIBLE_DEVICES={} CUDA_DEVICE_ORDER=PCI_BUS_ID"
    lines = [f"mode:          {plan.mode}" + (f" ({reason})" if reason else "")]
    if plan.mode != "none":
        lines += [f"inference:     {side(plan.inference)}",
                  f"training:      {side(plan.training)}",
                  f"tp_size:       {plan.tp_size}",
                  f"weight sync:   {plan.sync_strategy}",
                  f"SGLang env:    {env.format(plan.inference_cvd())}",
                  f"trainer env:   {env.format(plan.training_cvd())}"]
    return "\n".join(lines + [f"note:          {n}" for n in plan.notes])
