"""Reading one dataset by every path, in one run: local disk, sshfs (default and tuned), the native loader.

Everything runs on this machine, on the network :mod:`medbridge.bench.network` gives:
the three sites where namespaces can be made (readers at ``hpc``, the gateway and the
delay relay at ``gw``, the platform and OpenSSH's sshd at ``platform``), else loopback.
The servers are processes of their own (their CPU is read from /proc); local and sshfs
reads run in this process's threads, the loader in a client process of its own.  Paths
are interleaved within each repeat; medians are reported, with the ratio to warm local
disk and the CPU seconds each part spent.
"""

from __future__ import annotations

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh

from medbridge import processes
from medbridge.bench import client
from medbridge.bench.network import Loopback, Network, choose, serve
from medbridge.compute.mount import SSHFS_OPTIONS, Mount
from medbridge.compute.session import Endpoint
from medbridge.config import Home
from medbridge.control.store import Store
from medbridge.platform.keys import fingerprint, public_line
from medbridge.platform.storage import add_dataset, init_home, pack_dataset

SSHD = "/usr/sbin/sshd"
PATHS = ("local", "sshfs-default", "sshfs-tuned", "native", "native-shards", "native-fsspec", "openssh-sftp-server")
CPU_PARTS = ("client", "server", "relay")
# What the loader's client process reads for each of its paths (None: the data set of the row).
_CLIENT_DATA = {"native": None, "native-shards": "shards", "native-fsspec": "fsspec"}


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
    """``pid`` and its descendants, following the children of every thread (a child is listed under the thread
    that forked it)."""
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for c in children:
            out += _tree(int(c))
    return out


def _cpu_tree(pid: int) -> float:
    return sum(_cpu(p) for p in _tree(pid))


def _cpu_session(sid: int) -> float:
    """CPU of every process in session ``sid``: sshfs (started as a session leader) detaches its ssh
    processes from its tree (their parent is init) but not from its session."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                session = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[3])
            except (OSError, IndexError, ValueError):
                continue
            if session == sid:
                total += _cpu(int(entry))
    return total


class OpenSSH:
    """OpenSSH's sshd (and through it sftp-server) serving the same storage, next to the platform, as the peer."""

    def __init__(self, root: Path, key: asyncssh.SSHKey, net: Network):
        self.dir = root / "openssh"
        self.dir.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host")], check=True)
        self.key_file = self.dir / "client"
        self.key_file.write_bytes(key.export_private_key())
        self.key_file.chmod(0o600)
        (self.dir / "authorized_keys").write_bytes(key.export_public_key())
        self.host_key = (self.dir / "host.pub").read_text().split()
        with socket.socket() as s:  # a free port here; in a namespace of its own any port is free
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress {net.server_host}\nHostKey {self.dir / 'host'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "UsePAM no\nStrictModes no\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
            "Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com\n"
        )
        self.made_run_dir = not os.path.isdir("/run/sshd")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        log = self.dir / "sshd.log"
        with open(log, "wb") as out:
            cmd = [*net.prefix("platform"), SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
        for _ in range(500):  # sshd says when it listens (its log, not a probe: the port may be in another namespace)
            if b"Server listening" in log.read_bytes() or self.proc.poll() is not None:
                break
            time.sleep(0.02)

    def ssh_config(self, host: str, port: int) -> Path:
        known = self.dir / f"known_hosts-{port}"
        known.write_text(f"[{host}]:{port} {self.host_key[0]} {self.host_key[1]}\n")
        cfg = self.dir / f"ssh_config-{port}"
        cfg.write_text(
            f"Host openssh\n  HostName {host}\n  Port {port}\n  User {getpass.getuser()}\n"
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

    def __init__(self, root: Path, plan: Plan, progress: Callable[[str], None], net: Network | None = None):
        self.root, self.plan, self.say = root, plan, progress
        self.net = net or Loopback()
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
        self.openssh: OpenSSH | None = None
        try:
            self.start_server(plan.server_workers)
            if "openssh-sftp-server" in plan.paths and Path(SSHD).exists():
                self.openssh = OpenSSH(root, key, self.net)
        except BaseException:
            self.close()
            raise

    def start_server(self, workers: int) -> None:
        """(Re)start the platform with ``workers`` processes on a fresh port; the data stays."""
        self.stop_server()
        self.server, self.port, self.fingerprint = serve(self.home.root, self.net, workers, self.root / "platform.log")

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


def _read_files(paths: Sequence[Path], threads: int) -> int:
    def one(p: Path) -> int:
        with open(p, "rb") as f:
            return len(f.read())

    if threads <= 1:
        return sum(one(p) for p in paths)
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, paths))


def run(plan: Plan, progress: Callable[[str], None] = lambda _m: None, network: str = "loopback") -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="medbridge-bench-io-"))
    rows: list[dict[str, Any]] = []
    try:
        net = choose(network, root)
        try:
            world = World(root, plan, progress, net)
            try:
                rows = _run(world, plan, progress)
            finally:
                world.close()
        finally:
            net.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    local_rate = {r["data"]: r["files_per_s"] for r in rows if r["path"] == "local"}
    for r in rows:
        r["ratio_to_local"] = round(r["files_per_s"] / local_rate[r["data"]], 4) if r["data"] in local_rate else None
    return {"machine": _machine(), "network": net.name, "plan": plan.__dict__, "rows": rows}


def _run(world: World, plan: Plan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    net, rows = world.net, []
    local = {d: sorted((world.home.datasets / d).glob("f*.bin")) for d in ("small", "large")}
    for d in local:
        _read_files(local[d], 1)
    for rtt in plan.rtts_ms:
        with contextlib.ExitStack() as stack:
            host, port, relays = stack.enter_context(net.route(world.port, rtt, proxy=True))
            ep, cfg = stack.enter_context(net.job(world.key, world.fingerprint, host, port))
            peer = None
            if world.openssh is not None:
                shost, sport, srelays = stack.enter_context(net.route(world.openssh.port, rtt, proxy=False))
                peer = (world.openssh.ssh_config(shost, sport), srelays)
            rows += _measure(world, plan, rtt, ep, cfg, local, relays, say, peer)
    return rows


def _measure(world: World, plan: Plan, rtt: float, ep: Endpoint, cfg: Path, local: dict[str, list[Path]],
             relays: list[int], say: Callable[[str], None],
             peer: tuple[Path, list[int]] | None) -> list[dict[str, Any]]:  # fmt: skip
    samples: dict[tuple[str, str], list[tuple[float, int, dict[str, float]]]] = {}
    with contextlib.ExitStack() as stack:
        mounts = _mounts(world, plan, cfg, peer, stack)
        kinds = [k for p, k in (("native", "small"), ("native", "large"), ("native-shards", "shards"),
                                ("native-fsspec", "fsspec")) if p in plan.paths]  # fmt: skip
        native = None
        if kinds:  # the loader reads from a process of its own, where a compute node's reader would run
            (native,) = stack.enter_context(
                client.clients(ep, 1, connections=4, window=64, data=kinds, prefix=world.net.prefix("hpc"))
            )
        for rep in range(plan.repeats):
            for data in ("small", "large"):
                names = [p.name for p in local[data]]
                for path in plan.paths:
                    if (
                        (rtt > 0 and path == "local")
                        or (path in ("native-shards", "native-fsspec") and data != "small")
                        or (path in ("sshfs-default", "sshfs-tuned", "openssh-sftp-server") and path not in mounts)
                    ):
                        continue
                    server_pid, path_relays = world.server_pid, relays
                    if path == "openssh-sftp-server" and world.openssh is not None and peer is not None:
                        server_pid, path_relays = world.openssh.proc.pid, peer[1]
                    server0, relay0 = _cpu_tree(server_pid), sum(_cpu(p) for p in path_relays)
                    if native is not None and path in _CLIENT_DATA:
                        (p,) = client.together([native], _CLIENT_DATA[path] or data)
                        seconds, nbytes, client_cpu = p.end - p.start, p.nbytes, p.cpu_s
                    else:
                        seconds, nbytes, client_cpu = _timed(
                            _reader(path, data, names, local, mounts), mounts.get(path)
                        )
                    cpu = {"client": client_cpu, "server": _cpu_tree(server_pid) - server0,
                           "relay": sum(_cpu(p) for p in path_relays) - relay0}  # fmt: skip
                    samples.setdefault((path, data), []).append((seconds, nbytes, cpu))
                    say(f"rtt {rtt:g} ms, {data}, {path}, run {rep + 1}: {len(names) / seconds:.0f} files/s")
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


def _mounts(world: World, plan: Plan, cfg: Path, peer: tuple[Path, list[int]] | None,
            stack: contextlib.ExitStack) -> dict[str, Mount]:  # fmt: skip
    """The sshfs mounts this round trip's paths read through; each is undone by ``stack``."""
    wanted = [("sshfs-default", cfg, "medbridge", "/", ()), ("sshfs-tuned", cfg, "medbridge", "/", SSHFS_OPTIONS)]
    if peer is not None and world.openssh is not None:
        wanted.append(("openssh-sftp-server", peer[0], "openssh", str(world.home.datasets), SSHFS_OPTIONS))
    mounts: dict[str, Mount] = {}
    for path, config, alias, remote, options in wanted:
        if path in plan.paths:
            point = Path(tempfile.mkdtemp(prefix=f"mnt-{path}-", dir=world.root))
            mounts[path] = m = Mount(point, config, alias, remote=remote, ssh_command=world.net.ssh_command,
                                     options=options)  # fmt: skip
            stack.callback(m.close)
    return mounts


def _timed(read: Callable[[], int], mount: Mount | None) -> tuple[float, int, float]:
    """Seconds, bytes and client CPU of one read here: this process's, and the sshfs (and its ssh) it went through."""
    cpu0 = (_cpu_session(mount.pid) if mount else 0.0) + time.process_time()  # the /proc scan outside the window
    start = time.perf_counter()
    nbytes = read()
    seconds = time.perf_counter() - start
    cpu1 = time.process_time() + (_cpu_session(mount.pid) if mount else 0.0)
    return seconds, nbytes, cpu1 - cpu0


def _reader(path: str, data: str, names: list[str], local: dict[str, list[Path]],
            mounts: dict[str, Mount]) -> Callable[[], int]:  # fmt: skip
    """How ``path`` reads the ``data`` files through a mount (or local disk): a function giving the byte count."""
    if path == "local":
        return lambda: _read_files(local[data], 1)
    point = mounts[path].mountpoint
    folder = point / data if path == "openssh-sftp-server" else point / "datasets" / data
    files = [folder / n for n in names]
    if path == "sshfs-default":
        return lambda: _read_files(files, 1)
    os.listdir(folder)  # sshfs at its best: one listing first, then many threads
    return lambda: _read_files(files, 32)


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
