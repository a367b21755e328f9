"""The compute node's own credential: the Slurm epilog ends the node's jobs on the platform with it.

``/etc/medbridge/node.toml`` (root's, like the key it names)::

    platform = "gateway.hpc.example:2201"
    host_key_fingerprint = "SHA256:…"
    node = "bridge01"                      # as enrolled: medbridge node add bridge01 --key … --address …
    key = "/etc/medbridge/node_ed25519"    # mode 0600, root's

The platform lets the node log in only from the addresses it was enrolled with, and
run one command: end the jobs that asked for certificates from those addresses as a
given Slurm job (policy.nodes).  It opens no data and gets no certificate.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from medbridge.compute.credentials import Enrolment, call_platform
from medbridge.config import check_keys
from medbridge.errors import InvalidInput
from medbridge.net import parse_address
from medbridge.platform.issuer import END_JOB_COMMAND
from medbridge.platform.keys import read_private_key_file
from medbridge.policy.names import check_name
from medbridge.policy.nodes import NODE_LOGIN_PREFIX, check_slurm_job

DEFAULT_NODE_CONFIG = Path("/etc/medbridge/node.toml")


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    """How this node reaches the platform as itself."""

    platform: str
    host_key_fingerprint: str
    node: str
    key: Path

    @classmethod
    def load(cls, path: Path) -> NodeSettings:
        """Read ``node.toml``; unknown keys, a missing field or a key file others may read are refused."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"node settings {path}: {exc}") from exc
        fields = ("platform", "host_key_fingerprint", "node", "key")
        check_keys(data, fields, str(path))
        missing = [f for f in fields if not isinstance(data.get(f), str)]
        if missing:
            raise InvalidInput(f"node settings {path}: {', '.join(missing)} missing (each a string)")
        settings = cls(platform=data["platform"], host_key_fingerprint=data["host_key_fingerprint"],
                       node=check_name("node", data["node"]), key=Path(data["key"]))  # fmt: skip
        parse_address(settings.platform, f"{path}: platform")
        settings.check_key_file()
        return settings

    def check_key_file(self) -> None:
        """The node's key is root's secret: refuse one that another user could read or replace."""
        try:
            st = os.stat(self.key)
        except OSError as exc:
            raise InvalidInput(f"node key {self.key}: {exc.strerror}") from exc
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o077:
            raise InvalidInput(
                f"node key {self.key} is mode {stat.S_IMODE(st.st_mode):04o}, owned by uid {st.st_uid}: "
                f"it must be readable by its owner (root) alone (chmod 600 {self.key})"
            )

    def enrolment(self) -> Enrolment:
        host, port = parse_address(self.platform, "platform")
        key: asyncssh.SSHKey = read_private_key_file(str(self.key))
        return Enrolment(host, port, f"{NODE_LOGIN_PREFIX}{self.node}", key, self.host_key_fingerprint)


async def end_slurm_job(settings: NodeSettings, slurm_job_id: str) -> dict[str, Any]:
    """Tell the platform that Slurm job ``slurm_job_id`` ended on this node: its jobs' certificates are revoked.

    The reply lists the jobs ended (``user``, ``job_id``, ``revoked``); none when the
    job's own ``job run`` had already ended it, or when it never used the platform.
    """
    reply, _ = await call_platform(
        settings.enrolment(), END_JOB_COMMAND, {"slurm_job_id": check_slurm_job(slurm_job_id)}
    )
    return reply
