"""--failures-now prints a failure's traceback when it happens, so a GPU run cut off by the machine's time
limit (the summary never printed) still says why each test failed."""
import os
import subprocess
import sys
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
