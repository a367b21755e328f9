"""Reading one dataset by every path, in one run: local disk, sshfs (default and tuned), the native loader.

Everything runs on this machine: the platform as its own process (its CPU is read from
/proc), a delay relay in front of it for the emulated round trip, the readers in this
process (or sshfs's).  Paths are interleaved within each repeat; medians are reported,
with the ratio to warm local disk and the CPU seconds each part spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh

from medbridge import processes
from medbridge.compute.credentials import Enrolment, request_certificate
from medbridge.compute.job import Agent, known_hosts_line, ssh_config
from medbridge.compute.mount import Mount, unmount
from medbridge.compute.session import Endpoint
from medbridge.config import Home
from medbridge.control.store import Store
from medbridge.errors import PlatformUnavailable
from medbridge.loader import Loader
from medbridge.platform.keys import fingerprint, public_line
from medbridge.platform.storage import add_dataset, init_home, pack_dataset

SSHD = "/usr/sbin/sshd"
PATHS = ("local", "sshfs-default", "sshfs-tuned", "native", "native-shards", "openssh-sftp-server")
CPU_PARTS = ("client", "server", "relay")


@dataclass(frozen=True, kw_only=True)
class Plan:
    small_files: int = 2000
    small_kb: int = 100
    large_files: int = 3
    large_mb: int = 64
    rtts_ms: tuple[float, ...] = (0.0, 5.0)
    repeats: int = 3
    server_workers: int = os.cpu_count() or 1
    paths: tuple[str, ...] = PATHS

    @classmethod
    def quick(cls) -> Plan:
        return cls(small_files=400, large_files=2, large_mb=32, repeats=2)


_cpu = processes.cpu_seconds


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for c in children:
        out += _tree(int(c))
    return out


def _cpu_tree(pid: int) -> float:
    return sum(_cpu(p) for p in _tree(pid))


class OpenSSH:
    """OpenSSH's sshd (and through it sftp-server) serving the same storage, on loopback, as the peer."""

    def __init__(self, root: Path, key: asyncssh.SSHKey):
        self.dir = root / "openssh"
        self.dir.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host")], check=True)
        self.key_file = self.dir / "client"
        self.key_file.write_bytes(key.export_private_key())
        self.key_file.chmod(0o600)
        (self.dir / "authorized_keys").write_bytes(key.export_public_key())
        self.host_key = (self.dir / "host.pub").read_text().split()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "UsePAM no\nStrictModes no\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
            "Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com\n"
        )
        self.made_run_dir = not os.path.isdir("/run/sshd")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.02)

    def ssh_config(self, port: int) -> Path:
        known = self.dir / f"known_hosts-{port}"
        known.write_text(f"[127.0.0.1]:{port} {self.host_key[0]} {self.host_key[1]}\n")
        cfg = self.dir / f"ssh_config-{port}"
        cfg.write_text(
            f"Host openssh\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
            f"  IdentityFile {self.key_file}\n  IdentitiesOnly yes\n  IdentityAgent none\n"
            f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
            "  Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com\n  LogLevel ERROR\n"
        )
        return cfg

    def close(self) -> None:
        processes.stop(self.proc, timeout=10)
        if self.made_run_dir:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


class World:
    """A platform home with the two datasets, served by a process of its own."""

    def __init__(self, root: Path, plan: Plan, progress: Callable[[str], None]):
        self.root, self.plan, self.say = root, plan, progress
        self.home = Home(root / "platform")
        init_home(self.home, "bench")
        store = Store(self.home.database_url(self.home.settings()))
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.key = key
        now = datetime.now(UTC)
        store.add_user("bench", [(public_line(key), fingerprint(key))], [], now, "bench")
        for name, count, size in (("small", plan.small_files, plan.small_kb << 10),
                                  ("large", plan.large_files, plan.large_mb << 20)):  # fmt: skip
            src = root / f"src-{name}"
            src.mkdir()
            for i in range(count):
                with open(src / f"f{i:05d}.bin", "wb") as f:
                    f.write(os.urandom(size))
            self.say(f"ingesting {count} x {size >> 10} KiB ({name})")
            add_dataset(self.home, store, name, src, "bench", "bench")
            shutil.rmtree(src)
            store.grant("bench", name, None, now, "bench")
        pack_dataset(self.home, store, "small", 64 << 20, "bench")
        store.close()
        self.server: subprocess.Popen[str] | None = None
        self.start_server(plan.server_workers)
        self.openssh = OpenSSH(root, key) if "openssh-sftp-server" in plan.paths and Path(SSHD).exists() else None

    def start_server(self, workers: int) -> None:
        """(Re)start the platform with ``workers`` processes on a fresh port; the data stays."""
        self.stop_server()
        cmd = [sys.executable, "-m", "medbridge", "platform", "serve", "--home", str(self.home.root), "--listen",
               "127.0.0.1:0", "--workers", str(workers)]  # fmt: skip
        self.server = server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert server.stdout is not None
        line = server.stdout.readline()
        if "127.0.0.1:" not in line:
            self.stop_server()
            raise PlatformUnavailable(f"the benchmark's platform did not start (workers={workers})")
        self.port = int(line.split("127.0.0.1:")[1].split()[0])
        self.fingerprint = line.split("host key ")[1].split()[0]

    @property
    def server_pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            processes.stop(server, timeout=30)
            if server.stdout:
                server.stdout.close()

    def close(self) -> None:
        if self.openssh is not None:
            self.openssh.close()
        self.stop_server()


@contextmanager
def relay(port: int, rtt_ms: float) -> Iterator[tuple[int, int | None]]:
    """A delay relay process adding ``rtt_ms`` to every round trip (none for 0)."""
    if rtt_ms <= 0:
        yield port, None
        return
    cmd = [sys.executable, "-m", "medbridge.testing.delay", "--listen", "127.0.0.1:0", "--target",
           f"127.0.0.1:{port}", "--delay-ms", str(rtt_ms / 2)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        yield int(line.split()[2].rsplit(":", 1)[1]), proc.pid
    finally:
        processes.stop(proc, timeout=10)
        proc.stdout.close()


@contextmanager
def job(world: World, port: int) -> Iterator[tuple[Endpoint, Path]]:
    """An agent with a job certificate, and an OpenSSH config for sshfs, as `job run` would set up."""
    folder = Path(tempfile.mkdtemp(prefix="medbridge-bench-job-"))
    agent = Agent(folder)
    try:
        eph = asyncssh.generate_private_key("ssh-ed25519")
        enrol = Enrolment("127.0.0.1", port, "bench", world.key, world.fingerprint)
        cred = asyncio.run(request_certificate(enrol, eph, f"bench-{port}", 3600, None))
        asyncio.run(agent.load(eph, cred.certificate, 3600))
        (folder / "known_hosts").write_text(known_hosts_line("127.0.0.1", port, cred.host_key))
        cfg = folder / "ssh_config"
        cfg.write_text(ssh_config("127.0.0.1", port, "bench", agent.socket, folder / "known_hosts"))
        yield Endpoint("127.0.0.1", port, "bench", cred.host_key, str(agent.socket)), cfg
    finally:
        agent.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _read_files(paths: Sequence[Path], threads: int) -> int:
    def one(p: Path) -> int:
        with open(p, "rb") as f:
            return len(f.read())

    if threads <= 1:
        return sum(one(p) for p in paths)
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, paths))


def run(plan: Plan, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="medbridge-bench-io-"))
    rows: list[dict[str, Any]] = []
    world = World(root, plan, progress)
    try:
        local = {d: sorted((world.home.datasets / d).glob("f*.bin")) for d in ("small", "large")}
        for d in local:
            _read_files(local[d], 1)
        for rtt in plan.rtts_ms:
            with contextlib.ExitStack() as stack:
                port, relay_pid = stack.enter_context(relay(world.port, rtt))
                ep, cfg = stack.enter_context(job(world, port))
                peer = None
                if world.openssh is not None:
                    sport, srelay_pid = stack.enter_context(relay(world.openssh.port, rtt))
                    peer = (world.openssh.ssh_config(sport), srelay_pid)
                rows += _measure(world, plan, rtt, ep, cfg, local, relay_pid, progress, peer)
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)
    local_rate = {r["data"]: r["files_per_s"] for r in rows if r["path"] == "local"}
    for r in rows:
        r["ratio_to_local"] = round(r["files_per_s"] / local_rate[r["data"]], 4) if r["data"] in local_rate else None
    return {"machine": _machine(), "plan": plan.__dict__, "rows": rows}


def _measure(world: World, plan: Plan, rtt: float, ep: Endpoint, cfg: Path, local: dict[str, list[Path]],
             relay_pid: int | None, say: Callable[[str], None],
             peer: tuple[Path, int | None] | None) -> list[dict[str, Any]]:  # fmt: skip
    samples: dict[tuple[str, str], list[tuple[float, int, dict[str, float]]]] = {}
    mounts: dict[str, tuple[Path, Any]] = {}
    loader = Loader(ep, connections=4, window=64)
    try:
        if "sshfs-default" in plan.paths:
            point = world.root / f"mnt-default-{int(rtt)}"
            point.mkdir()
            proc = subprocess.Popen(["sshfs", "-f", "-F", str(cfg), "medbridge:/", str(point)],
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            for _ in range(300):
                if os.path.ismount(point):
                    break
                time.sleep(0.02)
            mounts["sshfs-default"] = (point, proc)
        if "sshfs-tuned" in plan.paths:
            m = Mount(world.root / f"mnt-tuned-{int(rtt)}", cfg, "medbridge")
            mounts["sshfs-tuned"] = (m.mountpoint, m)
        if peer is not None and world.openssh is not None:
            m = Mount(world.root / f"mnt-openssh-{int(rtt)}", peer[0], "openssh", remote=str(world.home.datasets))
            mounts["openssh-sftp-server"] = (m.mountpoint, m)
        shard_samples = loader.shard_samples("small")
        for rep in range(plan.repeats):
            for data in ("small", "large"):
                names = [p.name for p in local[data]]
                for path in plan.paths:
                    if rtt > 0 and path == "local":
                        continue
                    if (path == "native-shards" and data != "small") or (
                        path in ("sshfs-default", "sshfs-tuned", "openssh-sftp-server") and path not in mounts
                    ):
                        continue
                    server_pid = world.server_pid
                    path_relay = relay_pid
                    if path == "openssh-sftp-server" and world.openssh is not None and peer is not None:
                        server_pid, path_relay = world.openssh.proc.pid, peer[1]
                    read = _reader(path, data, names, local, mounts, loader, shard_samples)
                    before = {"client": time.process_time(), "server": _cpu_tree(server_pid),
                              "relay": _cpu(path_relay) if path_relay else 0.0,
                              "sshfs": _cpu(mounts[path][1].pid) if path in mounts else 0.0}  # fmt: skip
                    start = time.perf_counter()
                    nbytes = read()
                    seconds = time.perf_counter() - start
                    cpu = {"client": time.process_time() - before["client"],
                           "server": _cpu_tree(server_pid) - before["server"],
                           "relay": (_cpu(path_relay) - before["relay"]) if path_relay else 0.0}  # fmt: skip
                    if path in mounts:
                        cpu["client"] += _cpu(mounts[path][1].pid) - before["sshfs"]
                    samples.setdefault((path, data), []).append((seconds, nbytes, cpu))
                    say(f"rtt {rtt:g} ms, {data}, {path}, run {rep + 1}: {len(names) / seconds:.0f} files/s")
    finally:
        loader.close()
        for point, handle in mounts.values():
            if isinstance(handle, Mount):
                handle.close()
            else:
                unmount(point)
                processes.stop(handle, timeout=10)
    rows = []
    for (path, data), runs in samples.items():
        count = len(local[data])
        secs = statistics.median(s for s, _, _ in runs)
        nbytes = runs[0][1]
        rate = count / secs
        rows.append({
            "path": path, "data": data, "rtt_ms": rtt, "files_per_s": round(rate, 1),
            "mb_per_s": round(nbytes / secs / 1e6, 1),
            "ratio_to_local": None,
            "cpu_s": {k: round(statistics.median(c[k] for _, _, c in runs), 3) for k in CPU_PARTS},
            "repeats": len(runs),
        })  # fmt: skip
    return rows


def _reader(path: str, data: str, names: list[str], local: dict[str, list[Path]], mounts: dict[str, Any],
            loader: Loader, shard_samples: list[Any]) -> Callable[[], int]:  # fmt: skip
    """How ``path`` reads the ``data`` files: returns a function reading them all, giving the byte count."""
    if path == "local":
        return lambda: _read_files(local[data], 1)
    if path == "native":
        remote = [f"/datasets/{data}/{n}" for n in names]
        return lambda: _total(loader.read_many(remote))
    if path == "native-shards":
        return lambda: _total(loader.read_many(shard_samples))
    point = mounts[path][0]
    folder = point / data if path == "openssh-sftp-server" else point / "datasets" / data
    files = [folder / n for n in names]
    if path == "sshfs-default":
        return lambda: _read_files(files, 1)
    os.listdir(folder)  # sshfs at its best: one listing first, then many threads
    return lambda: _read_files(files, 32)


def _total(blobs: Iterator[bytearray]) -> int:
    return sum(len(b) for b in blobs)


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "host": os.uname().nodename,
            "asyncssh": asyncssh.__version__}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r["data"], r["rtt_ms"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (data, rtt) in zip(axes[0], panels, strict=True):
        sel = [r for r in rows if r["data"] == data and r["rtt_ms"] == rtt]
        key = "files_per_s" if data == "small" else "mb_per_s"
        ax.bar([r["path"] for r in sel], [r[key] for r in sel], color="#4c72b0")
        ax.set_title(f"{data} files, RTT +{rtt:g} ms")
        ax.set_ylabel("files/s" if data == "small" else "MB/s")
        ax.tick_params(axis="x", rotation=40)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
