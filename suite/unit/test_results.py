"""Results store, comparison and fingerprint: real files, real pandas, no mocks of the code under test."""

from __future__ import annotations

import csv
import importlib.metadata
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from reference_impl.compare import compare, format_table, main_compare, plot
from reference_impl.fingerprint import FINGERPRINT_KEYS, collect_fingerprint, format_fingerprint
from reference_impl.results import (
    RESULT_COLUMNS,
    CsvFormatError,
    ResultRow,
    ResultsWriter,
    read_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fingerprint(device_kind: str, gpu_name: str = "NVIDIA H100 80GB HBM3", count: str = "1") -> dict:
    fp = {key: "" for key in FINGERPRINT_KEYS}
    fp.update(device_kind=device_kind, gpu_name=gpu_name, gpu_count=count, python_version="3.11.7")
    return fp


def decode_rows(values, metric="decode_tok_s", **params) -> list[ResultRow]:
    params = params or {"batch": 8, "gen_len": 256}
    return [ResultRow("rollout", "test_decode", metric, v, model="qwen3-0.6b", params=params) for v in values]


@pytest.fixture
def two_machines(tmp_path) -> tuple[Path, Path]:
    """h100.csv: 3 rounds with median 100; h200.csv: median 150 plus a metric only it has."""
    h100, h200 = tmp_path / "h100.csv", tmp_path / "h200.csv"
    ResultsWriter(h100, fingerprint=fingerprint("nvidia-h100-x1")).append(decode_rows([90, 100, 130]))
    writer = ResultsWriter(h200, fingerprint=fingerprint("nvidia-h200", "NVIDIA H200"))
    writer.append(decode_rows([150, 140, 160]))
    writer.append(ResultRow("rollout", "test_reload", "lora_reload_ms", 12.5, params={"rank": 16}))
    return h100, h200


def rewrite_csv(path: Path, edit) -> None:
    """Rewrite a results CSV through `edit(rows)` where rows[0] is the header."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    edit(rows)
    with open(path, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


# ---------------------------------------------------------------- writing and comparing


def test_written_file_has_schema_header_and_one_row_per_number(two_machines):
    h100, _ = two_machines
    assert h100.read_text().splitlines()[0].split(",") == RESULT_COLUMNS
    df = read_results(h100)
    assert len(df) == 3
    assert df["params"].iloc[0] == '{"batch":8,"gen_len":256}'
    assert set(df["device_kind"]) == {"nvidia-h100-x1"}
    assert df["timestamp_utc"].str.endswith("Z").all()
    assert df["source"].iloc[0] == str(h100)


def test_compare_medians_and_ratios(two_machines):
    df = compare(list(two_machines))
    assert df.attrs["baseline"] == "nvidia-h100-x1"
    decode = df[df["metric"] == "decode_tok_s"].iloc[0]
    assert decode["nvidia-h100-x1"] == 100.0
    assert decode["nvidia-h200"] == 150.0
    assert decode["nvidia-h200/nvidia-h100-x1"] == pytest.approx(1.5)
    # A row only one machine has is kept, with NaN for the other.
    reload = df[df["metric"] == "lora_reload_ms"].iloc[0]
    assert reload["nvidia-h200"] == 12.5
    assert math.isnan(reload["nvidia-h100-x1"])
    table = format_table(df)
    assert "decode_tok_s" in table and "1.500x" in table and "-" in table


def test_compare_ignoring_a_param_lines_up_runs_that_differ_only_there(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    ResultsWriter(a, fingerprint=fingerprint("nvidia-h100-x4")).append(
        decode_rows([100], batch=8, mem_fraction=0.25) + decode_rows([7], metric="ttft_ms", batch=8))
    ResultsWriter(b, fingerprint=fingerprint("nvidia-h200-x4", "NVIDIA H200")).append(
        decode_rows([150], batch=8, mem_fraction=0.5))
    apart = compare([a, b])
    assert len(apart[apart["metric"] == "decode_tok_s"]) == 2  # different params: two half-empty rows
    together = compare([a, b], ignore_params=["mem_fraction"], metrics=["decode_tok_s"])
    assert len(together) == 1 and together["params"].iloc[0] == '{"batch":8}'
    assert together["nvidia-h200-x4/nvidia-h100-x4"].iloc[0] == pytest.approx(1.5)
    assert together.attrs["ignored_params"] == ["mem_fraction"]
    assert main_compare([str(a), str(b)], ignore_params=["mem_fraction"]) == 0
    assert "params ignored (rows mix their values): mem_fraction" in capsys.readouterr().out


def test_compare_baseline_by_label_or_file_and_other_label_modes(two_machines):
    h100, h200 = two_machines
    by_label = compare([h100, h200], baseline="nvidia-h200")
    by_file = compare([h100], baseline=str(h200))  # a baseline file not listed is added
    for df in (by_label, by_file):
        decode = df[df["metric"] == "decode_tok_s"].iloc[0]
        assert decode["nvidia-h100-x1/nvidia-h200"] == pytest.approx(100 / 150)
    assert compare([h100, h200], label_by="file").attrs["labels"] == ["h100", "h200"]
    assert compare([h100, h200], label_by="backend").attrs["labels"] == [
        "sglang@nvidia-h100-x1", "sglang@nvidia-h200",
    ]
    with pytest.raises(ValueError, match="baseline"):
        compare([h100, h200], baseline="nope")


def test_compare_by_a_param_puts_layouts_of_one_file_side_by_side(tmp_path, capsys):
    """param:layout: one column per (machine, layout), rows matched without the layout; a row without the
    parameter gets its own column instead of joining a layout's."""
    path = tmp_path / "layouts.csv"
    writer = ResultsWriter(path, fingerprint=fingerprint("nvidia-h200-x4", "NVIDIA H200"))
    writer.append(decode_rows([2.0, 2.2], metric="step_s", layout="1+1", tp=1)
                  + decode_rows([1.5], metric="step_s", layout="1+3", tp=1)
                  + decode_rows([9.0], metric="step_s", tp=1))
    df = compare([path], label_by="param:layout")
    assert df.attrs["labels"] == ["nvidia-h200-x4 layout=1+1", "nvidia-h200-x4 layout=1+3",
                                  "nvidia-h200-x4 layout=unset"]
    assert len(df) == 1 and df["params"].iloc[0] == '{"tp":1}'
    row = df.iloc[0]
    assert row["nvidia-h200-x4 layout=1+1"] == pytest.approx(2.1)
    assert row["nvidia-h200-x4 layout=1+3/nvidia-h200-x4 layout=1+1"] == pytest.approx(1.5 / 2.1)
    assert main_compare([str(path)], label_by="param:layout") == 0
    assert "columns by param:layout (rows matched without it)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="parameter name"):
        compare([path], label_by="param:")
    with pytest.raises(ValueError, match="param:NAME"):
        compare([path], label_by="layout")


def test_compare_excludes_rows_by_a_param_value(tmp_path, capsys):
    """--exclude step=0 drops the warm-up step before --ignore-param step pools the rest; the value is matched as
    the command line writes it (0 for the JSON number, 1+3 for a string)."""
    path = tmp_path / "steps.csv"
    writer = ResultsWriter(path, fingerprint=fingerprint("nvidia-h100-x4"))
    for step, value in enumerate([20.0, 1.5, 1.4, 1.6]):
        writer.append(decode_rows([value], metric="step_s", step=step, layout="1+3"))
    pooled = compare([path], ignore_params=["step"])
    assert pooled["nvidia-h100-x4"].iloc[0] == pytest.approx(1.55)  # the median still sees the warm-up
    warm = compare([path], ignore_params=["step"], exclude=["step=0"])
    assert warm["nvidia-h100-x4"].iloc[0] == pytest.approx(1.5)
    assert compare([path], exclude=["layout=1+3"]).empty
    assert len(compare([path], exclude=["step=7"])) == 4  # no such value: nothing dropped
    assert main_compare([str(path)], ignore_params=["step"], exclude=["step=0"]) == 0
    assert "rows left out: step=0" in capsys.readouterr().out
    assert main_compare([str(path)], exclude=["step"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_compare_cli_takes_label_by_param_and_exclude(tmp_path, capsys):
    from reference_impl.cli import main

    path = tmp_path / "steps.csv"
    rows = [decode_rows([value], metric="step_s", step=step, layout=layout)[0]
            for value, step, layout in [(20.0, 0, "1+1"), (2.0, 1, "1+1"), (1.0, 1, "1+3")]]
    ResultsWriter(path, fingerprint=fingerprint("nvidia-h100-x4")).append(rows)
    assert main(["compare", str(path), "--label-by", "param:layout", "--exclude", "step=0"]) == 0
    out = capsys.readouterr().out
    assert "nvidia-h100-x4 layout=1+3/nvidia-h100-x4 layout=1+1" in out and "0.500x" in out


def test_device_label_falls_back_to_count_and_gpu_name(tmp_path):
    path = tmp_path / "a.csv"
    ResultsWriter(path, fingerprint=fingerprint("", "NVIDIA H100", "2")).append(decode_rows([1.0]))
    assert compare([path]).attrs["labels"] == ["2xNVIDIA H100"]


def test_plot_writes_png(two_machines, tmp_path):
    out = tmp_path / "plots" / "compare.png"
    plot(compare(list(two_machines)), out)
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_plot_labels_keep_the_params_that_tell_rows_apart():
    import pandas as pd

    from reference_impl.compare import _row_name, _shared_params

    rows = pd.DataFrame({"test": ["t", "t"], "model": ["m", "m"], "metric": ["sync_ms", "sync_ms"],
                         "params": ['{"concurrency":256,"gen_len":256,"modules":"all-linear","rank":8}',
                                    '{"concurrency":256,"gen_len":256,"modules":"all-linear","rank":64}']})
    shared = _shared_params(rows)
    assert [_row_name(r, shared) for _, r in rows.iterrows()] == ["t m sync_ms rank=8", "t m sync_ms rank=64"]


def test_plot_truncates_many_rows(tmp_path):
    path = tmp_path / "many.csv"
    rows = [r for batch in range(60) for r in decode_rows([float(batch + 1)], batch=batch)]
    ResultsWriter(path, fingerprint=fingerprint("nvidia-h100-x1")).append(rows)
    out = tmp_path / "many.png"
    plot(compare([path]), out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_main_compare_prints_table_and_plot(two_machines, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main_compare([str(p) for p in two_machines], "nvidia-h100-x1", str(out), "device") == 0
    assert "decode_tok_s" in capsys.readouterr().out
    assert out.read_bytes().startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------- malformed files


def assert_one_line_error(path: Path, row_text: str) -> str:
    with pytest.raises(CsvFormatError) as caught:
        read_results([path])
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message and row_text in message
    return message


def test_missing_column(two_machines):
    h100, _ = two_machines
    index = RESULT_COLUMNS.index("value")
    rewrite_csv(h100, lambda rows: [row.pop(index) for row in rows])
    message = assert_one_line_error(h100, "row 1 (header)")
    assert "missing column 'value'" in message


def test_non_numeric_value_names_row_3(two_machines):
    h100, _ = two_machines

    def break_value(rows):
        rows[2][RESULT_COLUMNS.index("value")] = "fast"  # rows[2] is file line 3

    rewrite_csv(h100, break_value)
    assert "'fast' is not a number" in assert_one_line_error(h100, "row 3")


def test_bad_params_json(two_machines):
    h100, _ = two_machines

    def break_params(rows):
        rows[1][RESULT_COLUMNS.index("params")] = '{"batch": 8,\n'

    rewrite_csv(h100, break_params)
    assert "params" in assert_one_line_error(h100, "row 2")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert "empty" in assert_one_line_error(path, "row 1")


def test_main_compare_reports_bad_csv_on_one_stderr_line(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert main_compare([str(path)], None, None, "device") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "empty.csv: row 1" in err


def test_invalid_metric_rejected(tmp_path):
    writer = ResultsWriter(tmp_path / "r.csv", fingerprint=fingerprint("x"))
    for bad in ("decode_speed", "throughput", "Decode_tok_s", "_s"):
        with pytest.raises(ValueError, match="_tok_s"):
            writer.append(ResultRow("s", "t", bad, 1.0))
    assert not (tmp_path / "r.csv").exists()  # nothing written for a rejected row
    assert writer.append([ResultRow("s", "t", m, 1.0) for m in ("reward", "passed", "prefill_ms")]) == 3


# ---------------------------------------------------------------- append safety


def test_append_refuses_foreign_header(tmp_path):
    path = tmp_path / "theirs.csv"
    path.write_bytes(b"name,score\nalice,3\n")
    with pytest.raises(CsvFormatError, match="header") as caught:
        ResultsWriter(path, fingerprint=fingerprint("x")).append(decode_rows([1.0]))
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == b"name,score\nalice,3\n"


def test_crash_during_replace_leaves_original_intact(two_machines, monkeypatch):
    h100, _ = two_machines
    before = h100.read_bytes()
    real_replace = os.replace
    calls = []

    def replace_that_crashes_once(src, dst):
        calls.append(src)
        if len(calls) == 1:
            raise OSError("simulated crash before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_that_crashes_once)
    writer = ResultsWriter(h100, fingerprint=fingerprint("nvidia-h100-x1"))
    with pytest.raises(OSError, match="simulated"):
        writer.append(decode_rows([1.0, 2.0]))
    assert h100.read_bytes() == before
    assert len(read_results(h100)) == 3
    assert not list(h100.parent.glob("*.tmp"))  # the half-done temp file was cleaned up
    writer.append(decode_rows([1.0, 2.0]))
    assert len(read_results(h100)) == 5


def _append_twenty(path: str, worker: int, start) -> None:
    start.wait()  # both processes race from the same moment
    writer = ResultsWriter(path, run_id=f"worker{worker}", fingerprint=fingerprint("x"))
    for i in range(20):
        writer.append(ResultRow("s", "t", "step_ms", worker * 100 + i))


def test_concurrent_appends_lose_no_rows(tmp_path):
    path = str(tmp_path / "shared.csv")
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    workers = [ctx.Process(target=_append_twenty, args=(path, w, start)) for w in (1, 2)]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    df = read_results(path)
    assert len(df) == 40
    assert sorted(df["value"]) == sorted(float(w * 100 + i) for w in (1, 2) for i in range(20))


# ---------------------------------------------------------------- fingerprint


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def _installed(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def test_fingerprint_on_this_machine():
    fp = collect_fingerprint()
    assert list(fp) == FINGERPRINT_KEYS
    assert all(isinstance(v, str) for v in fp.values())
    if not _nvml_works():
        assert fp["gpu_count"] == "0"
    assert fp["python_version"]
    assert fp["torch_version"] == _installed("torch")
    if _installed("torch"):
        assert fp["torch_version"]
    assert fp["splitrl_version"] == _installed("splitrl")
    assert "gpu_count" in format_fingerprint(fp)


def test_git_sha_named_by_the_sender_wins_over_a_copys_git(monkeypatch, tmp_path):
    """A copy shipped to a GPU node can carry a stale .git: SPLITRL_GIT_SHA, when set, is the commit that ran."""
    from reference_impl.fingerprint import _git_sha

    monkeypatch.setenv("SPLITRL_GIT_SHA", "60abdf3")
    assert _git_sha(tmp_path) == "60abdf3"
    monkeypatch.delenv("SPLITRL_GIT_SHA")
    assert _git_sha(tmp_path) == ""  # no .git there and nothing sent


def test_fingerprint_uses_given_gpus():
    @dataclass
    class Gpu:
        name: str
        total_mib: int

    fp = collect_fingerprint(gpus=[Gpu("NVIDIA H100", 81559), Gpu("NVIDIA H200", 143771)])
    assert fp["gpu_name"] == "NVIDIA H100+NVIDIA H200"
    assert fp["gpu_count"] == "2"
    same = collect_fingerprint(gpus=[Gpu("NVIDIA H100", 81559)] * 2)
    assert (same["gpu_name"], same["gpu_count"], same["gpu_memory_mib"]) == ("NVIDIA H100", "2", "81559")


def test_fingerprint_reads_sglang_version_from_other_interpreter(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 0.5.9\n")  # answers like `python -c <version code>`
    fake_python.chmod(0o755)
    fp = collect_fingerprint(sglang_python=str(fake_python), extra={"note": "x"})
    assert fp["sglang_version"] == "0.5.9"
    assert fp["note"] == "x"
    fp["sglang_version"] = "mutated"  # callers get a copy; the cache stays intact
    assert collect_fingerprint(sglang_python=str(fake_python), extra={"note": "x"})["sglang_version"] == "0.5.9"
