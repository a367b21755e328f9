"""Service logs (``--log-format json``): one JSON object per line, with the structured fields a call gave."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from medbridge import logs
from medbridge.errors import InvalidInput


@pytest.fixture
def restored() -> Iterator[None]:
    """``configure`` replaces the root logger's handlers: give the test run its own back."""
    root, ours = logging.getLogger(), logging.getLogger("medbridge")
    handlers, level, our_level = list(root.handlers), root.level, ours.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    ours.setLevel(our_level)


def test_json_lines_carry_time_level_logger_message_and_fields(restored: None) -> None:
    stream = io.StringIO()
    logs.configure("platform", "json", stream=stream)
    log = logging.getLogger("medbridge.platform")
    log.info("refused %d connection(s):\nline two", 3, extra={"connections": 3, "peer": "10.0.0.1:5"})
    try:
        raise ValueError("broken")
    except ValueError:
        log.exception("a bug")
    logging.getLogger("asyncssh").info("library chatter stays out")
    logging.getLogger("asyncssh").warning("library warnings do not")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, "one line per record, newlines in a message escaped"
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "refused 3 connection(s):\nline two"
    assert (first["level"], first["logger"], first["connections"], first["peer"]) == (
        "info",
        "medbridge.platform",
        3,
        "10.0.0.1:5",
    )
    assert first["time"].endswith("+00:00") and isinstance(first["pid"], int)
    assert second["level"] == "error" and "ValueError: broken" in second["exception"]
    assert third["logger"] == "asyncssh" and third["level"] == "warning"


def test_text_lines_name_the_service(restored: None) -> None:
    stream = io.StringIO()
    logs.configure("gateway", "text", stream=stream)
    logging.getLogger("medbridge.gateway").warning("configuration reloaded")
    assert stream.getvalue() == "medbridge gateway: configuration reloaded\n"


def test_an_unknown_format_is_bad_input() -> None:
    with pytest.raises(InvalidInput, match="'yaml' is not a log format"):
        logs.configure("platform", "yaml")
