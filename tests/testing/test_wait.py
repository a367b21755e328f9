"""The test helpers that wait on events: what they return, and how they fail."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from medbridge.testing.wait import Lines, until


def test_until_returns_the_value_and_names_what_it_waited_for() -> None:
    values = iter([0, [], "ready"])
    assert until(lambda: next(values), "a value") == "ready"
    with pytest.raises(TimeoutError, match="waited 0 s for nothing at all"):
        until(lambda: False, "nothing at all", timeout=0)


def test_lines_waits_for_a_line_and_fails_when_the_stream_ends_without_it() -> None:
    cmd = [sys.executable, "-c", "print('one'); print('two')"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        lines = Lines(proc.stdout)
        assert lines.wait_for("two") == "two\n"
        with pytest.raises(AssertionError, match="the stream ended"):
            lines.wait_for("three")
        assert lines.join() == "one\ntwo\n"
    assert Lines(io.StringIO("")).join() == ""
