"""Where a benchmark's readers reach its servers: loopback, or the three sites.

``Loopback`` puts everything on 127.0.0.1, with a delay relay process in front of a
server for an emulated round trip.  ``ThreeSites`` is the deployment in miniature
(:mod:`medbridge.testing.netns`): the servers run in the ``platform`` namespace, the
medbridge gateway (and the delay relay, on the gw→platform link) in ``gw``, and every
reader in ``hpc`` — sshfs through its ``ssh``, the loader as a client process, the job's
certificate by ``medbridge job run`` through the gateway, as a job on a compute node
gets it.  Both give the same three things: a route to a server (address, and the PIDs
whose CPU is the relay's), a job session (endpoint and ssh config), and the command
prefix that runs a reader where readers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import asyncssh

from medbridge import processes
from medbridge.compute.credentials import Enrolment, request_certificate
from medbridge.compute.job import Agent, known_hosts_line, ssh_config
from medbridge.compute.session import Endpoint, endpoint_from_job
from medbridge.errors import InvalidInput, PlatformUnavailable
from medbridge.testing import netns

log = logging.getLogger("medbridge.bench")

NETWORKS = ("auto", "loopback", "sites")
_JOB_PAYLOAD = "import json, os, sys; print(json.dumps(dict(os.environ)), flush=True); sys.stdin.read()"


def first_line(proc: subprocess.Popen[str], words: str, what: str, log: Path | None = None,
                timeout: float = 60) -> str:  # fmt: skip
    """The first line ``proc`` prints, which must contain ``words``; else stop it and say why (its log's last line)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if words not in line:
        processes.stop(proc, timeout=10)
        said = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log and log.exists() else []
        raise PlatformUnavailable(f"{what} did not start: {(said[-1] if said else line.strip()) or 'no answer'}")
    return line


def serve(home: Path, net: Network, workers: int, log: Path,
          what: str = "the benchmark's platform") -> tuple[subprocess.Popen[str], int, str]:  # fmt: skip
    """``platform serve`` for ``home`` as a process of its own where ``net`` puts servers: the process, its port and
    its host-key fingerprint, once it says it listens (else it is stopped and its log's last line raised)."""
    host = net.server_host
    cmd = [*net.prefix("platform"), sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(home),
           "--listen", f"{host}:0", "--workers", str(workers), *net.serve_args]  # fmt: skip
    with open(log, "wb") as err:
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    line = first_line(server, f"listening on {host}:", f"{what} (workers={workers})", log)
    return server, int(line.split(f"listening on {host}:")[1].split()[0]), line.split("host key ")[1].split()[0]


@contextmanager
def relay(port: int, rtt_ms: float, host: str = "127.0.0.1", prefix: Sequence[str] = (),
          listen: str = "127.0.0.1") -> Iterator[tuple[int, int | None]]:  # fmt: skip
    """A delay relay process adding ``rtt_ms`` to every round trip (none for 0): its port and PID."""
    if rtt_ms <= 0:
        yield port, None
        return
    cmd = [*prefix, sys.executable, "-m", "medbridge.testing.delay", "--listen", f"{listen}:0", "--target",
           f"{host}:{port}", "--delay-ms", str(rtt_ms / 2)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = first_line(proc, "delay relay", "the delay relay")
        yield int(line.split()[2].rsplit(":", 1)[1]), proc.pid
    finally:
        processes.stop(proc, timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


@contextmanager
def job(key: asyncssh.SSHKey, fingerprint: str, port: int) -> Iterator[tuple[Endpoint, Path]]:
    """An agent with a job certificate, and an OpenSSH config for sshfs, as `job run` would set up (loopback)."""
    folder = Path(tempfile.mkdtemp(prefix="medbridge-bench-job-"))
    agent = Agent(folder)
    try:
        eph = asyncssh.generate_private_key("ssh-ed25519")
        enrol = Enrolment("127.0.0.1", port, "bench", key, fingerprint)
        cred = asyncio.run(request_certificate(enrol, eph, f"bench-{port}", 3600, None))
        asyncio.run(agent.load(eph, cred.certificate, 3600))
        (folder / "known_hosts").write_text(known_hosts_line("127.0.0.1", port, cred.host_key))
        cfg = folder / "ssh_config"
        cfg.write_text(ssh_config("127.0.0.1", port, "bench", agent.socket, folder / "known_hosts"))
        yield Endpoint("127.0.0.1", port, "bench", cred.host_key, str(agent.socket)), cfg
    finally:
        agent.stop()
        shutil.rmtree(folder, ignore_errors=True)


class Loopback:
    """Every part on 127.0.0.1; an emulated round trip is a delay relay in front of the server."""

    name = "loopback"
    server_host = "127.0.0.1"
    serve_args: tuple[str, ...] = ()
    ssh_command: str | None = None

    def prefix(self, site: str) -> list[str]:
        return []

    @contextmanager
    def route(self, port: int, rtt_ms: float, *, proxy: bool) -> Iterator[tuple[str, int, list[int]]]:
        with relay(port, rtt_ms) as (p, pid):
            yield "127.0.0.1", p, [pid] if pid else []

    @contextmanager
    def job(self, key: asyncssh.SSHKey, fingerprint: str, host: str, port: int) -> Iterator[tuple[Endpoint, Path]]:
        with job(key, fingerprint, port) as got:
            yield got

    def close(self) -> None:
        pass


class ThreeSites:
    """hpc — gw — platform as namespaces: servers at ``platform``, gateway and relay at ``gw``, readers at ``hpc``."""

    name = "sites"

    def __init__(self, root: Path, places: Sequence[str] = netns.THREE_SITES):
        self.root = root
        try:
            self.sites = netns.Sites(places).start()  # removes what it made if it fails
        except subprocess.CalledProcessError as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
            why = err.strip().splitlines()[-1] if err.strip() else str(exc)
            raise PlatformUnavailable(f"the three sites could not be built: {why}") from exc
        self.server_host = self.sites.platform
        self.serve_args = ("--trusted-proxy", f"{self.sites.gw_platform_side}/32")
        self.ssh_command = f"ip netns exec {self.sites.ns['hpc']} ssh"
        self._next_port = 2201

    def prefix(self, site: str) -> list[str]:
        return ["ip", "netns", "exec", self.sites.ns[site]]

    @contextmanager
    def route(self, port: int, rtt_ms: float, *, proxy: bool) -> Iterator[tuple[str, int, list[int]]]:
        """The gateway in front of ``port`` at the platform, through a delay relay on the gw→platform link."""
        s = self.sites
        listen, self._next_port = self._next_port, self._next_port + 1
        with relay(port, rtt_ms, host=s.platform, prefix=self.prefix("gw"), listen=s.gw_platform_side) as (p, pid):
            backend = f"{s.gw_platform_side}:{p}" if pid else f"{s.platform}:{port}"
            cfg = self.root / f"gateway-{listen}.toml"
            cfg.write_text(f'[[route]]\nname = "bench"\nlisten = "{s.gw_hpc_side}:{listen}"\nbackends = ["{backend}"]\n'
                           f'allow = ["{s.node}/32"]\nproxy_protocol = {"true" if proxy else "false"}\n')  # fmt: skip
            log = cfg.with_suffix(".log")
            with open(log, "wb") as err:
                cmd = [*self.prefix("gw"), sys.executable, "-m", "medbridge", "gateway", "serve", "--config", str(cfg)]
                gw = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                first_line(gw, "route bench", "the gateway", log)
                yield s.gw_hpc_side, listen, [gw.pid, *([pid] if pid else [])]
            finally:
                processes.stop(gw, timeout=10)
                assert gw.stdout is not None
                gw.stdout.close()

    @contextmanager
    def job(self, key: asyncssh.SSHKey, fingerprint: str, host: str, port: int,
            job_id: str = "") -> Iterator[tuple[Endpoint, Path]]:  # fmt: skip
        """``medbridge job run`` at ``hpc`` through the gateway; its payload hands back the job's environment.

        ``job_id``: default ``bench-<port>``; a second job through the same port needs one of its own (an
        ended job gets no certificate again)."""
        key_file = self.root / f"bench-key-{port}"
        key_file.write_bytes(key.export_private_key())
        key_file.chmod(0o600)
        work = Path(tempfile.mkdtemp(prefix="medbridge-bench-work-", dir=self.root))
        # Not the job this process may run in: no Slurm id, its state kept here (not in the node's spool, where
        # the enclosing job's is), nothing of ours (under $TMPDIR, say) to scan or purge at its end, and its
        # agent's socket in the default temporary folder (a short path).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDBRIDGE_", "SLURM_")) and k != "TMPDIR"}
        env["MEDBRIDGE_STATE_DIR"] = str(work)
        cmd = [*self.prefix("hpc"), sys.executable, "-m", "medbridge", "job", "run", "--platform", f"{host}:{port}",
               "--key", str(key_file), "--user", "bench", "--host-key-fingerprint", fingerprint, "--job-id",
               job_id or f"bench-{port}", "--no-purge", "--", sys.executable, "-c", _JOB_PAYLOAD]  # fmt: skip
        log = work.with_suffix(".log")
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                    cwd=work, env=env)  # fmt: skip
        try:
            job_env = json.loads(first_line(proc, "MEDBRIDGE_PLATFORM", "the benchmark's job", log))
            yield endpoint_from_job(job_env), Path(job_env["MEDBRIDGE_SSH_CONFIG"])
        finally:
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the payload ends, and the job with it
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            processes.stop(proc, timeout=10)
            proc.stdout.close()

    def close(self) -> None:
        self.sites.stop()


Network = Loopback | ThreeSites


def choose(name: str, root: Path) -> Network:
    """``auto``: the three sites where network namespaces can be made (root, iproute2), else loopback."""
    if name not in NETWORKS:
        raise InvalidInput(f"--network {name!r}: choose from {', '.join(NETWORKS)}")
    why = netns.available() if name != "loopback" else None
    if name == "sites" and why is not None:
        raise InvalidInput(f"--network sites: {why}")
    if name == "loopback" or why is not None:
        return Loopback()
    try:
        return ThreeSites(root)
    except PlatformUnavailable as exc:
        if name == "sites":
            raise
        log.warning("%s; measuring on loopback", exc)
        return Loopback()
