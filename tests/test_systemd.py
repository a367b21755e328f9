"""The systemd units in docs/systemd: hardened as the operator guide says, runnable as written
(every option they pass exists), and accepted by ``systemd-analyze verify``."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from medbridge.cli.main import cli

UNITS = Path(__file__).resolve().parents[1] / "docs" / "systemd"
PLATFORM, GATEWAY = UNITS / "medbridge-platform.service", UNITS / "medbridge-gateway.service"


def parse(unit: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with every value it was given (systemd keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{unit.name}: not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "SystemCallArchitectures": "native",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "UMask": "0077", "KillSignal": "SIGTERM",
}  # fmt: skip


@pytest.mark.parametrize("unit", [PLATFORM, GATEWAY], ids=lambda u: u.stem)
def test_units_carry_the_hardening_the_guide_promises(unit: Path) -> None:
    service = parse(unit)["Service"]
    for key, wanted in HARDENING.items():
        assert service.get(key) == [wanted], f"{unit.name}: {key}={wanted}"
    assert service["SystemCallFilter"][0] == "@system-service" and "~@privileged" in service["SystemCallFilter"][1]
    assert int(service["LimitNOFILE"][0]) >= 65536, "descriptors: see the guide's Descriptors section"
    assert "WantedBy" in parse(unit)["Install"]


def test_the_platform_may_write_only_its_home() -> None:
    service = parse(PLATFORM)["Service"]
    home = next(v.split("=", 1)[1] for v in service["Environment"] if v.startswith("MEDBRIDGE_HOME="))
    assert service["ReadWritePaths"] == [home]
    assert service["KillMode"] == ["mixed"], "SIGTERM to the parent alone: it stops the workers in order"


def serve_options(*names: str) -> set[str]:
    command: click.Command = cli
    for name in names:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return {opt for p in command.params for opt in p.opts}


@pytest.mark.parametrize(("unit", "command"), [(PLATFORM, ("platform", "serve")), (GATEWAY, ("gateway", "serve"))],
                         ids=["platform", "gateway"])  # fmt: skip
def test_exec_start_runs_a_command_that_exists_with_options_it_takes(unit: Path, command: tuple[str, ...]) -> None:
    argv = shlex.split(parse(unit)["Service"]["ExecStart"][0])
    assert argv[0].endswith("/medbridge") and tuple(argv[1:3]) == command
    given = {a.split("=", 1)[0] for a in argv[3:] if a.startswith("--")}
    assert given <= serve_options(*command), given - serve_options(*command)
    if "--metrics" in argv:
        host = argv[argv.index("--metrics") + 1].rsplit(":", 1)[0]
        assert host in ("127.0.0.1", "::1", "[::1]"), "the example binds metrics where no job can reach them"


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (Debian package systemd; scripts/setup)")
@pytest.mark.parametrize("unit", [PLATFORM, GATEWAY], ids=lambda u: u.stem)
def test_systemd_analyze_accepts_the_units(unit: Path, tmp_path: Path) -> None:
    """verify: no warning at all (an unknown or misspelt key is one); security: exposure at most 2 of 10."""
    assert SYSTEMD_ANALYZE is not None
    medbridge = Path(sys.executable).with_name("medbridge")  # ExecStart must name an executable that exists
    assert medbridge.exists(), f"{medbridge}: the package is installed in this environment (scripts/setup)"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/medbridge/.venv/bin/medbridge", str(medbridge)))
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stdout.strip() and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(copy)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    assert float(score.group(1)) <= 2.0, security.stdout
