"""The job's link watch: how an outage is dated and said, and a reset seen on loopback (silent cuts: test_faults)."""

from __future__ import annotations

import socket
import time

from medbridge.compute.linkwatch import LinkWatch, Outage, quiet_for
from medbridge.testing import RunningPlatform
from medbridge.testing.deployment import wait_for
from medbridge.testing.relay import CuttableRelay


def test_an_outage_says_how_long_from_when_and_whether_past_the_tolerance() -> None:
    start = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
    survived = Outage(start, "silent", tolerance=60, seconds=42.4)
    assert survived.describe() == "the link to the platform was down for 42 s from 08:00:00 UTC"
    assert not survived.beyond and survived.as_dict()["seconds"] == 42.4
    beyond = Outage(start, "lost", tolerance=8, seconds=14.0, still=True)
    assert beyond.describe() == ("the link to the platform was down for 14 s from 08:00:00 UTC, still down at the "
                                 "end, longer than the outage tolerance of 8 s")  # fmt: skip
    assert beyond.as_dict()["beyond"] is True
    assert Outage(start, "reset", tolerance=60, seconds=3).describe().startswith("the link to the platform was reset")


def test_quiet_for_reads_when_data_last_arrived() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        peer, _ = server.accept()
        with peer:
            peer.sendall(b"x")
            assert client.recv(1) == b"x"
            quiet = quiet_for(client)
            assert quiet is not None and 0 <= quiet < 5
    with socket.socket(socket.AF_UNIX) as unix:
        assert quiet_for(unix) is None


def test_a_reset_link_is_an_outage_that_ends_when_the_platform_answers_again(platform: RunningPlatform) -> None:
    relay = CuttableRelay((platform.host, platform.port))
    watch = LinkWatch(platform.enrolment("alice", port=relay.port), tolerance=60)
    watch.start()
    try:
        wait_for(watch.connected.is_set, "the watch connected", timeout=30)
        relay.cut()  # every relayed connection dropped, new ones refused
        wait_for(lambda: bool(watch.outages), "the watch saw the reset", timeout=30)
        relay.restore()
        wait_for(lambda: watch.outages[0].seconds is not None, "the watch saw the link back", timeout=30)
    finally:
        outages = watch.stop()
        relay.close()
    first = outages[0]
    assert first.how == "reset" and not first.beyond and first.seconds is not None and first.seconds < 30
    assert time.time() - first.started < 120
