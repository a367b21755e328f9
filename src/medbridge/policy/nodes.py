"""Compute nodes as principals: a node logs in from its own addresses and may end only the jobs placed there.

A node's credential is for the Slurm epilog, which runs as root on the node after
every job.  Its one permitted command ends the jobs that asked for certificates,
from one of the node's addresses, saying they were that Slurm job; it opens no
data and gets no certificate.  A job names its Slurm job itself (a user could lie),
but a lie only exposes the liar's own job to an early end; the node's address is
what the platform saw, through a trusted gateway's PROXY header if there is one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from medbridge.errors import InvalidInput
from medbridge.policy.names import check_name

#: A node logs in as ``node:<name>``; no user name can contain ':', so the two never meet.
NODE_LOGIN_PREFIX = "node:"
_SLURM_JOB = re.compile(r"[0-9]{1,20}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, kw_only=True)
class NodeFact:
    """An enrolled node, as recorded."""

    name: str
    fingerprint: str
    networks: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where a job asked for a certificate from, and which Slurm job it said it was."""

    user: str
    job_id: str
    slurm_job_id: str
    address: str


def node_name(login: str) -> str | None:
    """The node a login name stands for, or None for a user's login."""
    if not login.startswith(NODE_LOGIN_PREFIX):
        return None
    return check_name("node", login.removeprefix(NODE_LOGIN_PREFIX))


def check_networks(values: Sequence[str]) -> tuple[str, ...]:
    """A node's addresses as CIDRs (a bare address is a network of one); at least one."""
    if not values:
        raise InvalidInput("a node needs at least one --address (the address the platform sees it come from)")
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError as exc:
            raise InvalidInput(f"node address {value!r} is not an address or network ({exc})") from exc
    return tuple(out)


def check_slurm_job(value: object) -> str:
    """A Slurm job id as a job or a node may send it: digits only."""
    if not isinstance(value, str) or not _SLURM_JOB.fullmatch(value):
        raise InvalidInput(f"a Slurm job id is 1-20 digits, not {str(value)[:40]!r}")
    return value


def within(address: str, networks: Sequence[str]) -> bool:
    """Is ``address`` one of ``networks``?  Anything that is not an IP address is not."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n) for n in networks)


def may_log_in(node: NodeFact, address: str) -> str | None:
    """Why the node may not log in from ``address``, or None if it may."""
    if within(address, node.networks):
        return None
    return f"node {node.name!r} logs in only from {', '.join(node.networks)}, not from {address}"


def jobs_to_end(node: NodeFact, slurm_job_id: str, placements: Sequence[Placement]) -> list[tuple[str, str]]:
    """``(user, job id)`` of each job the node may end for this Slurm job: placed from one of its addresses."""
    out = {
        (p.user, p.job_id) for p in placements if p.slurm_job_id == slurm_job_id and within(p.address, node.networks)
    }
    return sorted(out)
