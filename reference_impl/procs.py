"""Child processes that we own: own process group, log file, bounded waits, TERM->KILL of our group only.

Nothing here ever kills by name (the seed benchmark's `pkill -f sglang.launch_server` killed other users'
servers): only the process group this module created is signalled.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# SGLang derives more ports from --port (a gRPC port at +10000); a port above 55535 makes it fail at start.
PORT_RANGE = (20000, 50000)
DERIVED_PORT_OFFSETS = (0, 1, 2, 10000)


class PortInUseError(RuntimeError):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(host: str = "127.0.0.1", attempts: int = 200, rng: random.Random | None = None) -> int:
    """A port in PORT_RANGE whose derived ports are free too (bounded number of attempts)."""
    rng = rng or random.Random()
    for _ in range(attempts):
        port = rng.randint(*PORT_RANGE)
        if all(port_is_free(port + off, host) for off in DERIVED_PORT_OFFSETS):
            return port
    raise PortInUseError(f"no free port found in {PORT_RANGE} after {attempts} attempts")


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    busy = [port + off for off in DERIVED_PORT_OFFSETS if not port_is_free(port + off, host)]
    if busy:
        raise PortInUseError(f"port {port} cannot be used: {busy} already in use on {host} "
                             "(leave the port unset to pick a free one)")


def pids_in_group(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid`, read from /proc (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm may contain spaces/parens: fields after the last ')' are fixed
        fields = stat.rsplit(")", 1)[1].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            found.append(int(entry))
    return found


def log_tail(path: Path | str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"<no log: {e}>"


@dataclass
class ManagedProcess:
    """A child started in its own session/process group with stdout+stderr to `log_path`."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: str | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)
    # once our group is seen empty its id may be reused by someone else's group: never signal it again
    reaped: bool = field(default=False, init=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "process not started"
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, term_timeout_s: float = 30.0, kill_timeout_s: float = 10.0) -> str:
        """TERM our group, wait, KILL what is left of it; returns 'term', 'kill' or 'gone'."""
        if self.proc is None or self.reaped:
            return "gone"
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        how = "gone"
        if self.proc.poll() is None or pids_in_group(pgid):
            how = "term"
            _signal_group(pgid, signal.SIGTERM)
            if not _wait_group_gone(self.proc, pgid, term_timeout_s):
                how = "kill"
                _signal_group(pgid, signal.SIGKILL)
                _wait_group_gone(self.proc, pgid, kill_timeout_s)
        leftover = pids_in_group(pgid)
        if leftover:
            raise RuntimeError(f"processes of group {pgid} still alive after SIGKILL: {leftover}")
        self.reaped = True
        return how


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(proc: subprocess.Popen, pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if not pids_in_group(pgid):
            return True
        time.sleep(0.1)
    proc.poll()
    return not pids_in_group(pgid)
