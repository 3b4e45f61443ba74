"""Which backend a results row names: its own, else the backend of the test that wrote it (one writer per session
serves `--backend both`). Run m's vLLM conformance rows said "sglang" before this (the writer's fixed default)."""
from __future__ import annotations

from types import SimpleNamespace

from fixtures import plugin
from reference_impl.results import ResultRow, ResultsWriter, read_results


def _row(**kw) -> ResultRow:
    return ResultRow("conformance", "prefix_cache", "cached_tokens", 0.0, **kw)


def test_rows_take_the_running_backend_unless_they_name_one(tmp_path):
    running = {"name": "sglang"}
    writer = ResultsWriter(tmp_path / "r.csv", fingerprint={}, default_backend=lambda: running["name"])
    writer.append(_row())
    running["name"] = "vllm"
    writer.append([_row(), _row(backend="trl-hf")])
    assert list(read_results(tmp_path / "r.csv")["backend"]) == ["sglang", "vllm", "trl-hf"]


def test_benchmark_rows_without_a_backend_take_the_running_one(tmp_path):
    """row_base leaves the backend to the writer: a vLLM session's trainer warm-up row said "sglang" (2x H100,
    2026-11-26) while row_base defaulted to it."""
    from reference_impl.bench import row_base, scalar_rows

    writer = ResultsWriter(tmp_path / "r.csv", fingerprint={}, default_backend=lambda: "vllm")
    writer.append(scalar_rows(row_base("step_warmup", "tiny"), {"warmup_train_s": 1.0}, {})
                  + scalar_rows(row_base("step_trl_peer", "tiny", backend="trl-hf"), {"step_s": 2.0}, {}))
    assert list(read_results(tmp_path / "r.csv")["backend"]) == ["vllm", "trl-hf"]


def test_a_plain_writer_keeps_sglang_as_its_default(tmp_path):
    ResultsWriter(tmp_path / "r.csv", fingerprint={}).append(_row())
    assert list(read_results(tmp_path / "r.csv")["backend"]) == ["sglang"]


def test_the_plugin_tracks_the_backend_parameter_of_the_running_test():
    item = SimpleNamespace(callspec=SimpleNamespace(params={"backend": "vllm", "kind": "dora"}))
    plugin.pytest_runtest_setup(item)
    assert plugin.RUNNING_BACKEND["name"] == "vllm"
    plugin.pytest_runtest_setup(SimpleNamespace())  # not parametrized: the default backend
    assert plugin.RUNNING_BACKEND["name"] == "sglang"
    plugin.pytest_runtest_setup(SimpleNamespace(callspec=SimpleNamespace(params={"kind": "dora"})))
    assert plugin.RUNNING_BACKEND["name"] == "sglang"


INNER_TEST = '''
from reference_impl.results import ResultRow


def test_writes_a_row(backend, results_writer):
    results_writer.append(ResultRow("conformance", "probe", "cached_tokens", 1.0, params={"wrote": backend}))
'''


def test_a_session_with_both_backends_labels_each_row(tmp_path):
    """End to end, in a child pytest session: `--backend both` runs the test once per backend, and each row names
    the backend its test ran against (the vLLM interpreter is this Python: the probe starts no server)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fixtures.plugin", "-p", "no:cacheprovider",
                           str(tmp_path / "test_inner.py"), "--backend", "both", "--vllm-python", sys.executable,
                           "--results-dir", str(tmp_path / "results"), "--rootdir", str(tmp_path)],
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (csv_path,) = (tmp_path / "results").glob("*.csv")
    df = read_results(csv_path)
    assert sorted(zip(df["backend"], df["params"])) == [("sglang", '{"wrote":"sglang"}'), ("vllm", '{"wrote":"vllm"}')]
