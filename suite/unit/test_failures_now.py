"""Runs cut off by a time limit: --failures-now prints a failure's traceback when it happens (the summary never
prints), and a SIGTERM still tears the session down, so no server outlives the run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAILING = '''
def test_fails():
    assert 1 == 2, "boom-marker"

def test_hangs_after():
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)  # the run dies here, as under `timeout`: no summary is printed
'''


def _run(tmp_path, *flags):
    (tmp_path / "test_cut.py").write_text(FAILING)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fixtures.plugin",
                           *flags, str(tmp_path / "test_cut.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_failure_reason_survives_a_run_that_is_cut_off(tmp_path):
    out = _run(tmp_path, "--failures-now")
    assert out.returncode != 0 and "short test summary" not in out.stdout
    assert "FAILED" in out.stdout and "boom-marker" in out.stdout


def test_without_the_flag_the_reason_is_lost(tmp_path):
    out = _run(tmp_path)
    assert "boom-marker" not in out.stdout


SESSION_WITH_A_CHILD = '''
import os, subprocess, sys, time
import pytest

@pytest.fixture(scope="session")
def server():
    # a stand-in for a server: its own process group, stopped by the finaliser through its own pid
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    open("child.pid", "w").write(str(child.pid))
    yield child
    child.terminate()
    child.wait(10)
    open("torn-down", "w").write("yes")

def test_long(server):
    open("started", "w").write("yes")
    time.sleep(120)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_tears_the_session_down_and_stops_its_children(tmp_path):
    (tmp_path / "test_term.py").write_text(SESSION_WITH_A_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fixtures.plugin",
                            str(tmp_path / "test_term.py")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "started").exists(), "the test never started"
        child = int((tmp_path / "child.pid").read_text())
        run.send_signal(signal.SIGTERM)  # what `timeout` sends
        out, _ = run.communicate(timeout=60)
        assert (tmp_path / "torn-down").exists(), f"no teardown after SIGTERM:\n{out}"
        assert not _alive(child), "the session's child outlived the run"
    finally:
        if run.poll() is None:
            run.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
