"""Upstream behaviour the conformance suite has to account for, shown on this machine's own packages.

If one of these starts failing, the upstream limitation is gone: drop the matching xfail in suite/conformance.
"""
import socket

import pytest

torch = pytest.importorskip("torch")


def _listening(port):
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                addr, hexport = cols[1].split(":")
                if cols[3] == "0A" and int(hexport, 16) == port:
                    found.append(addr)
    return found


def test_torch_tcpstore_listens_on_all_interfaces_even_for_a_loopback_init_address():
    """SGLang's scheduler runs init_process_group("tcp://127.0.0.1:<nccl port>"); PyTorch's c10d TCPStore
    server binds that port on every interface anyway (IPv6 wildcard, dual stack)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        addresses = _listening(port)
    finally:
        dist.destroy_process_group()
    assert addresses, "the store is not listening at all"
    assert any(set(a) == {"0"} for a in addresses), f"TCPStore now binds {addresses}: loopback only?"
