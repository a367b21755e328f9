"""Compute-side commands: ``job run`` and ``residue scan``."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from medbridge.cli import output
from medbridge.cli.types import Seconds
from medbridge.compute import residue as residue_mod
from medbridge.compute.credentials import Enrolment, PlatformLookup
from medbridge.compute.job import JobSpec, run
from medbridge.errors import InvalidInput
from medbridge.net import parse_address
from medbridge.platform.keys import read_private_key_file
from medbridge.policy.names import check_name

PATH = click.Path(path_type=Path)
#: A folder (an existing file is refused by click with a one-line usage error, exit 2).
FOLDER = click.Path(path_type=Path, file_okay=False)
#: A file (an existing folder is refused the same way).
FILE = click.Path(path_type=Path, dir_okay=False)
TOLERANCE = click.option(
    "--outage-tolerance", type=Seconds(min_open=True), default=None,
    help="Seconds a silent link to the platform may last before the job gives up "
    "(default: as long as the platform allows, 2400 unless its operators changed it).",
)  # fmt: skip
F = TypeVar("F", bound=Callable[..., Any])


def platform_access(command: F) -> F:
    """The options every compute-side command needs to reach the platform as a user."""
    for option in reversed([
        click.option("--platform", "platform_addr", envvar="MEDBRIDGE_PLATFORM", required=True,
                     help="HOST:PORT of the platform."),
        click.option("--key", "key_file", required=True, type=click.Path(), help="Your enrolment private key."),
        click.option("--host-key-fingerprint", envvar="MEDBRIDGE_HOST_KEY_FINGERPRINT", required=True,
                     help="The platform's host key (SHA256:…), as its operators published it."),
        click.option("--user", "user_name", default=None,
                     help="Platform account (default: $MEDBRIDGE_USER, then login)."),
    ]):  # fmt: skip
        command = option(command)
    return command


@click.group()
def job() -> None:
    """Run work on a compute node with job-scoped platform access."""


@job.command("run")
@platform_access
@click.option("--job-id", default=None, help="Job id (default: $SLURM_JOB_ID, else a fresh one).")
@click.option(
    "--lifetime",
    type=click.IntRange(min=1),
    default=24 * 3600,
    show_default=True,
    help="Wanted certificate lifetime, seconds; the platform may give less, and the job renews it.",
)
@click.option("--dataset", "datasets", multiple=True, help="Limit the job to these datasets (repeatable).")
@click.option("--mount", type=FOLDER, default=None, help="Mount the job's view here with sshfs (MEDBRIDGE_MOUNT).")
@click.option(
    "--outputs", type=FOLDER, default=None, help="Folder whose files are uploaded to the job's results at the end."
)
@click.option("--scan", "scan", multiple=True, type=PATH, help="Also scan this path for residue (repeatable).")
@click.option(
    "--scratch",
    "scratch",
    multiple=True,
    type=PATH,
    help="A folder that is this job's alone: medical files written there during the job are purged (repeatable).",
)
@click.option(
    "--purge/--no-purge",
    default=None,
    help="Delete residue proven to be the job's (default: on inside Slurm, else off).",
)
@click.option("--report", type=FILE, default=None, help="Write what happened as JSON here.")
@TOLERANCE
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job_run(
    platform_addr: str,
    key_file: str,
    host_key_fingerprint: str,
    user_name: str | None,
    job_id: str | None,
    lifetime: int,
    datasets: Sequence[str],
    mount: Path | None,
    outputs: Path | None,
    scan: Sequence[Path],
    scratch: Sequence[Path],
    purge: bool | None,
    report: Path | None,
    outage_tolerance: float | None,
    command: Sequence[str],
) -> None:
    """Get a job certificate into a private ssh-agent, run COMMAND, then tear down.

    COMMAND sees SSH_AUTH_SOCK, MEDBRIDGE_PLATFORM, MEDBRIDGE_USER, MEDBRIDGE_JOB_ID,
    MEDBRIDGE_RESULTS, MEDBRIDGE_SSH_CONFIG (use `sftp -F "$MEDBRIDGE_SSH_CONFIG" medbridge`)
    and, with --mount, MEDBRIDGE_MOUNT; TMPDIR is a folder made for the job.  Afterwards:
    outputs uploaded and committed, mount and agent gone, residue scanned (working folder,
    $TMPDIR, --scan and --scratch paths).  A purge deletes only copies of dataset files and
    medical files written during the job in its own folders (--scratch, its $TMPDIR, a
    private /tmp); other medical files are reported and left in place.
    Its exit code is the payload's (128+N after signal N; 9 if uploading outputs failed).
    A silent cut of the link shorter than the outage tolerance is waited out; a longer
    one ends the job with a line naming it, and a failed payload's outputs are uploaded
    but not committed.
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
        mount=mount,
        outputs=outputs,
        scan=list(scan),
        scratch=list(scratch),
        purge=purge,
        report=report,
        outage_tolerance=outage_tolerance,
    )
    code = run(spec, os.environ)
    sys.stdout.flush()
    raise click.exceptions.Exit(code)


@click.group()
def residue() -> None:
    """Find medical data left on a compute node."""


@residue.command("scan")
@click.argument("paths", nargs=-1, required=True, type=PATH)
@click.option("--manifest", "manifests", multiple=True, type=PATH, help="sha256sum-format manifest (repeatable).")
@click.option(
    "--platform",
    "platform_address",
    default=None,
    metavar="HOST:PORT",
    help="Ask the platform which hashes are dataset files (with --key, --host-key-fingerprint, --job-id).",
)
@click.option("--key", "key_file", default=None, type=PATH, help="Enrolment key for --platform.")
@click.option("--host-key-fingerprint", "host_fingerprint", default=None, help="The platform's pinned host key.")
@click.option("--user", "user_name", default=None, help="Platform account (default: $MEDBRIDGE_USER, then login).")
@click.option("--job-id", default=None, help="The job whose datasets count (its certificates named them).")
@click.option("--purge", is_flag=True, help="Delete what is proven platform data (see below).")
@click.option("--exclude", "excludes", multiple=True, type=PATH, help="A path not to enter (repeatable).")
@click.option("--since", default=None, help="When the job started (ISO 8601, or seconds since the epoch).")
@click.option(
    "--scratch",
    "scratch",
    multiple=True,
    type=PATH,
    help="A folder that was the job's alone (repeatable; needs --since).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def residue_scan(
    paths: Sequence[Path], manifests: Sequence[Path], platform_address: str | None, key_file: Path | None,
    host_fingerprint: str | None, user_name: str | None, job_id: str | None, purge: bool, excludes: Sequence[Path],
    since: str | None, scratch: Sequence[Path], as_json: bool,
) -> None:  # fmt: skip
    """Scan PATHS for dataset copies (by SHA-256) and medical-image signatures.

    Files are hashed and looked up in chunks: in --manifest files (streamed, never loaded
    whole) or on the platform (--platform, with the enrolment key: which hashes are files
    of the job's datasets).  --purge deletes the dataset copies found, and, given a job's
    start (--since) and its own folders (--scratch), medical files written in those
    folders since then.  Every other medical file is reported with why and left in place;
    those older than --since count as pre-existing, not as residue.

    Exits 0 when nothing is left behind (nothing found, or all of it purged), 10 otherwise.
    """
    if scratch and since is None:
        raise InvalidInput("--scratch needs --since: only files written since the job started are the job's")
    lookup: residue_mod.Lookup | None = residue_mod.ManifestFiles(manifests) if manifests else None
    if platform_address is not None:
        if manifests or key_file is None or host_fingerprint is None or job_id is None:
            raise InvalidInput("--platform needs --key, --host-key-fingerprint and --job-id (and no --manifest)")
        host, port = parse_address(platform_address)
        user = check_name("user", user_name or os.environ.get("MEDBRIDGE_USER") or getpass.getuser())
        enrolment = Enrolment(host, port, user, read_private_key_file(str(key_file)), host_fingerprint)
        lookup = PlatformLookup(enrolment, check_name("job id", job_id))
    job = residue_mod.JobContext(started=None if since is None else _parse_since(since), scratch=scratch)
    report = residue_mod.scan(paths, lookup, exclude=excludes, job=job)
    if purge:
        residue_mod.purge(report)
    if as_json:
        output.emit_json(report.as_dict())
    else:
        for f in report.findings:
            state = "purged" if f.purged else "left  "
            output.out.print(f"{state}  {f.path}  ({f.reason}; {f.why})", markup=False)
        for f in report.preexisting:
            output.out.print(f"old     {f.path}  ({f.reason}; {f.why})", markup=False)
        for e in report.errors:
            output.err.print(f"unreadable: {e}", markup=False)
        state = "clean" if not report.findings else f"{len(report.findings)} found"
        if report.preexisting:
            state += f", {len(report.preexisting)} pre-existing left in place"
        output.out.print(f"{report.files_scanned} files scanned, {report.bytes_hashed} bytes hashed: {state}")
    raise click.exceptions.Exit(0 if report.clean else RESIDUE_FOUND)


def _parse_since(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"--since {text!r}: not an ISO 8601 time or seconds since the epoch") from exc
    return (when if when.tzinfo else when.astimezone()).timestamp()


RESIDUE_FOUND = 10


@job.command("submit", context_settings={"ignore_unknown_options": True})
@platform_access
@click.option("--dataset", "datasets", multiple=True, help="Limit the job to these datasets (repeatable).")
@click.option("--mount", default=None, help="Mount point inside the job; '{job}' becomes the job id.")
@click.option("--outputs", default=None, help="Outputs folder inside the job; '{job}' becomes the job id.")
@click.option("--lifetime", type=click.IntRange(min=1), default=None, help="Wanted certificate lifetime, seconds.")
@click.option(
    "--partition",
    envvar="MEDBRIDGE_PARTITION",
    default="bridge",
    show_default=True,
    help="The dedicated partition that may reach the platform.",
)
@click.option(
    "--nodes",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Nodes of the job; on several, each runs its own job run (platform job '<Slurm job id>-n<node index>').",
)
@click.option("--sbatch", "sbatch_args", multiple=True, help="An option passed to sbatch as is (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the batch script instead of submitting it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@TOLERANCE
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job_submit(
    platform_addr: str, key_file: str, host_key_fingerprint: str, user_name: str | None, datasets: Sequence[str],
    mount: str | None, outputs: str | None, lifetime: int | None, partition: str, nodes: int,
    sbatch_args: Sequence[str], dry_run: bool, as_json: bool, outage_tolerance: float | None, command: Sequence[str],
) -> None:  # fmt: skip
    """Submit COMMAND as a Slurm batch job wrapped in `job run` on the dedicated partition."""
    from medbridge.compute.slurm import Submission, batch_script, submit

    args = ["--platform", platform_addr, "--key", str(Path(key_file).absolute()),
            "--host-key-fingerprint", host_key_fingerprint]  # fmt: skip
    for flag, value in (("--user", user_name), ("--mount", mount), ("--outputs", outputs)):
        if value:
            args += [flag, value]
    if lifetime:
        args += ["--lifetime", str(lifetime)]
    if outage_tolerance:
        args += ["--outage-tolerance", f"{outage_tolerance:g}"]
    for d in datasets:
        args += ["--dataset", d]
    sub = Submission(command=command, job_run_args=args, partition=partition, sbatch_args=sbatch_args, nodes=nodes)
    if dry_run:
        click.echo(batch_script(sub), nl=False)
        return
    job_id, script = submit(sub, os.environ)
    if as_json:
        output.emit_json({"job_id": job_id, "partition": partition, "nodes": nodes, "script": script})
    else:
        output.out.print(f"submitted job {job_id} to partition {partition}")


@click.group()
def slurm() -> None:
    """Node-side Slurm integration for administrators."""


@slurm.command("epilog")
@click.option(
    "--state-dir",
    type=PATH,
    default=Path("/var/spool/medbridge"),
    show_default=True,
    help="Where job run leaves state for the epilog (MEDBRIDGE_STATE_DIR in jobs).",
)
@click.option("--container-base", type=PATH, default=None, help="job_container/tmpfs BasePath, to scan the job's /tmp.")
@click.option(
    "--node-config",
    type=PATH,
    default=None,
    envvar="MEDBRIDGE_NODE_CONFIG",
    help="The node's credential on the platform (default: /etc/medbridge/node.toml if it exists).",
)
@click.option("--strict", is_flag=True, help="Exit non-zero when residue remains (Slurm drains a node on that).")
def slurm_epilog(state_dir: Path, container_base: Path | None, node_config: Path | None, strict: bool) -> None:
    """End the job on the platform, kill its leftovers, unmount, scan for residue and purge; print a JSON report.

    With the node's credential (--node-config) the platform revokes the job's
    certificates first thing, even if job run was killed before it could say so.
    """
    from medbridge.compute.node import DEFAULT_NODE_CONFIG, NodeSettings
    from medbridge.compute.slurm import epilog

    notes = []
    node = None
    path = node_config or (DEFAULT_NODE_CONFIG if DEFAULT_NODE_CONFIG.exists() else None)
    if path is None:
        notes.append("no node credential (--node-config): the platform learns the job ended only from job run")
    else:
        try:
            node = NodeSettings.load(path)
        except InvalidInput as exc:  # the rest of the epilog still runs; the report says why the call did not
            notes.append(f"node credential unusable: {exc}")
    report = epilog(os.environ, state_dir, container_base, node=node)
    report.notes[:0] = notes
    output.emit_json(report.__dict__)
    left = report.still_mounted or (report.residue and not report.residue.get("clean", True))
    raise click.exceptions.Exit(RESIDUE_FOUND if strict and left else 0)
