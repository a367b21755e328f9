"""Compute-side commands: ``job run``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from medbridge.compute.job import JobSpec, run


@click.group()
def job() -> None:
    """Run work on a compute node with job-scoped platform access."""


@job.command("run", context_settings={"ignore_unknown_options": False})
@click.option(
    "--platform", "platform_addr", envvar="MEDBRIDGE_PLATFORM", required=True, help="HOST:PORT of the platform."
)
@click.option("--key", "key_file", required=True, type=click.Path(), help="Your enrolment private key.")
@click.option(
    "--host-key-fingerprint",
    envvar="MEDBRIDGE_HOST_KEY_FINGERPRINT",
    required=True,
    help="The platform's host key (SHA256:…), as its operators published it.",
)
@click.option("--user", "user_name", default=None, help="Platform account (default: $MEDBRIDGE_USER, then login).")
@click.option("--job-id", default=None, help="Job id (default: $SLURM_JOB_ID, else a fresh one).")
@click.option(
    "--lifetime",
    type=click.IntRange(min=1),
    default=24 * 3600,
    show_default=True,
    help="Wanted certificate lifetime, seconds; the platform may give less.",
)
@click.option("--dataset", "datasets", multiple=True, help="Limit the job to these datasets (repeatable).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job_run(
    platform_addr: str,
    key_file: str,
    host_key_fingerprint: str,
    user_name: str | None,
    job_id: str | None,
    lifetime: int,
    datasets: Sequence[str],
    command: Sequence[str],
) -> None:
    """Get a job certificate into a private ssh-agent, run COMMAND, then kill the agent.

    COMMAND sees SSH_AUTH_SOCK, MEDBRIDGE_PLATFORM, MEDBRIDGE_USER, MEDBRIDGE_JOB_ID and
    MEDBRIDGE_SSH_CONFIG (use `sftp -F "$MEDBRIDGE_SSH_CONFIG" medbridge`). Its exit
    code is passed through.
    """
    spec = JobSpec(
        platform=platform_addr,
        key_file=key_file,
        host_fingerprint=host_key_fingerprint,
        command=command,
        user=user_name,
        job_id=job_id,
        lifetime=lifetime,
        datasets=list(datasets) or None,
    )
    code = run(spec, os.environ)
    sys.stdout.flush()
    raise click.exceptions.Exit(code)
