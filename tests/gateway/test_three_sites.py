"""Three sites in real network namespaces: a job at ``hpc`` reads via ``gw`` from ``platform``.

The platform and the gateway run as processes inside their namespaces; jobs run in
``hpc`` under ``medbridge job run``.  Addresses exist only inside the namespaces this
module creates, and everything is removed at the end (see medbridge.testing.netns).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medbridge.config import Home
from medbridge.control.audit import Record
from medbridge.testing import RunningPlatform
from medbridge.testing.netns import Sites, available
from medbridge.testing.wait import until
from tests.conftest import CHEST

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no network namespaces here: {available()}")

PROD, EXP, SLOW, OUTSIDER_OCTET = 2201, 2202, 2203, 9


@dataclass
class World:
    sites: Sites
    prod: RunningPlatform
    exp_home: Home
    fingerprint: str
    exp_fingerprint: str
    root: Path

    @property
    def outsider(self) -> str:
        return f"10.{self.sites.net}.1.{OUTSIDER_OCTET}"


def _wait_line(proc: subprocess.Popen[bytes], words: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert words in line, line
    return line


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="medbridge-3sites-", dir="/var/tmp"))
    sites = Sites()
    sites.start()
    try:
        node_only = f"{sites.node}/32"
        prod = RunningPlatform(
            root / "prod",
            enforcement_interval=0.25,
            certificate_source_addresses=[node_only],
            trusted_proxies=[f"{sites.gw_platform_side}/32"],
        )
        prod.add_user("alice")
        prod.add_dataset("chest", CHEST)
        prod.grant("alice", "chest")
        exp = RunningPlatform(root / "exp", trusted_proxies=[f"{sites.gw_platform_side}/32"])
        exp.add_user("alice")
        exp.add_dataset("which", {"server.txt": b"experimental"})
        exp.grant("alice", "which")
        fps = []
        for home, port in ((prod.home, 2222), (exp.home, 2223)):
            proc = sites.popen("platform", [sys.executable, "-m", "medbridge", "platform", "serve", "--home",
                                            str(home.root), "--listen", f"{sites.platform}:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
            fps.append(_wait_line(proc, "listening on").split("host key ")[1].split()[0])
        relay = sites.popen("gw", [sys.executable, "-m", "medbridge.testing.delay", "--listen",
                                   f"{sites.gw_platform_side}:2303", "--target", f"{sites.platform}:2222",
                                   "--delay-ms", "2.5"], stdout=subprocess.PIPE)  # fmt: skip
        _wait_line(relay, "delay relay")
        allow = f'["{sites.node}/32", "{sites.other_node}/32"]'
        cfg = root / "gateway.toml"
        cfg.write_text(
            f'[[route]]\nname = "prod"\nlisten = "{sites.gw_hpc_side}:{PROD}"\n'
            f'backends = ["{sites.platform}:2222"]\nallow = {allow}\nproxy_protocol = true\n'
            f'[[route]]\nname = "exp"\nlisten = "{sites.gw_hpc_side}:{EXP}"\n'
            f'backends = ["{sites.platform}:2223"]\nallow = {allow}\nproxy_protocol = true\n'
            f'[[route]]\nname = "slow"\nlisten = "{sites.gw_hpc_side}:{SLOW}"\n'
            f'backends = ["{sites.gw_platform_side}:2303"]\nallow = {allow}\nproxy_protocol = true\n'
            f'[metrics]\nlisten = "{sites.gw_hpc_side}:9101"\n'
        )
        gw = sites.popen("gw", [sys.executable, "-m", "medbridge", "gateway", "serve", "--config", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_line(gw, "route prod")
        subprocess.run(["ip", "-n", sites.ns["hpc"], "addr", "add", f"10.{sites.net}.1.{OUTSIDER_OCTET}/24", "dev",
                        sites._veth["hpc"]], check=True)  # fmt: skip
        yield World(sites, prod, exp.home, fps[0], fps[1], root)
    finally:
        sites.stop()
        shutil.rmtree(root, ignore_errors=True)


def job_cmd(w: World, *payload: str, port: int = PROD, fingerprint: str | None = None,
            key: Path | None = None) -> list[str]:  # fmt: skip
    """``medbridge job run`` at the hpc site, through the gateway, running ``payload``."""
    (w.root / "work").mkdir(exist_ok=True)
    return ["ip", "netns", "exec", w.sites.ns["hpc"], sys.executable, "-m", "medbridge", "job", "run",
            "--platform", f"{w.sites.gw_hpc_side}:{port}", "--key", str(key or w.prod.keys["alice"]),
            "--user", "alice", "--host-key-fingerprint", fingerprint or w.fingerprint, "--", *payload]  # fmt: skip


def job(w: World, script: str, port: int = PROD, fingerprint: str | None = None,
        key: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = job_cmd(w, "sh", "-c", script, port=port, fingerprint=fingerprint, key=key)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDBRIDGE_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=w.root / "work", env=env)


def test_job_at_hpc_reads_via_gw_and_the_platform_sees_the_node(world: World) -> None:
    out = world.root / "copy.bin"
    r = job(
        world, f'sftp -q -b - -F "$MEDBRIDGE_SSH_CONFIG" medbridge <<EOF\nget /datasets/chest/scan-001.bin {out}\nEOF'
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == CHEST["scan-001.bin"]

    def certificate(r: Record) -> bool:
        return r.subject == "certificate"

    detail = [r for r in world.prod.audit("login", until=certificate) if certificate(r)][-1].as_dict()["detail"]
    assert isinstance(detail, dict)
    assert str(detail["peer"]).startswith(f"{world.sites.node}:"), "the compute node, not the gateway"
    assert str(detail["via"]).startswith(f"{world.sites.gw_platform_side}:")


def test_certificate_bound_to_the_nodes_fails_from_another_address(world: World) -> None:
    r = job(
        world,
        # ssh binds only a connection it makes itself: not through the job's ProxyCommand (medbridge.compute.dial)
        f"sftp -q -o ProxyCommand=none -o BindAddress={world.sites.other_node} -b - "
        '-F "$MEDBRIDGE_SSH_CONFIG" medbridge <<EOF\nls /datasets\nEOF',
    )
    assert r.returncode != 0
    other = f"{world.sites.other_node}:"

    def from_other(r: Record) -> bool:
        return r.outcome == "refused" and str(r.as_dict()["detail"]["peer"]).startswith(other)

    refused = [r for r in world.prod.audit("login", until=from_other) if from_other(r)]
    assert refused, "the refused login is audited with the node's address"


def test_node_outside_the_allow_list_is_refused(world: World) -> None:
    probe = ("import socket,sys\n"
             f"s=socket.create_connection(('{world.sites.gw_hpc_side}',{PROD}),timeout=5,"
             f"source_address=('{world.outsider}',0))\n"
             "s.sendall(b'SSH-2.0-probe\\r\\n')\n"
             "try:\n d=s.recv(10)\nexcept ConnectionResetError:\n d=b''\n"
             "sys.exit(0 if d==b'' else 1)\n")  # fmt: skip
    r = world.sites.exec("hpc", sys.executable, "-c", probe)
    assert r.returncode == 0, r.stderr
    metrics = world.sites.exec("hpc", sys.executable, "-c",
                               f"import urllib.request;print(urllib.request.urlopen("
                               f"'http://{world.sites.gw_hpc_side}:9101/metrics').read().decode())")  # fmt: skip
    assert 'medbridge_gateway_connections_total{outcome="refused_source",route="prod"} 1.0' in metrics.stdout


def test_two_routes_reach_two_backends(world: World) -> None:
    out = world.root / "which.txt"
    key = world.root / "exp" / "alice_enrolment"
    r = job(
        world,
        f'sftp -q -b - -F "$MEDBRIDGE_SSH_CONFIG" medbridge <<EOF\nget /datasets/which/server.txt {out}\nEOF',
        port=EXP,
        fingerprint=world.exp_fingerprint,
        key=key,
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"experimental"
    assert world.fingerprint != world.exp_fingerprint


def test_emulated_5ms_rtt_measures_5ms(world: World) -> None:
    g = world.sites.gw_hpc_side
    plot = world.root / "rtt.png"
    r = job(
        world,
        f"{sys.executable} -m medbridge bench rtt --route direct={g}:{PROD} --route slow={g}:{SLOW} "
        f"--samples 40 --json --plot {plot}",
    )
    assert r.returncode == 0, r.stderr
    print(r.stdout)  # the figures docs/benchmarks.md quotes (pytest -s shows them)
    rows = {(row["name"], row["level"]): row for row in json.loads(r.stdout)["routes"]}
    slow, direct = rows[("slow", "sftp")], rows[("direct", "sftp")]
    assert slow["min_ms"] >= 5.0, "a relay with 2.5 ms each way cannot beat 5 ms"
    # The fastest of 40 round trips: a busy machine delays many samples (the medians docs/benchmarks.md
    # quotes), hardly all; 2.5 ms each way plus the relay threads' wake-ups.
    assert slow["min_ms"] - direct["min_ms"] <= 7.0, rows
    assert plot.stat().st_size > 1000


def test_a_cut_link_stalls_then_recovers_the_same_session(world: World) -> None:
    flag, log = world.root / "restored", world.root / "cut.log"
    flag.unlink(missing_ok=True)
    script = (
        "import asyncio, os, pathlib, time\n"
        "from medbridge.compute.session import connect, endpoint_from_job\n"
        "async def main():\n"
        "    async with await connect(endpoint_from_job(os.environ)) as conn:\n"
        "        sftp = await conn.start_sftp_client()\n"
        "        first = await sftp.stat('/datasets/chest/scan-001.bin')\n"
        f"        pathlib.Path('{log}').write_text('connected\\n')\n"
        f"        while not pathlib.Path('{flag}').exists(): await asyncio.sleep(0.1)\n"
        f"        pathlib.Path('{log}').write_text('reading\\n')\n"
        "        start = time.monotonic()\n"
        "        async with sftp.open('/datasets/chest/scan-001.bin', 'rb') as f: data = await f.read()\n"
        f"        pathlib.Path('{log}').write_text(f'read {{len(data)}} after {{time.monotonic()-start:.1f}}\\n')\n"
        "asyncio.run(main())\n"
    )
    (world.root / "cut.py").write_text(script)
    work = world.root / "work"
    cmd = job_cmd(world, sys.executable, str(world.root / "cut.py"))
    with subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        until(lambda: (log.exists() and log.read_text().startswith("connected")) or proc.poll() is not None,
              "the payload's session")  # fmt: skip
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        world.sites.cut("hpc")
        try:
            flag.touch()
            until(lambda: log.read_text().startswith("reading"), "the payload to start its read")
            dropped = world.sites.dropped("hpc")
            until(lambda: world.sites.dropped("hpc") >= dropped + 3, "the read's packets to be dropped by the cut")
            assert log.read_text().startswith("reading"), "no read may complete while the link is cut"
        finally:
            world.sites.restore("hpc")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert log.read_text().startswith(f"read {len(CHEST['scan-001.bin'])} after ")
