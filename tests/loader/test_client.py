"""The native loader against a real platform: the same read tests over local disk, the mount and the loader."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asyncssh import SFTPAttrs

from medbridge.compute.session import Endpoint
from medbridge.errors import AccessRevoked, BadReply, IntegrityError, LoaderClosed, PlatformUnreachable
from medbridge.loader import Loader, Sample
from medbridge.platform.sftp import JobSFTPServer
from medbridge.testing import RunningPlatform
from medbridge.testing.relay import CuttableRelay
from medbridge.testing.wait import HANG, until
from tests.loader.conftest import alice_reads

FILES = {f"img/{i:03d}.bin": os.urandom(20_000 + 17 * i) for i in range(60)}
FILES["big/volume.raw"] = os.urandom(20 << 20)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    p = alice_reads(tmp_path_factory.mktemp("loader"), "xr", FILES, 256 << 10, enforcement_interval=0.25)
    p.add_dataset("secret", {"a.bin": b"no"})
    p.add_user("carol")  # whose grants the refusal tests revoke
    with p:
        yield p


Reader = Callable[[str], bytes]


@pytest.fixture
def relayed(platform: RunningPlatform, endpoint: Endpoint) -> Iterator[tuple[CuttableRelay, Endpoint]]:
    """The job's endpoint through a relay the test can cut."""
    relay = CuttableRelay((platform.host, platform.port))
    try:
        yield relay, Endpoint(endpoint.host, relay.port, endpoint.user, endpoint.host_key, endpoint.agent)
    finally:
        relay.close()


@pytest.fixture(scope="module")
def mount(platform: RunningPlatform, endpoint: Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not os.path.exists("/dev/fuse") or shutil.which("sshfs") is None:
        pytest.skip("needs /dev/fuse and sshfs (apt-get install sshfs)")
    from medbridge.compute.job import known_hosts_line, ssh_config
    from medbridge.compute.mount import Mount

    folder = tmp_path_factory.mktemp("mount")
    (folder / "known_hosts").write_text(known_hosts_line(endpoint.host, endpoint.port, endpoint.host_key))
    cfg = folder / "ssh_config"
    cfg.write_text(
        ssh_config(endpoint.host, endpoint.port, endpoint.user, Path(endpoint.agent), folder / "known_hosts")
    )
    m = Mount(folder / "mnt", cfg, "medbridge")
    yield m.mountpoint
    assert m.close()


@pytest.fixture(params=["local", "mount", "native"])
def reader(request: pytest.FixtureRequest, platform: RunningPlatform, endpoint: Endpoint) -> Iterator[Reader]:
    """One read interface, three paths to the same bytes."""
    if request.param == "local":
        root = platform.home.datasets
        yield lambda path: (root / path.removeprefix("/datasets/")).read_bytes()
    elif request.param == "mount":
        root = request.getfixturevalue("mount")
        yield lambda path: (root / path.lstrip("/")).read_bytes()
    else:
        with Loader(endpoint) as loader:
            yield loader.read


def test_conformance_every_file_reads_back_exactly(reader: Reader) -> None:
    for rel, data in FILES.items():
        assert reader(f"/datasets/xr/{rel}") == data


def test_conformance_missing_file_is_file_not_found(reader: Reader) -> None:
    with pytest.raises(FileNotFoundError):
        reader("/datasets/xr/img/nope.bin")


def test_ungranted_dataset_is_a_permission_error_naming_it(endpoint: Endpoint) -> None:
    with Loader(endpoint) as loader, pytest.raises(PermissionError, match="dataset 'secret' is not granted"):
        loader.read("/datasets/secret/a.bin")


def test_read_many_keeps_order_and_reads_shards(endpoint: Endpoint) -> None:
    with Loader(endpoint, window=16) as loader:
        paths = loader.files("xr")
        assert [p.removeprefix("/datasets/xr/") for p in paths] == sorted(FILES)
        assert list(loader.read_many(paths)) == [FILES[p.removeprefix("/datasets/xr/")] for p in paths]
        samples = loader.shard_samples("xr")
        assert {s.path.removeprefix("/datasets/xr/") for s in samples} == set(FILES)
        for sample, data in zip(samples, loader.read_many(samples), strict=True):
            assert data == FILES[sample.path.removeprefix("/datasets/xr/")]
        assert loader.stats.verified >= 2 * len(FILES)


def test_read_many_raises_a_failed_item_in_its_place(endpoint: Endpoint) -> None:
    names = sorted(p for p in FILES if p.startswith("img/"))[:5]
    items = [f"/datasets/xr/{n}" for n in names[:3]] + ["/datasets/xr/img/missing.bin"] + [f"/datasets/xr/{names[4]}"]
    with Loader(endpoint, window=4) as loader:
        got = loader.read_many(items)
        assert [next(got) for _ in range(3)] == [FILES[n] for n in names[:3]]
        with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
            next(got)


def test_a_consumer_that_stops_early_starts_no_more_reads(endpoint: Endpoint) -> None:
    paths = [f"/datasets/xr/{n}" for n in sorted(FILES) if n.startswith("img/")] * 20
    with Loader(endpoint, window=8) as loader:
        got = loader.read_many(paths)
        for _ in range(3):
            next(got)
        got.close()
        loader.datasets()  # a round trip through the loader's loop: every start and the cancel sent before it ran
        started = loader.stats.started
        assert started <= 3 + 8 + 2, "at most the window ahead was started"
        loader.datasets()
        assert loader.stats.started == started, "nothing started after the stop"
        assert loader.stats.files <= started


def test_closing_the_loader_mid_epoch_fails_the_epoch_instead_of_hanging(
    relayed: tuple[CuttableRelay, Endpoint],
) -> None:
    """Reads stalled on a cut link are stopped by close(); the consumer gets an error, not a hang."""
    relay, via = relayed
    loader = Loader(via, window=12)
    loader.datasets()  # connected through the relay
    relay.cut()  # every read of the epoch now stalls, reconnecting
    epoch = loader.read_many(["/datasets/xr/big/volume.raw"] * 12)
    outcome: list[BaseException | str] = []

    def drain() -> None:
        try:
            for _ in epoch:
                pass
            outcome.append("finished")
        except OSError as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=drain, daemon=True)
    consumer.start()
    until(lambda: relay.refused >= 2 and loader.stats.started == 12, "the epoch's reads stalled, reconnecting")
    loader.close()
    consumer.join(HANG)
    assert outcome and isinstance(outcome[0], LoaderClosed), outcome
    assert "loader was closed" in str(outcome[0])


def test_random_access_through_the_read_ahead_cache(endpoint: Endpoint) -> None:
    data = FILES["big/volume.raw"]
    with Loader(endpoint) as loader, loader.open("/datasets/xr/big/volume.raw", block=1 << 20, readahead=2) as f:
        assert f.read(348) == data[:348]
        f.seek(5 << 20)
        assert f.read(3 << 20) == data[5 << 20 : 8 << 20]
        assert f.counters.hits >= 0 and f.counters.bytes_fetched >= 3 << 20


def test_a_changed_file_is_an_integrity_error(platform: RunningPlatform, endpoint: Endpoint) -> None:
    target = platform.home.datasets / "xr" / "img" / "059.bin"
    original = target.read_bytes()
    os.chmod(target, 0o640)
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with Loader(endpoint) as loader, pytest.raises(IntegrityError, match="does not match the dataset manifest"):
            loader.read("/datasets/xr/img/059.bin")
    finally:
        target.write_bytes(original)
        os.chmod(target, 0o440)


def test_a_cut_link_stalls_reads_then_they_resume_and_match(relayed: tuple[CuttableRelay, Endpoint]) -> None:
    relay, via = relayed
    with Loader(via, connections=2, window=8) as loader:
        paths = loader.files("xr")
        epoch = loader.read_many(paths)
        got = [bytes(next(epoch))]  # under way: one handed over, at most the window ahead started
        relay.cut()  # the fifty-odd reads not started yet can only happen over the link
        failed: list[OSError] = []
        done = threading.Event()

        def finish() -> None:
            try:
                got.extend(bytes(data) for data in epoch)
            except OSError as exc:
                failed.append(exc)
            done.set()

        worker = threading.Thread(target=finish)
        worker.start()
        until(lambda: relay.refused >= 2, "the loader trying to reconnect through the cut")
        assert not done.is_set() and not failed, "reads must stall while the link is down"
        relay.restore()
        worker.join(timeout=HANG)
        assert done.is_set() and not failed, failed
        assert got == [FILES[p.removeprefix("/datasets/xr/")] for p in paths]
        assert loader.stats.reconnects >= 1


def test_loader_works_in_a_forked_child(endpoint: Endpoint) -> None:
    loader = Loader(endpoint)
    assert loader.read("/datasets/xr/img/000.bin") == FILES["img/000.bin"]
    pid = os.fork()
    if pid == 0:
        ok = loader.read("/datasets/xr/img/001.bin") == FILES["img/001.bin"]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child opens its own connections"
    assert loader.read("/datasets/xr/img/002.bin") == FILES["img/002.bin"], "the parent's pool is untouched"
    loader.close()


def test_sample_with_a_wrong_hash_is_refused(endpoint: Endpoint) -> None:
    with Loader(endpoint) as loader, pytest.raises(IntegrityError):
        loader.read_sample(Sample("/datasets/xr/img/000.bin", sha256="0" * 64))


def test_process_leaves_no_threads_behind(endpoint: Endpoint) -> None:
    before = {t.name for t in threading.enumerate()}
    with Loader(endpoint) as loader:
        loader.read("/datasets/xr/img/003.bin")
    after = {t.name for t in threading.enumerate()}
    assert "medbridge-loader" not in after - before
    assert subprocess.run(["true"]).returncode == 0


def test_a_refused_login_fails_at_once_naming_the_reason_and_is_never_retried(platform: RunningPlatform) -> None:
    """The grant is revoked before the job reads: not an empty view, not a cut link retried for the patience."""
    platform.grant("carol", "xr")
    with platform.job_endpoint("carol", job_id="refused") as ep, Loader(ep, patience=120) as loader:
        platform.store.revoke("carol", "xr", datetime.now(UTC), "test")
        start = time.monotonic()
        with pytest.raises(AccessRevoked, match="no live grant left for user 'carol'") as refused:
            loader.read("/datasets/xr/img/000.bin")
        assert time.monotonic() - start < 5, "at once, not after the patience"
        assert loader.stats.reconnects == 0
        assert isinstance(refused.value, PermissionError)


def test_a_session_the_platform_ended_is_a_refusal_naming_why_not_a_cut(platform: RunningPlatform) -> None:
    platform.grant("carol", "xr")
    with platform.job_endpoint("carol", job_id="ended-session") as ep, Loader(ep, connections=1) as loader:
        assert loader.read("/datasets/xr/img/000.bin") == FILES["img/000.bin"]
        platform.store.revoke("carol", "xr", datetime.now(UTC), "test")
        ends = platform.audit("session.end", until=lambda r: "ended-session" in r.detail and "grant ended" in r.detail)
        assert any("ended-session" in r.detail for r in ends), "the platform ended the session"
        with pytest.raises(AccessRevoked, match=r"img/001\.bin: access revoked: grant ended for dataset\(s\) xr"):
            loader.read("/datasets/xr/img/001.bin")
        with pytest.raises(AccessRevoked, match=r"img/001\.bin: access revoked"):  # no new login, the same refusal
            loader.read("/datasets/xr/img/002.bin")
        assert loader.stats.reconnects == 0


def test_a_link_cut_past_the_patience_is_platform_unreachable(relayed: tuple[CuttableRelay, Endpoint]) -> None:
    relay, via = relayed
    with Loader(via, patience=0.5) as loader:
        assert loader.read("/datasets/xr/img/000.bin") == FILES["img/000.bin"]
        relay.cut()
        with pytest.raises(PlatformUnreachable, match=r"outage tolerance 0\.5 s") as cut:
            loader.read("/datasets/xr/img/001.bin")
        assert isinstance(cut.value, ConnectionError) and loader.stats.reconnects >= 1, "retried until then"


class _NoSizes(JobSFTPServer):
    """Fault: file attributes without a size (a reply the loader must not read as an empty file)."""

    def fstat(self, file_obj: object) -> SFTPAttrs:
        attrs = super().fstat(file_obj)
        attrs.size = None
        return attrs


def test_a_reply_outside_the_protocol_is_bad_reply_and_not_retried(
    platform: RunningPlatform, endpoint: Endpoint
) -> None:
    assert platform.platform is not None
    platform.platform.sftp_class = _NoSizes
    try:
        with Loader(endpoint, patience=120) as loader:
            with pytest.raises(BadReply, match=r"volume\.raw: file attributes without a size"):
                loader.read("/datasets/xr/big/volume.raw")
            assert loader.stats.reconnects == 0
    finally:
        platform.platform.sftp_class = JobSFTPServer
