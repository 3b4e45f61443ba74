"""The lifecycle every inference server of the suite shares (SGLang, vLLM), modelled on vLLM's tests/utils.py.

Free port in 20000-50000, 127.0.0.1 only, the child's environment set before it starts, own process group,
log file, bounded /health wait that fails fast when the process exits (the error carries the log tail),
stop() = TERM then KILL of its own group only, restart(**changes). A subclass names the server, builds its
client and makes its config's paths absolute; its config provides python, argv(port), child_env(), log_dir,
port and startup_timeout_s.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from .procs import ManagedProcess, check_port_free, log_tail, pick_free_port


class ServerStartError(RuntimeError):
    pass


class ManagedServer:
    name = "server"           # in messages and log file names
    interpreter_hint = ""     # what to do when the interpreter is missing

    def __init__(self, config):
        self.config = self.absolute_paths(config)
        self.port: int | None = None
        self.process: ManagedProcess | None = None
        self.start_s: float | None = None
        self.stopped_by: str | None = None
        self._client = None

    # -- what a subclass provides ------------------------------------------------------------------------
    def make_client(self, url: str, timeout_s: float | None = None):
        raise NotImplementedError

    @staticmethod
    def absolute_paths(config):
        return config

    # -- shared ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self):
        """One client (one HTTP session, reused connections) per port the server has had."""
        if self._client is None or self._client.base_url != self.url:
            self._client = self.make_client(self.url)
        return self._client

    @property
    def pid(self) -> int:
        assert self.process is not None, "server not started"
        return self.process.pid

    @property
    def log_path(self) -> Path:
        assert self.process is not None, "server not started"
        return self.process.log_path

    def start(self):
        python = self.config.python
        if not python or not os.access(python, os.X_OK):
            raise ServerStartError(f"{self.name} interpreter {python!r} does not exist or is not executable: "
                                   f"{self.interpreter_hint}")
        if self.config.port is not None:
            check_port_free(self.config.port)  # a user-chosen busy port is an error, not a silent retry
        for attempt in range(3):
            self.port = self.config.port or pick_free_port()
            try:
                self._launch_and_wait()
                return self
            except ServerStartError as e:
                # a port taken between our check and the child's bind: retry on a new one (auto ports only)
                if self.config.port is None and "address already in use" in str(e).lower() and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")

    def _launch_and_wait(self) -> None:
        cfg = self.config
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log_path = Path(cfg.log_dir) / f"{self.name.lower()}-{stamp}-{self.port}.log"
        self.process = ManagedProcess(cfg.argv(self.port), cfg.child_env(), log_path, cwd=str(Path(cfg.log_dir)))
        t0 = time.monotonic()
        try:
            self.process.start()
        except OSError as e:
            raise ServerStartError(f"cannot launch {cfg.python}: {e}") from e
        try:
            self._wait_healthy(t0 + cfg.startup_timeout_s)
        except BaseException:
            self.process.stop(term_timeout_s=10)
            raise
        self.start_s = time.monotonic() - t0

    def _wait_healthy(self, deadline: float) -> None:
        client = self.make_client(self.url, timeout_s=10)
        while True:
            rc = self.process.exited()
            if rc is not None:
                raise ServerStartError(f"{self.name} exited with code {rc} before it became healthy "
                                       f"(log {self.process.log_path}):\n{log_tail(self.process.log_path)}")
            if client.health(timeout_s=max(1.0, min(10.0, deadline - time.monotonic()))):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(f"{self.name} not healthy after {self.config.startup_timeout_s:.0f}s "
                                       f"(log {self.process.log_path}):\n{log_tail(self.process.log_path)}")
            time.sleep(0.5)

    def stop(self, term_timeout_s: float = 30.0) -> str:
        if self.process is None:
            return "gone"
        self.stopped_by = self.process.stop(term_timeout_s=term_timeout_s)
        return self.stopped_by

    def restart(self, **changes) -> float:
        """Stop, apply config changes (e.g. new startup adapters), start; returns seconds."""
        t0 = time.monotonic()
        self.stop()
        self.config = self.absolute_paths(dataclasses.replace(self.config, **changes))
        self.start()
        return time.monotonic() - t0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
