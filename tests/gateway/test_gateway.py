"""The gateway on loopback: routing, allowlists, PROXY v2 to the platform, faults, counters, reload.

Loopback is 127.0.0.0/8, so a client can come from 127.0.0.5 (a "compute node") while the
gateway reaches the platform from 127.0.0.1: enough to tell the addresses apart without
namespaces (tests/gateway/test_three_sites.py does it across real network namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from medbridge import outage
from medbridge.gateway import proxy
from medbridge.gateway.config import parse
from medbridge.gateway.server import Gateway
from medbridge.testing import RunningPlatform
from medbridge.testing.wait import HANG, Lines, until
from tests.conftest import CHEST

NODE, OTHER_NODE = "127.0.0.5", "127.0.0.6"


def config(*routes: tuple[str, list[str], str, bool], metrics: bool = False) -> str:
    text = ""
    for name, backends, allow, proxied in routes:
        quoted = ", ".join(f'"{b}"' for b in backends)
        cidrs = ", ".join(f'"{a}"' for a in allow.split(","))
        text += (
            f'[[route]]\nname = "{name}"\nlisten = "127.0.0.1:0"\nbackends = [{quoted}]\n'
            f"allow = [{cidrs}]\nproxy_protocol = {str(proxied).lower()}\nconnect_timeout = 2\n"
        )
    if metrics:
        text += '[metrics]\nlisten = "127.0.0.1:0"\n'
    return text


@pytest.fixture
def bound_platform(tmp_path: Path) -> Iterator[RunningPlatform]:
    """Trusts PROXY from 127.0.0.1 (the gateway) and binds certificates to the compute node."""
    p = RunningPlatform(
        tmp_path,
        enforcement_interval=0.25,
        trusted_proxies=["127.0.0.1/32"],
        certificate_source_addresses=[f"{NODE}/32"],
    )
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    with p:
        yield p


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    yield gw
    gw.stop()


async def read_via(p: RunningPlatform, port: int, source: str) -> bytes:
    """Everything through the gateway, as from a compute node: certificate, then data from ``source``."""
    key, cred = await p.credential("alice", port=port)
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        username="alice",
        client_keys=[(key, cred.certificate)],
        known_hosts=None,
        local_addr=(source, 0),
        config=None,
    ) as conn:
        sftp = await conn.start_sftp_client()
        async with sftp.open("/datasets/chest/scan-002.bin", "rb") as f:
            return await f.read()


def test_job_reads_through_the_gateway_and_the_audit_shows_the_node(
    bound_platform: RunningPlatform, gateway: Gateway
) -> None:
    gateway.apply(parse(config(("prod", [bound_platform.address], "127.0.0.0/29", True))))
    port = gateway.port("prod")
    assert asyncio.run(read_via(bound_platform, port, NODE)) == CHEST["scan-002.bin"]
    login = [r for r in bound_platform.audit("login") if r.subject == "certificate"][-1]
    assert f'"peer":"{NODE}:' in login.detail and '"via":"127.0.0.1:' in login.detail
    m = gateway.metrics
    assert m.value("medbridge_gateway_connections_total", route="prod", outcome="accepted") >= 1
    assert m.value("medbridge_gateway_bytes_total", route="prod", direction="down") > len(CHEST["scan-002.bin"])


def test_certificate_bound_to_compute_nodes_fails_from_another_address(
    bound_platform: RunningPlatform, gateway: Gateway
) -> None:
    gateway.apply(parse(config(("prod", [bound_platform.address], "127.0.0.0/29", True))))
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(read_via(bound_platform, gateway.port("prod"), OTHER_NODE))
    cert = bound_platform.store.certificates("alice")[-1]
    assert cert.key_id.startswith("medbridge:user=alice")
    refused = [
        r for r in bound_platform.audit("login", until=lambda r: r.outcome == "refused") if r.outcome == "refused"
    ][-1]
    assert f'"peer":"{OTHER_NODE}:' in refused.detail


def test_node_outside_the_allow_list_is_refused_and_counted(bound_platform: RunningPlatform, gateway: Gateway) -> None:
    gateway.apply(parse(config(("prod", [bound_platform.address], f"127.0.0.1/32,{NODE}/32", True))))
    with pytest.raises((asyncssh.Error, OSError)):
        asyncio.run(read_via(bound_platform, gateway.port("prod"), OTHER_NODE))
    assert gateway.metrics.value("medbridge_gateway_connections_total", route="prod", outcome="refused_source") == 1


def test_two_routes_reach_two_backends(tmp_path: Path, gateway: Gateway) -> None:
    prod = RunningPlatform(tmp_path / "prod")
    exp = RunningPlatform(tmp_path / "exp")
    for p, data in ((prod, b"production"), (exp, b"experimental")):
        p.add_user("alice")
        p.add_dataset("which", {"server.txt": data})
        p.grant("alice", "which")
    with prod, exp:
        gateway.apply(
            parse(config(("prod", [prod.address], "127.0.0.0/8", False), ("exp", [exp.address], "127.0.0.0/8", False)))
        )

        async def fetch(p: RunningPlatform, route: str) -> bytes:
            key, cred = await p.credential("alice")
            async with asyncssh.connect(
                "127.0.0.1",
                gateway.port(route),
                username="alice",
                config=None,
                client_keys=[(key, cred.certificate)],
                known_hosts=None,
            ) as conn:
                sftp = await conn.start_sftp_client()
                async with sftp.open("/datasets/which/server.txt", "rb") as f:
                    return await f.read()

        assert asyncio.run(fetch(prod, "prod")) == b"production"
        assert asyncio.run(fetch(exp, "exp")) == b"experimental"


def closed_by_peer(c: socket.socket) -> bool:
    """The gateway closed on us: an orderly EOF, or a reset because our bytes were never read."""
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


def test_backend_down_is_a_prompt_refusal(gateway: Gateway) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    # A connect timeout far beyond the client's patience: the refusal must not wait for it.
    cfg = config(("prod", [f"127.0.0.1:{dead}"], "127.0.0.0/8", False)).replace(
        "connect_timeout = 2", "connect_timeout = 600"
    )
    gateway.apply(parse(cfg))
    with socket.create_connection(("127.0.0.1", gateway.port("prod")), timeout=HANG) as c:
        c.sendall(b"SSH-2.0-test\r\n")
        assert closed_by_peer(c)
    assert (
        gateway.metrics.value("medbridge_gateway_connections_total", route="prod", outcome="backend_unavailable") == 1
    )


def test_second_backend_takes_over_when_the_first_is_down(bound_platform: RunningPlatform, gateway: Gateway) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    gateway.apply(parse(config(("prod", [f"127.0.0.1:{dead}", bound_platform.address], "127.0.0.0/8", True))))
    for _ in range(3):
        assert asyncio.run(read_via(bound_platform, gateway.port("prod"), NODE)) == CHEST["scan-002.bin"]


def test_garbage_instead_of_ssh_is_dropped_and_counted(bound_platform: RunningPlatform, gateway: Gateway) -> None:
    gateway.apply(parse(config(("prod", [bound_platform.address], "127.0.0.0/8", True))))
    with socket.create_connection(("127.0.0.1", gateway.port("prod")), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert closed_by_peer(c)
    assert gateway.metrics.value("medbridge_gateway_connections_total", route="prod", outcome="protocol_error") == 1


def test_proxy_header_from_an_untrusted_peer_is_refused_and_audited(bound_platform: RunningPlatform) -> None:
    with socket.create_connection(("127.0.0.1", bound_platform.port), timeout=10, source_address=(NODE, 0)) as c:
        c.sendall(proxy.encode(("10.9.9.9", 1234), ("127.0.0.1", 22)))
        c.settimeout(10)
        assert closed_by_peer(c), "refused before any SSH banner"
    refused = bound_platform.audit("proxy.refused")
    assert refused and refused[-1].subject.startswith(f"{NODE}:") and "untrusted" in refused[-1].detail


def test_half_close_delivers_everything(gateway: Gateway) -> None:
    """The client shuts down its sending side; the backend's whole answer still arrives."""
    server = socket.create_server(("127.0.0.1", 0))
    answer = os.urandom(3_000_000)

    def backend() -> None:
        conn, _ = server.accept()
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        conn.sendall(answer + got)
        conn.close()

    t = threading.Thread(target=backend)
    t.start()
    cfg = config(("raw", [f"127.0.0.1:{server.getsockname()[1]}"], "127.0.0.0/8", False))
    gateway.apply(parse(cfg.replace("connect_timeout = 2", "connect_timeout = 2\nrequire_ssh = false")))
    with socket.create_connection(("127.0.0.1", gateway.port("raw")), timeout=10) as c:
        c.sendall(b"question")
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(1 << 16):
            got += chunk
    t.join(timeout=10)
    server.close()
    assert got == answer + b"question"


def test_metrics_endpoint_speaks_prometheus(bound_platform: RunningPlatform, gateway: Gateway) -> None:
    gateway.apply(parse(config(("prod", [bound_platform.address], "127.0.0.0/8", True), metrics=True)))
    asyncio.run(read_via(bound_platform, gateway.port("prod"), NODE))
    assert gateway.metrics_address is not None
    host, port = gateway.metrics_address
    until(lambda: not gateway.open_links, "the gateway to notice the client's close (a moment after it)")
    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    assert 'medbridge_gateway_connections_total{outcome="accepted",route="prod"} 2.0' in body, "issuer + data"
    assert 'medbridge_gateway_bytes_total{direction="down",route="prod"}' in body
    assert 'medbridge_gateway_active_connections{route="prod"} 0.0' in body


def test_sighup_reloads_routes_without_dropping_live_connections(
    bound_platform: RunningPlatform, tmp_path: Path
) -> None:
    cfg = tmp_path / "gateway.toml"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        first = s.getsockname()[1]
    route = (
        f'[[route]]\nname = "prod"\nlisten = "127.0.0.1:{first}"\nbackends = ["{bound_platform.address}"]\n'
        'allow = ["127.0.0.0/8"]\nproxy_protocol = true\n'
    )
    cfg.write_text(route)
    cmd = [sys.executable, "-m", "medbridge", "gateway", "serve", "--config", str(cfg)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as gw:
        assert gw.stdout is not None and gw.stderr is not None
        said = Lines(gw.stderr)
        try:
            assert "route prod listening on 127.0.0.1" in gw.stdout.readline()

            async def story() -> tuple[bytes, bytes]:
                key, cred = await bound_platform.credential("alice", port=first)
                async with asyncssh.connect(
                    "127.0.0.1",
                    first,
                    username="alice",
                    known_hosts=None,
                    config=None,
                    client_keys=[(key, cred.certificate)],
                    local_addr=(NODE, 0),
                ) as conn:
                    sftp = await conn.start_sftp_client()
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        second = s.getsockname()[1]
                    cfg.write_text(route.replace(str(first), str(second)).replace('"prod"', '"prod2"'))
                    gw.send_signal(signal.SIGHUP)
                    await asyncio.to_thread(said.wait_for, "configuration reloaded")
                    async with sftp.open("/datasets/chest/scan-002.bin", "rb") as f:
                        live = await f.read()
                fresh = await read_via(bound_platform, second, NODE)
                return live, fresh

            live, fresh = asyncio.run(story())
            assert live == fresh == CHEST["scan-002.bin"]
            cfg.write_text("[[route]]\nbroken")
            gw.send_signal(signal.SIGHUP)
            said.wait_for("reload refused")
            assert gw.poll() is None, "a bad reload must not stop the gateway"
        finally:
            gw.terminate()
            gw.wait(timeout=HANG)
            err = said.join()
    assert gw.returncode == 0, err


def test_idle_connections_are_closed(gateway: Gateway) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    cfg = config(("raw", [f"127.0.0.1:{server.getsockname()[1]}"], "127.0.0.0/8", False))
    gateway.apply(
        parse(cfg.replace("connect_timeout = 2", "connect_timeout = 2\nrequire_ssh = false\nidle_timeout = 1"))
    )
    try:
        with socket.create_connection(("127.0.0.1", gateway.port("raw")), timeout=10) as c:
            backend, _ = server.accept()
            start = time.monotonic()  # before the last byte through: the idle clock starts after it
            c.sendall(b"hello")
            assert backend.recv(5) == b"hello"
            c.settimeout(HANG)
            assert closed_by_peer(c)
            assert time.monotonic() - start >= 1.0, "not closed before idle_timeout"
            backend.close()
    finally:
        server.close()
    until(lambda: not gateway.open_links, "the gateway to forget the closed link")


def limited(cfg: str, **keys: object) -> str:
    extra = "".join(f"\n{k} = {v}" for k, v in keys.items())
    return cfg.replace("connect_timeout = 2", f"connect_timeout = 2{extra}")


def test_a_stalled_ssh_banner_is_dropped_and_counted(bound_platform: RunningPlatform, gateway: Gateway) -> None:
    """'SSH-' and then nothing: dropped after banner_timeout, never relayed to the platform."""
    gateway.apply(parse(limited(config(("prod", [bound_platform.address], "127.0.0.0/8", True)), banner_timeout=1)))
    m = gateway.metrics
    with socket.create_connection(("127.0.0.1", gateway.port("prod")), timeout=20, source_address=(NODE, 0)) as c:
        c.sendall(b"SSH-")
        until(lambda: m.value("medbridge_gateway_pending_connections", route="prod") == 1, "the banner wait")
        assert closed_by_peer(c)
    assert m.value("medbridge_gateway_connections_total", route="prod", outcome="banner_timeout") == 1
    assert m.value("medbridge_gateway_connections_total", route="prod", outcome="accepted") == 0
    assert m.value("medbridge_gateway_pending_connections", route="prod") == 0


def test_connections_per_source_are_capped_and_counted(bound_platform: RunningPlatform, gateway: Gateway) -> None:
    gateway.apply(parse(limited(config(("prod", [bound_platform.address], "127.0.0.0/8", True)), max_per_source=3)))
    m, port = gateway.metrics, gateway.port("prod")

    def pending() -> float:
        return m.value("medbridge_gateway_pending_connections", route="prod")

    stalled = [socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(NODE, 0)) for _ in range(3)]
    try:
        for s in stalled:
            s.sendall(b"SSH-2.0-")
        until(lambda: pending() == 3, "three connections waiting")
        with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(NODE, 0)) as fourth:
            assert closed_by_peer(fourth)
        assert m.value("medbridge_gateway_connections_total", route="prod", outcome="refused_per_source") == 1
        assert banner_through(port, OTHER_NODE) == b"SSH-", "other sources are served"
    finally:
        for s in stalled:
            s.close()
    until(lambda: pending() == 0, "the stalled connections to end")
    assert asyncio.run(read_via(bound_platform, port, NODE)) == CHEST["scan-002.bin"], "places are given back"


def banner_through(port: int, source: str) -> bytes:
    """Send an SSH identification through the gateway from ``source``; the backend's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0)) as c:
        c.sendall(b"SSH-2.0-test\r\n")
        return c.recv(4)


def test_descriptors_above_1023_are_served(bound_platform: RunningPlatform, gateway: Gateway) -> None:
    """select() fails past descriptor 1023; the gateway must not care which numbers it gets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard descriptor limit ({hard}) leaves no room above 1023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if soft != resource.RLIM_INFINITY else soft, hard))
    filler: list[int] = []
    try:
        while not filler or filler[-1] < 1030:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        gateway.apply(parse(config(("prod", [bound_platform.address], "127.0.0.0/8", True))))
        assert banner_through(gateway.port("prod"), NODE) == b"SSH-", "the platform's banner, through the gateway"
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_descriptor_exhaustion_is_refused_counted_and_survived(tmp_path: Path) -> None:
    """The issue's attack: 200 stalled 'SSH-' connections from allowed nodes against a gateway
    limited to 128 descriptors.  The excess is refused and counted, the stalled ones are dropped,
    and afterwards a job reads through the same route."""
    p = RunningPlatform(tmp_path, trusted_proxies=["127.0.0.1/32"])
    p.add_user("alice")
    p.add_dataset("chest", CHEST)
    p.grant("alice", "chest")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(limited(config(("prod", ["PLATFORM"], "127.0.0.0/8", True), metrics=True), banner_timeout=2))
    with p:
        cfg.write_text(cfg.read_text().replace("PLATFORM", p.address))
        cmd = ["prlimit", "--nofile=128:128", sys.executable, "-m", "medbridge", "gateway", "serve", "--config",
               str(cfg)]  # fmt: skip
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as gw:
            try:
                assert gw.stdout is not None
                port = int(gw.stdout.readline().split(" -> ")[0].rsplit(":", 1)[1])
                metrics_url = gw.stdout.readline().split()[-1]
                flood = [  # from 200 nodes: one source alone is held to its share of the descriptors
                    socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(f"127.0.1.{i}", 0))
                    for i in range(1, 201)
                ]
                try:
                    for s in flood:
                        with contextlib.suppress(OSError):  # refused ones may already be closed
                            s.sendall(b"SSH-")
                    assert all(closed_by_peer(s) for s in flood), "every stalled connection is dropped"
                finally:
                    for s in flood:
                        s.close()
                assert asyncio.run(asyncio.wait_for(read_via(p, port, NODE), 60)) == CHEST["scan-002.bin"]
                body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
            finally:
                gw.terminate()
                _, err = gw.communicate(timeout=20)
    counts = {
        outcome: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        for outcome in ("refused_descriptors", "banner_timeout", "accepted")
        if line.startswith(f'medbridge_gateway_connections_total{{outcome="{outcome}",route="prod"}}')
    }
    assert counts.get("refused_descriptors", 0) > 0, body
    assert counts.get("banner_timeout", 0) > 0, body
    assert counts["refused_descriptors"] + counts["banner_timeout"] == 200
    assert counts["accepted"] == 2, "issuer and data connections of the job"
    assert 'medbridge_gateway_accept_errors_total{error="EMFILE",route="prod"}' in body
    assert "out of descriptors (EMFILE)" in err


def metric_samples(body: str, name: str) -> dict[str, float]:
    """``name``'s samples in a Prometheus text body, by their label text."""
    return {
        line.split("{", 1)[1].split("}", 1)[0] if "{" in line else "": float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith((name + "{", name + " "))
    }


def test_one_source_cannot_take_the_descriptors_of_the_others(tmp_path: Path) -> None:
    """The review's attack (g2): full SSH banners from one node, then silence, each held relayed.

    Under 256 descriptors a relayed connection's six would let ~40 of them exhaust the
    gateway whatever max_per_source (256) says; the node is held to its share instead
    (a quarter of the limit past the gateway's own), and another node is still relayed.
    """
    backend = socket.create_server(("127.0.0.1", 0), backlog=512)
    held: list[socket.socket] = []

    def serve_backend() -> None:
        while True:
            try:
                conn, _ = backend.accept()
            except OSError:  # closed: the test is over
                return
            conn.sendall(b"SSH-2.0-backend\r\n")
            held.append(conn)

    threading.Thread(target=serve_backend, daemon=True).start()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(config(("prod", [f"127.0.0.1:{backend.getsockname()[1]}"], "127.0.0.0/8", False), metrics=True))
    cmd = ["prlimit", "--nofile=256:256", sys.executable, "-m", "medbridge", "gateway", "serve", "--config", str(cfg)]
    flood: list[socket.socket] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as gw:
        try:
            assert gw.stdout is not None and gw.stderr is not None
            port = int(gw.stdout.readline().split(" -> ")[0].rsplit(":", 1)[1])
            metrics_url = gw.stdout.readline().split()[-1]
            errors = Lines(gw.stderr)

            def body() -> str:
                return str(urllib.request.urlopen(metrics_url, timeout=HANG).read().decode())

            for _ in range(60):
                c = socket.create_connection(("127.0.0.1", port), timeout=HANG, source_address=(NODE, 0))
                c.sendall(b"SSH-2.0-stall\r\n")
                flood.append(c)

            def settled() -> dict[str, float] | None:
                counts = metric_samples(body(), "medbridge_gateway_connections_total")
                return counts if sum(counts.values()) >= 60 else None

            counts = until(settled, "the gateway to relay or refuse all 60 connections")
            assert banner_through(port, OTHER_NODE) == b"SSH-", "another node is relayed"
            cap = (256 - 32) // (6 * 4)
            assert counts.get('outcome="accepted",route="prod"') == cap, counts
            assert counts.get('outcome="refused_per_source",route="prod"') == 60 - cap, counts
            assert metric_samples(body(), "medbridge_gateway_max_per_source") == {"": cap}
            assert len(os.listdir(f"/proc/{gw.pid}/fd")) < 256
            assert f"at most {cap:.0f} connections per source, not max_per_source = 256" in errors.wait_for(
                "connections per source"
            )
        finally:
            for c in flood:
                c.close()
            backend.close()
            for c in held:
                c.close()
            gw.terminate()
            gw.wait(timeout=HANG)


@pytest.mark.parametrize(("retries", "warned"), [(15, True), (38, False)])
def test_a_kernel_that_would_drop_a_silent_link_before_idle_timeout_is_named_at_start(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    retries: int, warned: bool,
) -> None:  # fmt: skip
    """``tcp_retries2`` read from a file of the test's: setting the machine's own is not a test's to do."""
    setting = tmp_path / "tcp_retries2"
    setting.write_text(f"{retries}\n")
    monkeypatch.setattr(outage, "RETRIES2", setting)
    with caplog.at_level(logging.WARNING, logger="medbridge.gateway"):
        gateway.apply(parse(config(("prod", ["127.0.0.1:9"], "127.0.0.0/8", False))))
    said = [r.getMessage() for r in caplog.records if "tcp_retries2" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "route prod: idle_timeout is 3600 s" in said[0] and "tcp_retries2=38" in said[0]
