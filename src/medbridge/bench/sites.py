"""``bench rtt --sites``: round trips between the original system's places, at TCP and SFTP level (its Fig 3).

Builds the four places as network namespaces (:mod:`medbridge.testing.netns`: the HPC
centre, a second campus, the data platform, the experimental server, each linked to the
``gw`` core with a one-way delay of its own).  At every destination a TCP echo server and
a medbridge platform run; for each pair a delay relay in ``gw`` carries the source's
connections with both links' delays, and a probe process *at the source* measures:

- ``tcp``: one byte sent and echoed on an open connection (a ping over TCP: the whole path);
- ``sftp``: a ``stat`` round trip on an SFTP session opened with a job certificate.

Run as ``python -m medbridge.bench.sites echo|probe`` for those two parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medbridge.bench import rtt
from medbridge.errors import InvalidInput, PlatformUnavailable
from medbridge.testing import netns

#: The original figure's pairs: HPC centre ↔ experimental server, HPC centre ↔ platform, campus ↔ experimental server.
PAIRS = (("hpc", "exp"), ("hpc", "platform"), ("campus", "exp"))
NAMES = {"hpc": "HPC centre", "campus": "second campus", "platform": "data platform", "exp": "experimental server"}
SHORT = {"hpc": "HPC", "campus": "campus", "platform": "platform", "exp": "exp. server"}


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    places = set(NAMES)
    out = []
    for item in text.split(","):
        a, _, b = item.strip().partition("-")
        if a not in places or b not in places or a == b:
            raise InvalidInput(f"--pairs {item!r}: use A-B with A, B among {', '.join(sorted(places))}")
        out.append((a, b))
    return tuple(out)


def parse_delays(items: Sequence[str]) -> dict[str, float]:
    delays = dict(netns.DEFAULT_DELAYS_MS)
    for item in items:
        place, _, ms = item.partition("=")
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if place not in NAMES or value < 0:
            raise InvalidInput(f"--link-delay {item!r}: use PLACE=MS with PLACE among {', '.join(sorted(NAMES))}")
        delays[place] = value
    return delays


def run(pairs: Sequence[tuple[str, str]] = PAIRS, samples: int = 30, delays_ms: dict[str, float] | None = None,
        progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:  # fmt: skip
    """Build the places, measure every pair at both levels, tear everything down."""
    why = netns.available()
    if why is not None:
        raise InvalidInput(f"--sites: {why}")
    root = Path(tempfile.mkdtemp(prefix="medbridge-bench-sites-", dir="/var/tmp"))
    sites = netns.Sites(netns.FOUR_PLACES, delays_ms)
    try:
        sites.start()
        rows = _measure(sites, root, pairs, samples, progress)
    finally:
        sites.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {"delays_ms": sites.delays_ms, "samples": samples, "rows": rows}


def _measure(sites: netns.Sites, root: Path, pairs: Sequence[tuple[str, str]], samples: int,
             say: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    import asyncssh

    from medbridge.config import Home
    from medbridge.control.store import Store
    from medbridge.platform.keys import fingerprint, public_line
    from medbridge.platform.storage import add_dataset, init_home

    home = Home(root / "platform")
    init_home(home, "bench")
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = root / "enrolment"
    key_file.write_bytes(key.export_private_key())
    key_file.chmod(0o600)
    store = Store(home.database_url(home.settings()))
    now = datetime.now(UTC)
    store.add_user("bench", [(public_line(key), fingerprint(key))], [], now, "bench")
    (root / "probe").mkdir()
    (root / "probe" / "hello.txt").write_text("a job certificate needs a grant\n")
    add_dataset(home, store, "probe", root / "probe", "bench", "bench")
    store.grant("bench", "probe", None, now, "bench")
    store.close()
    servers: dict[str, tuple[int, int, str]] = {}  # place: echo port, platform port, host-key fingerprint
    for dst in sorted({b for _, b in pairs}):
        addr = sites.address[dst]
        echo = sites.popen(dst, [sys.executable, "-m", "medbridge.bench.sites", "echo", f"{addr}:0"],
                           stdout=subprocess.PIPE)  # fmt: skip
        echo_port = int(_line(echo, "echo").split(":")[-1])
        serve = sites.popen(dst, [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(home.root),
                                  "--listen", f"{addr}:0", "--workers", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)  # fmt: skip
        line = _line(serve, "listening on")
        servers[dst] = (echo_port, int(line.split(f"{addr}:")[1].split()[0]), line.split("host key ")[1].split()[0])
    rows = []
    for src, dst in pairs:
        echo_port, sftp_port, fp = servers[dst]
        tcp_host, tcp_port = sites.delayed(src, dst, echo_port)
        ssh_host, ssh_port = sites.delayed(src, dst, sftp_port)
        spec = {"tcp": [tcp_host, tcp_port], "sftp": [ssh_host, ssh_port], "key": str(key_file), "user": "bench",
                "fingerprint": fp, "samples": samples}  # fmt: skip
        r = subprocess.run(["ip", "netns", "exec", sites.ns[src], sys.executable, "-m", "medbridge.bench.sites",
                            "probe"], input=json.dumps(spec), capture_output=True, text=True, timeout=600)  # fmt: skip
        if r.returncode != 0:
            said = r.stderr.strip().splitlines()
            raise PlatformUnavailable(f"the probe {src}->{dst} failed: {said[-1] if said else r.returncode}")
        got = json.loads(r.stdout)
        emulated = round(2 * (sites.delays_ms[src] + sites.delays_ms[dst]), 3)
        for level in ("tcp", "sftp"):
            row = rtt.summarise(rtt.Route(f"{src}-{dst}", "", 0), level, got[level])
            rows.append({**row, "src": src, "dst": dst, "emulated_ms": emulated})
            say(f"{src} -> {dst} ({level}): mean {row['mean_ms']} ms (links add {emulated} ms)")
    return rows


def _line(proc: subprocess.Popen[bytes], words: str, timeout: float = 60) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if words not in line:
        raise PlatformUnavailable(f"a server of the RTT benchmark did not start: {line.strip() or 'no answer'}")
    return line.strip()


def plot(result: dict[str, Any], path: Path) -> None:
    """Like the original figure: per pair, mean with min-max whiskers, TCP and SFTP side by side."""
    rows = [{**r, "name": f"{SHORT[r['src']]} ↔\n{SHORT[r['dst']]}"} for r in result["rows"]]
    rtt.plot(rows, path, title="round-trip time between places (emulated links)")


# -- the parts that run at a place -------------------------------------------------------------------------------


def echo(listen: str) -> None:
    """A TCP echo server (one thread per connection), until killed."""
    host, _, port = listen.rpartition(":")
    server = socket.create_server((host, int(port)))
    print(f"echo {host}:{server.getsockname()[1]}", flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(4096):
                conn.sendall(data)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def probe(spec: dict[str, Any]) -> dict[str, list[float]]:
    """Seconds per round trip at both levels, measured from here (the source place)."""
    samples, warmup = int(spec["samples"]), 3
    tcp = []
    with socket.create_connection(tuple(spec["tcp"]), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + samples):
            start = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise PlatformUnavailable("the echo server did not echo")
            if i >= warmup:
                tcp.append(time.perf_counter() - start)
    return {"tcp": tcp, "sftp": asyncio.run(_sftp(spec, samples, warmup))}


async def _sftp(spec: dict[str, Any], samples: int, warmup: int) -> list[float]:
    import asyncssh

    from medbridge.compute.credentials import Enrolment, request_certificate
    from medbridge.config import CIPHERS
    from medbridge.platform.keys import KEY_ALG

    host, port = spec["sftp"]
    enrol = Enrolment(host, port, spec["user"], asyncssh.read_private_key(spec["key"]), spec["fingerprint"])
    eph = asyncssh.generate_private_key(KEY_ALG)
    cred = await request_certificate(enrol, eph, f"rtt-{int(time.time())}", 600, None)
    async with asyncssh.connect(host, port, username=cred.user, client_keys=[(eph, cred.certificate)],
                                known_hosts=([cred.host_key], [], []), agent_path=None, encryption_algs=list(CIPHERS),
                                config=None) as conn:  # fmt: skip
        out = await rtt.stat_round_trips(conn, samples, warmup)
    return out


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        if sys.argv[1:2] == ["echo"]:
            echo(sys.argv[2])
        elif sys.argv[1:2] == ["probe"]:
            print(json.dumps(probe(json.loads(sys.stdin.read()))))
        else:
            sys.exit("usage: python -m medbridge.bench.sites echo HOST:PORT | probe < spec.json")
