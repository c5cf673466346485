"""The rendezvous of a process group of Ray actors (kscale.executors.ray_group), without Ray: what each rank's
environment says, as torchrun would set it."""

from __future__ import annotations

import socket

from kscale.executors.ray_group import Placement, rank_env, rendezvous


def _places(*nodes: tuple[str, str]) -> list[Placement]:
    return [Placement(node_id=n, node_ip=ip, pid=100 + i, host=f"h{n}") for i, (n, ip) in enumerate(nodes)]


def test_one_node_meets_on_loopback_many_nodes_at_rank_0s_node() -> None:
    assert rendezvous(_places(("a", "10.0.0.1"), ("a", "10.0.0.1"))) == ("127.0.0.1", True)
    # the rank-0 actor's node, not the first node listed by Ray nor the driver's
    assert rendezvous(_places(("b", "10.0.0.2"), ("a", "10.0.0.1"), ("a", "10.0.0.1"))) == ("10.0.0.2", False)


def test_each_rank_gets_its_own_rank_and_the_same_rendezvous(monkeypatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    places = _places(("a", "10.0.0.1"), ("b", "10.0.0.2"), ("b", "10.0.0.2"))
    envs = rank_env(places, "10.0.0.1", 29500, one_node=False)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    for e in envs:
        assert (e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) == ("3", "10.0.0.1", "29500")
        assert e["LOCAL_RANK"] == "0"  # an actor sees only its own GPUs: cuda:0 is its device
        assert "GLOO_SOCKET_IFNAME" not in e  # across nodes gloo needs a routable interface
    local = rank_env(places[:2], "127.0.0.1", 29500, one_node=True)
    if "lo" in dict(socket.if_nameindex()).values():
        assert all(e["GLOO_SOCKET_IFNAME"] == "lo" for e in local)  # gloo's own sockets on loopback too
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")  # the user's choice is kept (the actor inherits it)
    assert all("GLOO_SOCKET_IFNAME" not in e for e in rank_env(places[:2], "127.0.0.1", 29500, one_node=True))


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                out.add(addr)
    return out


def test_the_rendezvous_store_listens_on_its_address_only_and_serves_client_ranks(monkeypatch) -> None:
    """Left to ``init_process_group`` rank 0 serves the store on every interface; served by ``serve_store`` it
    listens on 127.0.0.1 alone, and a rank that joins it as torchrun's workers do (a client) reads its keys."""
    import datetime

    import torch.distributed as dist

    from kscale.executors.ray_group import serve_store

    store, port = serve_store("127.0.0.1")
    try:
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, and no 0.0.0.0 / :: socket on that port
        store.set("k", "v")
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
        assert client.get("k") == b"v"
        env = rank_env(_places(("a", "10.0.0.1"), ("a", "10.0.0.1")), "127.0.0.1", port, one_node=True)
        assert all(e["TORCHELASTIC_USE_AGENT_STORE"] == "True" for e in env)  # init_process_group: a client
    finally:
        del store
