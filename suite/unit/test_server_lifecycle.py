"""SGLangServer lifecycle with real child processes and sockets; fixtures.fake_sglang stands in for SGLang.

The fake is a test double of SGLang's HTTP API (`python -m fixtures.fake_sglang`), so these tests check our
process handling (argv, env, own process group, bounded waits, TERM->KILL, loopback-only bind), never SGLang.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.fake_sglang import READY_LINE
from reference_impl.client import SamplingParams
from reference_impl.procs import PortInUseError, pick_free_port, pids_in_group
from reference_impl.server import (ATTENTION_ONLY, LoraPoolConfig, SGLangServer, ServerConfig,
                                   ServerStartError)
from suite.unit.adapters_for_tests import make_adapter


@pytest.fixture(scope="module")
def bystander():
    """An unrelated process in its own group: it must survive every stop (we never kill by name)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # our own group, by id
    proc.wait(timeout=5)


@pytest.fixture(autouse=True)
def bystander_survives(bystander):
    yield
    assert bystander.poll() is None, "an unrelated process was killed"


def make_config(tmp_path: Path, fake_model_dir: str, **kw) -> ServerConfig:
    kw.setdefault("startup_timeout_s", 20)
    return ServerConfig(python=sys.executable, model_path=fake_model_dir, launch_module="fixtures.fake_sglang",
                        log_dir=tmp_path / "logs", **kw)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listen_addresses(port: int) -> list[str]:
    """Local addresses in LISTEN state on `port`, from /proc/net/tcp and tcp6 (hex as the kernel writes it)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.append(addr)
    return found


def non_loopback_ipv4() -> list[str]:
    addrs = set()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.254", 9))  # no packet is sent; picks the outgoing interface's address
            addrs.add(s.getsockname()[0])
    except OSError:
        pass
    try:
        addrs.update(ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    except OSError:
        pass
    return sorted(a for a in addrs if not a.startswith("127.") and a != "0.0.0.0")


# -- pure config ---------------------------------------------------------------------------------------
def test_argv_and_child_env(tmp_path, fake_model_dir):
    lora = LoraPoolConfig(max_rank=16, target_modules=ATTENTION_ONLY, max_loaded_loras=4,
                          startup_adapters={"policy-v1": "/adapters/v1"})
    cfg = make_config(tmp_path, fake_model_dir, gpu_ids="1,2", lora=lora, cuda_graphs=False, memory_saver=True,
                      extra_args=["--log-level", "debug"], extra_env={"EXTRA": "x"})
    argv = cfg.argv(23456)
    assert argv[:3] == [sys.executable, "-m", "fixtures.fake_sglang"]

    def after(flag, n=1):
        i = argv.index(flag)
        return argv[i + 1] if n == 1 else argv[i + 1:i + 1 + n]

    assert after("--model-path") == fake_model_dir
    assert after("--host") == "127.0.0.1" and after("--port") == "23456"
    assert after("--attention-backend") == "triton" and after("--sampling-backend") == "pytorch"
    assert "--enable-lora" in argv and after("--max-lora-rank") == "16"
    assert after("--lora-target-modules", 4) == list(ATTENTION_ONLY)
    assert after("--max-loaded-loras") == "4" and after("--lora-paths") == "policy-v1=/adapters/v1"
    assert after("--cuda-graph-backend-decode") == "disabled" and after("--cuda-graph-backend-prefill") == "disabled"
    assert "--enable-memory-saver" in argv and argv[-2:] == ["--log-level", "debug"]
    assert "--disable-radix-cache" not in argv
    decode_only = make_config(tmp_path, fake_model_dir, prefill_cuda_graphs=False).argv(23456)
    assert "--cuda-graph-backend-decode" not in decode_only
    assert decode_only[decode_only.index("--cuda-graph-backend-prefill") + 1] == "disabled"
    assert "--cuda-graph-backend-prefill" not in make_config(tmp_path, fake_model_dir).argv(23456)
    capped = make_config(tmp_path, fake_model_dir, cuda_graph_max_bs=32).argv(23456)
    assert capped[capped.index("--cuda-graph-max-bs-decode") + 1] == "32"
    assert "--cuda-graph-max-bs-decode" not in cfg.argv(23456)  # no graphs, nothing to cap

    env = cfg.child_env({"PYTHONPATH": "/trainer/src", "VIRTUAL_ENV": "/trainer/.venv", "PATH": "/usr/bin",
                         "CUDA_VISIBLE_DEVICES": "0", "KEEP": "1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env["KEEP"] == "1" and env["EXTRA"] == "x"
    # rank 0 of a DDP trainer starts the server: torchrun's variables stay with the trainer
    ddp = cfg.child_env({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_PORT": "29511",
                         "TORCHELASTIC_RUN_ID": "x", "SPLITRL_DDP_WORKER": "1", "KEEP": "1"})
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SPLITRL_DDP_WORKER"} & set(ddp)
    assert ddp["KEEP"] == "1"
    # collectives of a TP server bootstrap on loopback; an interface the user named wins
    assert env["NCCL_SOCKET_IFNAME"] == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert cfg.child_env({"NCCL_SOCKET_IFNAME": "eth1"})["NCCL_SOCKET_IFNAME"] == "eth1"


# -- real child processes ------------------------------------------------------------------------------
def test_normal_start_stop_loopback_only(tmp_path, fake_model_dir):
    srv = SGLangServer(make_config(tmp_path, fake_model_dir))
    try:
        srv.start()
        assert srv.client.health() and srv.client.models() == [fake_model_dir]
        pid, port = srv.pid, srv.port
        assert 20000 <= port <= 50000
        assert READY_LINE in srv.log_path.read_text()
        assert listen_addresses(port) == ["0100007F"]  # 127.0.0.1, nothing on 0.0.0.0 or ::
        for ip in non_loopback_ipv4():
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2)
                s.connect((ip, port))
        assert pids_in_group(pid) == [pid]
    finally:
        how = srv.stop(term_timeout_s=10)
    assert how == "term"
    assert pids_in_group(pid) == [] and not alive(pid)
    assert listen_addresses(port) == []
    assert srv.stop() == "gone"  # idempotent


def test_exit_at_start_fails_fast_with_log_tail(tmp_path, fake_model_dir):
    srv = SGLangServer(make_config(tmp_path, fake_model_dir, startup_timeout_s=60,
                                   extra_env={"FAKE_SGLANG_MODE": "exit_at_start"}))
    t0 = time.monotonic()
    try:
        with pytest.raises(ServerStartError) as ei:
            srv.start()
    finally:
        srv.stop(term_timeout_s=5)
    assert time.monotonic() - t0 < 15
    assert "fake startup failure" in str(ei.value) and "exited with code 3" in str(ei.value)
    assert pids_in_group(srv.pid) == []


def test_never_healthy_times_out_and_cleans_up(tmp_path, fake_model_dir):
    srv = SGLangServer(make_config(tmp_path, fake_model_dir, startup_timeout_s=1.5,
                                   extra_env={"FAKE_SGLANG_MODE": "slow_start", "FAKE_SGLANG_START_DELAY": "1000"}))
    t0 = time.monotonic()
    try:
        with pytest.raises(ServerStartError, match="not healthy"):
            srv.start()
    finally:
        srv.stop(term_timeout_s=5)
    assert time.monotonic() - t0 < 20
    assert pids_in_group(srv.pid) == [] and not alive(srv.pid)


def test_busy_port_is_refused_before_launch(tmp_path, fake_model_dir):
    port = pick_free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen(1)
        srv = SGLangServer(make_config(tmp_path, fake_model_dir, port=port))
        with pytest.raises(PortInUseError, match=str(port)):
            srv.start()
        assert srv.process is None
    assert not (tmp_path / "logs").exists()


def test_missing_interpreter(tmp_path, fake_model_dir):
    cfg = make_config(tmp_path, fake_model_dir)
    cfg.python = str(tmp_path / "no-venv" / "bin" / "python")
    srv = SGLangServer(cfg)
    with pytest.raises(ServerStartError, match="splitrl env create"):
        srv.start()
    assert srv.process is None


def test_term_ignored_escalates_to_kill(tmp_path, fake_model_dir):
    srv = SGLangServer(make_config(tmp_path, fake_model_dir, extra_env={"FAKE_SGLANG_MODE": "ignore_term"}))
    try:
        srv.start()
        pid = srv.pid
        t0 = time.monotonic()
    finally:
        how = srv.stop(term_timeout_s=1)
    assert how == "kill" and time.monotonic() - t0 < 10
    assert pids_in_group(pid) == [] and not alive(pid)


def test_stop_kills_grandchildren(tmp_path, fake_model_dir):
    srv = SGLangServer(make_config(tmp_path, fake_model_dir, extra_env={"FAKE_SGLANG_MODE": "spawn_child"}))
    try:
        srv.start()
        pid = srv.pid
        group = pids_in_group(pid)
        grandchildren = [p for p in group if p != pid]
        assert pid in group and len(grandchildren) == 1
        assert f"spawned child pid {grandchildren[0]}" in srv.log_path.read_text()
    finally:
        how = srv.stop(term_timeout_s=10)
    assert how == "term"
    assert pids_in_group(pid) == [] and not any(alive(p) for p in group)


def test_restart_with_startup_adapter(tmp_path, fake_model_dir):
    path = make_adapter(tmp_path / "v1", r=8)
    srv = SGLangServer(make_config(tmp_path, fake_model_dir, lora=LoraPoolConfig(max_rank=16,
                                                                             target_modules=ATTENTION_ONLY)))
    try:
        srv.start()
        old_pid = srv.pid
        assert srv.client.models() == [fake_model_dir]
        seconds = srv.restart(lora=LoraPoolConfig(max_rank=16, target_modules=ATTENTION_ONLY,
                                                  startup_adapters={"policy-v1": path}))
        assert 0 < seconds < 20
        assert srv.pid != old_pid and pids_in_group(old_pid) == [] and not alive(old_pid)
        assert srv.client.models() == [fake_model_dir, "policy-v1"]
        res = srv.client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True), lora="policy-v1")
        assert res[0].completion_tokens == 2
    finally:
        srv.stop(term_timeout_s=10)
    assert pids_in_group(srv.pid) == []


def test_pool_early_starts_run_one_after_another_and_get_waits_for_them(tmp_path, fake_model_dir):
    """Two early configs: the second is launched only once the first is healthy (side-by-side launches starve
    each other's KV pool on one GPU); get() returns the server started early, once."""
    from fixtures.gpu import ServerPool

    events = []

    class Recording(SGLangServer):
        def start(self):
            events.append(("launch", self.config.mem_fraction_static))
            super().start()
            events.append(("ready", self.config.mem_fraction_static))
            return self

    pool = ServerPool(make_config(tmp_path, fake_model_dir, extra_env={"FAKE_SGLANG_MODE": "slow_start",
                                                                      "FAKE_SGLANG_START_DELAY": "1.5"}), Recording)
    try:
        pool.prelaunch()
        pool.prelaunch(mem_fraction_static=0.15)
        pool.prelaunch(mem_fraction_static=0.15)  # once per config
        assert len(pool._early) == 2
        second = pool.get(mem_fraction_static=0.15)
        first = pool.get()
        assert second.client.health() and first.client.health() and first.port != second.port
        base = first.config.mem_fraction_static
        assert events == [("launch", base), ("ready", base), ("launch", 0.15), ("ready", 0.15)], events
        assert pool.get(mem_fraction_static=0.15) is second and len(pool.servers) == 2  # no second launch
    finally:
        pool.close()
    assert pids_in_group(first.pid) == [] and pids_in_group(second.pid) == []


def test_pool_get_raises_the_early_start_failure_then_starts_fresh(tmp_path, fake_model_dir):
    from fixtures.gpu import ServerPool

    pool = ServerPool(make_config(tmp_path, fake_model_dir, extra_env={"FAKE_SGLANG_MODE": "exit_at_start"}))
    try:
        pool.prelaunch()
        with pytest.raises(ServerStartError, match="fake startup failure"):
            pool.get()
        assert pool.servers == {} and pool._early == {}  # forgotten: a later get() starts anew
        pool.base = make_config(tmp_path, fake_model_dir)
        assert pool.get().client.health()
    finally:
        pool.close()


def test_pool_close_stops_a_server_still_starting(tmp_path, fake_model_dir):
    from fixtures.gpu import ServerPool

    pool = ServerPool(make_config(tmp_path, fake_model_dir, startup_timeout_s=120,
                                  extra_env={"FAKE_SGLANG_MODE": "slow_start", "FAKE_SGLANG_START_DELAY": "1000"}))
    pool.prelaunch()
    srv, _ = next(iter(pool._early.values()))
    deadline = time.monotonic() + 10
    while (srv.process is None or srv.process.proc is None) and time.monotonic() < deadline:  # child spawned
        time.sleep(0.05)
    pid = srv.pid
    t0 = time.monotonic()
    pool.close()
    assert time.monotonic() - t0 < 30 and pids_in_group(pid) == [] and not alive(pid)


def test_early_launch_only_for_servers_that_running_gpu_tests_use():
    from fixtures.gpu import PLAIN_SERVER, early_server_overrides

    class Item:
        def __init__(self, names, *markers):
            self.fixturenames, self.markers = names, set(markers)

        def get_closest_marker(self, name):
            return name if name in self.markers else None

    cpu = Item(["lora_server"])  # no gpu marker: never launches a server
    skipped = Item(["plain_server"], "gpu", "skip")
    assert early_server_overrides([cpu, skipped]) == []
    assert early_server_overrides([cpu, Item(["lora_server"], "gpu")]) == [{}]
    assert early_server_overrides([Item(["plain_server", "lora_server"], "gpu")]) == [{}, PLAIN_SERVER]


def test_bystander_still_alive(bystander):
    assert bystander.poll() is None and alive(bystander.pid)
