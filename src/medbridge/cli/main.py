"""Entry point and the platform-side commands."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TimeRemainingColumn
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from medbridge import __version__, fastpath, logs, processes
from medbridge.cli import ingest as ingest_cli
from medbridge.cli import output
from medbridge.config import Home, metrics_address
from medbridge.control.store import Store
from medbridge.descriptors import raise_limit
from medbridge.errors import InvalidInput, MedbridgeError
from medbridge.logs import FORMATS
from medbridge.net import parse_address, parse_networks, stop_event
from medbridge.platform import anchor as anchor_files
from medbridge.platform.keys import fingerprint, load_private_key, public_line, read_public_key_file
from medbridge.platform.limits import descriptor_shortfall
from medbridge.policy.manifest import manifest_line

F = TypeVar("F", bound=Callable[..., Any])

home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Platform home (default: $MEDBRIDGE_HOME, then ~/.local/share/medbridge).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _actor() -> str:
    try:
        return f"admin:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"admin:uid={os.getuid()}"


def _store(home: Path | None) -> tuple[Home, Store]:
    h = Home.resolve(home)
    settings = h.settings()
    return h, Store(h.database_url(settings))


def _now() -> datetime:
    return datetime.now(UTC)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medbridge")
def cli() -> None:
    """medbridge: batch jobs compute on an isolated medical-image platform, and leave nothing behind.

    Exit codes: 0 ok, 1 error, 2 bad input, 3 home not initialised, 4 not found,
    5 already exists, 6 access denied, 7 integrity check failed, 8 platform
    unavailable, 9 job set-up failed; `job run` passes the payload's code through.
    """


# -- platform ---------------------------------------------------------------------------


@cli.group()
def platform() -> None:
    """Create and serve the data platform."""


@platform.command("init")
@home_option
@click.option(
    "--database-url",
    default="",
    help="Control database on a server, e.g. postgresql+psycopg://medbridge@db.site/medbridge "
    "(default: SQLite in the home).",
)
def platform_init(home: Path | None, database_url: str) -> None:
    """Create a platform home: host key, user CA, control database (at the newest schema), storage."""
    from medbridge.platform.storage import init_home

    h = Home.resolve(home)
    fpr = init_home(h, _actor(), database_url)
    output.out.print(f"initialised platform home {h.root}")
    output.out.print(f"host key fingerprint: {fpr}")
    output.out.print("give this fingerprint to users; `job run --host-key-fingerprint` pins it")


@platform.command("migrate")
@home_option
def platform_migrate(home: Path | None) -> None:
    """Upgrade the control database's schema to this medbridge's (stop every platform first)."""
    from medbridge.control import schema

    h, store = _store(home)
    h.require()
    try:
        before, after = schema.upgrade(store.engine)
    except SQLAlchemyError as exc:
        raise MedbridgeError(f"migration failed, the database is as it was: {exc}") from exc
    finally:
        store.close()
    if before == after:
        output.out.print(f"control database already at schema revision {after}")
    else:
        output.out.print(f"control database upgraded from schema revision {before} to {after}")


@platform.command("fingerprint")
@home_option
def platform_fingerprint(home: Path | None) -> None:
    """Print the host key fingerprint clients pin."""
    h = Home.resolve(home)
    h.require()
    click.echo(fingerprint(load_private_key(h.host_key)))


@platform.command("serve")
@home_option
@click.option("--listen", default="127.0.0.1:2222", show_default=True, help="HOST:PORT to listen on (port 0: any).")
@click.option(
    "--trusted-proxy",
    "trusted",
    multiple=True,
    help="CIDR of a gateway whose PROXY v2 header is believed (repeatable; adds to platform.toml).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Server processes sharing the port (default: one per core).",
)
@click.option(
    "--metrics",
    "metrics_at",
    metavar="[HOST:]PORT",
    default=None,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics; PORT alone is 127.0.0.1 (default: platform.toml's "
    "metrics, else none). A management address only: never one jobs can reach.",
)
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default=None,
    help="Log lines on stderr as text or JSON objects (default: platform.toml's log_format, else text).",
)
def platform_serve(
    home: Path | None,
    listen: str,
    trusted: Sequence[str],
    workers: int | None,
    metrics_at: str | None,
    log_format: str | None,
) -> None:
    """Serve the SFTP data plane and the certificate issuer until SIGTERM/SIGINT.

    SIGTERM stops in order: no new connections, every live one ends with an SSH
    disconnect that says why, the audit is written out, exit 0.
    """
    from medbridge.platform import workers as pool

    h = Home.resolve(home)
    h.require()
    settings = h.settings()
    host, port = parse_address(listen, "--listen")
    metrics_at = settings.metrics if metrics_at is None else metrics_at
    metrics = metrics_address(metrics_at, "--metrics") if metrics_at else None
    key = load_private_key(h.host_key)
    parse_networks(trusted, "--trusted-proxy")
    logs.configure("platform", log_format or settings.log_format)

    count = workers or os.cpu_count() or 1
    processes.keep_freed_memory()  # before the workers fork: they inherit it
    fastpath.enabled()  # decided at start-up, once (one warning if off), before the workers fork
    shortfall = descriptor_shortfall(h.settings(), raise_limit())  # the workers inherit the raised limit
    anchor_files.audit_key(h)  # made here if the home predates it, not by racing workers

    def ready(bound_host: str, bound_port: int, metrics_url: str | None) -> None:
        if shortfall:  # once serving: a platform that cannot start says only why
            logging.getLogger("medbridge.platform").warning("%s", shortfall)
        click.echo(
            f"medbridge platform listening on {bound_host}:{bound_port} host key {fingerprint(key)} "
            f"({count} worker{'s' if count > 1 else ''})"
        )
        if metrics_url is not None:
            click.echo(f"metrics on {metrics_url}")
        sys.stdout.flush()

    if count > 1:
        pool.run(h, host, port, count, trusted, ready, metrics)  # imports prometheus_client after its folder is set
        return

    from medbridge.platform.metrics import MetricsServer, process_metrics
    from medbridge.platform.server import serve

    exporter = MetricsServer(process_metrics().registry, *metrics).start() if metrics else None

    url = exporter.url if exporter else None

    async def main() -> None:
        await serve(h, host, port, ready=lambda a, b: ready(a, b, url), stop=stop_event(), trusted_proxies=trusted)

    try:
        asyncio.run(main())
    finally:
        if exporter is not None:
            exporter.stop()


# -- users and groups -----------------------------------------------------------------


@cli.group()
def user() -> None:
    """Manage platform accounts."""


@user.command("add")
@home_option
@click.argument("name")
@click.option("--key", "keys", multiple=True, required=True, help="Enrolment public key file (repeatable).")
@click.option("--group", "groups", multiple=True, help="Group to join (repeatable).")
def user_add(home: Path | None, name: str, keys: Sequence[str], groups: Sequence[str]) -> None:
    """Create an account with its enrolment key(s)."""
    pubs = [read_public_key_file(k) for k in keys]
    _, store = _store(home)
    store.add_user(name, [(public_line(k), fingerprint(k)) for k in pubs], groups, _now(), _actor())
    output.out.print(f"added user {name} ({', '.join(fingerprint(k) for k in pubs)})")


@user.command("disable")
@home_option
@click.argument("name")
def user_disable(home: Path | None, name: str) -> None:
    """Disable an account; its live sessions end within seconds."""
    _, store = _store(home)
    store.set_enabled(name, False, _now(), _actor())
    output.out.print(f"disabled user {name}")


@user.command("enable")
@home_option
@click.argument("name")
def user_enable(home: Path | None, name: str) -> None:
    """Enable a disabled account again."""
    _, store = _store(home)
    store.set_enabled(name, True, _now(), _actor())
    output.out.print(f"enabled user {name}")


@user.command("list")
@home_option
@json_option
def user_list(home: Path | None, as_json: bool) -> None:
    """List accounts."""
    _, store = _store(home)
    users = store.users()
    if as_json:
        output.emit_json(
            {
                "users": [
                    {"name": u.name, "enabled": u.enabled, "groups": list(u.groups), "keys": list(u.key_fingerprints)}
                    for u in users
                ]
            }
        )
        return
    output.table(
        "users",
        ["name", "enabled", "groups", "keys"],
        [(u.name, u.enabled, ", ".join(u.groups), "\n".join(u.key_fingerprints)) for u in users],
    )


@cli.group()
def node() -> None:
    """Enrol compute nodes: each node's epilog may end the jobs that ran on it, and do nothing else."""


@node.command("add")
@home_option
@click.argument("name")
@click.option("--key", "key_file", required=True, help="The node's public key file (its private key stays root's).")
@click.option(
    "--address",
    "addresses",
    multiple=True,
    required=True,
    help="An address or CIDR the platform sees the node come from (repeatable; through a gateway: PROXY v2).",
)
def node_add(home: Path | None, name: str, key_file: str, addresses: Sequence[str]) -> None:
    """Enrol a compute node: it logs in only from --address and may only end the jobs placed there."""
    key = read_public_key_file(key_file)
    _, store = _store(home)
    added = store.add_node(name, (public_line(key), fingerprint(key)), addresses, _now(), _actor())
    output.out.print(f"added node {name} ({added.fingerprint}) from {', '.join(added.networks)}")


@node.command("remove")
@home_option
@click.argument("name")
def node_remove(home: Path | None, name: str) -> None:
    """Withdraw a node's credential."""
    _, store = _store(home)
    store.remove_node(name, _now(), _actor())
    output.out.print(f"removed node {name}")


@node.command("list")
@home_option
@json_option
def node_list(home: Path | None, as_json: bool) -> None:
    """List enrolled compute nodes."""
    _, store = _store(home)
    nodes = store.nodes()
    if as_json:
        output.emit_json({"nodes": [{"name": n.name, "key": n.fingerprint, "addresses": list(n.networks)}
                                    for n in nodes]})  # fmt: skip
        return
    output.table("nodes", ["name", "key", "addresses"], [(n.name, n.fingerprint, ", ".join(n.networks)) for n in nodes])


@cli.group()
def group() -> None:
    """Manage groups (e.g. a medical society's members)."""


@group.command("add")
@home_option
@click.argument("name")
def group_add(home: Path | None, name: str) -> None:
    """Create a group."""
    _, store = _store(home)
    store.add_group(name, _now(), _actor())
    output.out.print(f"added group {name}")


@group.command("add-member")
@home_option
@click.argument("name")
@click.argument("user_name", metavar="USER")
def group_add_member(home: Path | None, name: str, user_name: str) -> None:
    """Add USER to group NAME."""
    _, store = _store(home)
    store.add_member(user_name, name, _now(), _actor())
    output.out.print(f"added {user_name} to group {name}")


# -- datasets -------------------------------------------------------------------------


@cli.group()
def dataset() -> None:
    """Manage datasets."""


@dataset.command("add")
@home_option
@click.argument("name")
@click.option("--from", "src", required=True, type=click.Path(path_type=Path), help="Folder to copy in.")
@click.option("--provider", default="", help="Who provided the data (e.g. a society).")
@click.option(
    "--profile",
    type=click.Path(path_type=Path),
    default=None,
    help="Anonymisation profile (TOML); default: the built-in DICOM PS3.15 basic profile.",
)
@click.option("--pseudonym", "pseudonyms", multiple=True, metavar="KEYWORD=REGEX", help=ingest_cli.PSEUDONYM_HELP)
@click.option(
    "--allow-report", is_flag=True, help="Administrator: accept the dataset although files fail the profile (audited)."
)
@click.option(
    "--update",
    is_flag=True,
    help="Add to an existing dataset: only new files and files whose size or time changed are hashed and recorded; "
    "files missing from the folder are kept (and reported).",
)
def dataset_add(home: Path | None, name: str, src: Path, provider: str, profile: Path | None,
                pseudonyms: tuple[str, ...], allow_report: bool, update: bool) -> None:  # fmt: skip
    """Copy a folder into platform storage: anonymisation gate, SHA-256 manifest, all or nothing.

    Streams (memory stays flat whatever the file count); --update adds to an existing dataset.
    """
    from medbridge.errors import NotAnonymised
    from medbridge.ingest.gate import GateTally
    from medbridge.platform.storage import add_dataset, count_source, update_dataset

    rules = ingest_cli.gate_profile(profile, pseudonyms)
    h, store = _store(home)
    tally = GateTally(rules.name)
    files, total = count_source(src)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), _FilesPerSecond(),
                      TimeRemainingColumn(), console=output.err, transient=True,
                      disable=not output.err.is_terminal) as bar:  # fmt: skip
            task = bar.add_task(f"{'updating' if update else 'copying'} {name}", total=files)

            def progress(n: int, _size: int) -> None:
                bar.advance(task, n)

            if update:
                done = update_dataset(h, store, name, src, _actor(), progress, rules, allow_report, tally)
                info = done.info
            else:
                info, _ = add_dataset(h, store, name, src, provider, _actor(), progress, rules, allow_report, tally)
    except NotAnonymised:
        _print_failures(tally.failed)
        raise
    if not tally.passed:
        _print_failures(tally.failed)
        output.err.print(f"accepted by an administrator despite {tally.failed_count} failing file(s) (audited)")
    types = ", ".join(f"{n} {t}" for t, n in sorted(tally.media_types.items()))
    if update:
        output.out.print(f"updated dataset {name} to version {info.version}: {done.added} new, {done.changed} changed, "
                         f"{done.unchanged} unchanged ({types or 'nothing new'}); now {info.files} files, "
                         f"{info.bytes} bytes")  # fmt: skip
        if done.missing:
            output.err.print(f"{done.missing} recorded file(s) are not in {src} and were kept "
                             f"(first: {', '.join(done.missing_examples[:3])})")  # fmt: skip
        return
    output.out.print(f"added dataset {name}: {info.files} files, {total} bytes ({types})")


class _FilesPerSecond(ProgressColumn):
    """How many files a second a long ingest is going at."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} files/s", style="progress.data.speed")


def _print_failures(failed: Sequence[Any]) -> None:
    for f in failed:
        for issue in f.issues:
            output.err.print(f"  {f.path}: {issue.tag} {issue.keyword}: {issue.reason}", markup=False, highlight=False)


@dataset.command("pack")
@home_option
@click.argument("name")
@click.option("--shard-size", default="256MB", show_default=True, help="Largest shard (e.g. 64MB, 1GiB).")
def dataset_pack(home: Path | None, name: str, shard_size: str) -> None:
    """Pack a dataset's files into indexed tar shards beside them (served as /datasets/NAME/.shards/)."""
    from medbridge.ingest.shards import parse_size
    from medbridge.platform.storage import pack_dataset

    size = parse_size(shard_size)
    h, store = _store(home)
    shards = pack_dataset(h, store, name, size, _actor())
    members = sum(len(s.members) for s in shards)
    output.out.print(f"packed {members} files of {name} into {len(shards)} shard(s) of at most {shard_size}")


@dataset.command("list")
@home_option
@json_option
def dataset_list(home: Path | None, as_json: bool) -> None:
    """List datasets."""
    _, store = _store(home)
    rows = store.datasets()
    if as_json:
        output.emit_json(
            {
                "datasets": [
                    {
                        "name": d.name,
                        "provider": d.provider,
                        "files": d.files,
                        "bytes": d.bytes,
                        "created_at": d.created_at.isoformat(),
                    }
                    for d in rows
                ]
            }
        )
        return
    output.table(
        "datasets",
        ["name", "provider", "files", "bytes", "created"],
        [(d.name, d.provider, d.files, d.bytes, d.created_at.strftime("%Y-%m-%d %H:%M")) for d in rows],
    )


@dataset.command("manifest")
@home_option
@click.argument("name")
@json_option
def dataset_manifest(home: Path | None, name: str, as_json: bool) -> None:
    """Print a dataset's manifest in sha256sum format (--json adds sizes and media types)."""
    _, store = _store(home)
    out = sys.stdout
    with store.manifest_rows(name) as (_info, rows):
        if as_json:  # one entry per line, so memory stays flat however large the dataset
            out.write(f'{{"dataset": {json.dumps(name)}, "files": [')
            for i, m in enumerate(rows):
                out.write(("\n  " if i == 0 else ",\n  ") + json.dumps(m.__dict__))
            out.write("\n]}\n")
            return
        for m in rows:
            out.write(manifest_line(m.sha256, m.path))


# -- grants ---------------------------------------------------------------------------


def parse_until(value: str | None, now: datetime) -> datetime | None:
    """``YYYY-MM-DD`` means through that day (UTC); a full ISO time is taken as given (UTC if naive)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            end = datetime.combine(date.fromisoformat(value) + timedelta(days=1), time(), tzinfo=UTC)
        else:
            end = datetime.fromisoformat(value)
            end = end if end.tzinfo else end.replace(tzinfo=UTC)
    except ValueError as exc:
        raise InvalidInput(f"--until {value!r}: use YYYY-MM-DD or an ISO 8601 time") from exc
    if end <= now:
        raise InvalidInput(f"--until {value!r} is already past")
    return end


@cli.command("grant")
@home_option
@click.argument("subject", metavar="USER|@GROUP")
@click.argument("dataset_name", metavar="DATASET")
@click.option("--until", default=None, help="Last day (YYYY-MM-DD, through that day UTC) or ISO time.")
def grant_cmd(home: Path | None, subject: str, dataset_name: str, until: str | None) -> None:
    """Give a user or @group read access to a dataset."""
    _, store = _store(home)
    now = _now()
    end = parse_until(until, now)
    store.grant(subject, dataset_name, end, now, _actor())
    output.out.print(f"granted {dataset_name} to {subject}" + (f" until {end.isoformat()}" if end else ""))


@cli.command("revoke")
@home_option
@click.argument("subject", metavar="USER|@GROUP")
@click.argument("dataset_name", metavar="DATASET")
def revoke_cmd(home: Path | None, subject: str, dataset_name: str) -> None:
    """Take a grant back; sessions relying on it end within seconds."""
    _, store = _store(home)
    store.revoke(subject, dataset_name, _now(), _actor())
    output.out.print(f"revoked {dataset_name} from {subject}")


@cli.command("grants")
@home_option
@json_option
def grants_cmd(home: Path | None, as_json: bool) -> None:
    """List grants."""
    _, store = _store(home)
    rows = store.grants()
    if as_json:
        output.emit_json(
            {
                "grants": [
                    {
                        "subject": g.subject,
                        "dataset": g.dataset,
                        "until": g.expires_at.isoformat() if g.expires_at else None,
                    }
                    for g in rows
                ]
            }
        )
        return
    output.table(
        "grants",
        ["dataset", "to", "until"],
        [(g.dataset, g.subject, g.expires_at.isoformat() if g.expires_at else "no end") for g in rows],
    )


# -- audit ----------------------------------------------------------------------------

_ANCHOR_PATH = click.Path(dir_okay=False, path_type=Path)


@cli.group("audit", invoke_without_command=True)
@home_option
@json_option
@click.option("--last", type=click.IntRange(1, 10**9), default=None, help="Only the last N entries.")
@click.option("--action", default=None, help="Only entries of this action (e.g. sftp.refused).")
@click.option("--user", default=None, help="Only entries whose actor is this user.")
@click.option("--job", default=None, help="Only entries about this job.")
@click.option("--dataset", default=None, help="Only entries about this dataset.")
@click.option("--since", default=None, help="From this day (YYYY-MM-DD, UTC) or ISO time on.")
@click.option("--until", default=None, help="Through this day (YYYY-MM-DD, UTC) or up to this ISO time.")
@click.pass_context
def audit_cmd(
    ctx: click.Context,
    home: Path | None,
    as_json: bool,
    last: int | None,
    action: str | None,
    user: str | None,
    job: str | None,
    dataset: str | None,
    since: str | None,
    until: str | None,
) -> None:
    """Show the audit log (hash-chained; `audit verify` checks it, `audit anchor` signs its head).

    Every filter is answered by an index, however long the chain.
    """
    if ctx.invoked_subcommand is not None:
        return
    for option, value in (("--action", action), ("--user", user), ("--job", job), ("--dataset", dataset)):
        _utf8(option, value)
    _, store = _store(home)
    records = store.audit_records(last=last, action=action, user=user, job=job, dataset=dataset,
                                  since=_audit_time("--since", since, end=False),
                                  until=_audit_time("--until", until, end=True))  # fmt: skip
    if as_json:
        output.emit_json({"entries": [r.as_dict() for r in records]})
        return
    for r in records:
        output.out.print(
            f"{r.seq:>6}  {r.at:%Y-%m-%d %H:%M:%S}  {r.actor:<12} {r.action:<18} {r.outcome:<8} "
            f"{r.subject or '-'}  {r.detail}",
            highlight=False,
            markup=False,
        )


def _audit_time(option: str, value: str | None, *, end: bool) -> datetime | None:
    """A day (its start, or with ``end`` the start of the next) or an ISO time (UTC if naive)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value) + timedelta(days=int(end)), time(), tzinfo=UTC)
        at = datetime.fromisoformat(value)
        return at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"{option} {value!r}: use YYYY-MM-DD or an ISO 8601 time from 0001 to 9999") from exc


def _utf8(option: str, value: str | None) -> None:
    """A filter that is not UTF-8 text (bytes a shell passed through) names nothing: say so, not a traceback."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{option}: not UTF-8 text") from exc


@audit_cmd.command("verify")
@home_option
@json_option
@click.option("--anchor", "anchors", multiple=True, type=_ANCHOR_PATH,
              help="A published anchor the chain must still contain, unchanged (repeatable).")  # fmt: skip
@click.option("--from", "since", type=_ANCHOR_PATH, default=None,
              help="A trusted anchor from an earlier verification: check only the entries after it.")  # fmt: skip
@click.option("--key", type=_ANCHOR_PATH, default=None,
              help="The audit public key (default: the home's keys/audit_ed25519.pub; keep a copy too).")  # fmt: skip
def audit_verify(
    home: Path | None, as_json: bool, anchors: tuple[Path, ...], since: Path | None, key: Path | None
) -> None:
    """Check every link and signed checkpoint of the chain; exit 7 at the first that fails.

    With --anchor, a chain cut below the anchor or rewritten up to it fails too.
    """
    h, store = _store(home)
    check = anchor_files.checker(anchor_files.public_key(h, key))
    published = [anchor_files.read_anchor(a, check) for a in anchors]
    start = anchor_files.read_anchor(since, check) if since else None
    walk = store.verify_chain(start=start, anchors=published, check=check)
    summary = {
        "intact": True,
        "entries_checked": walk.entries,
        "from_entry": start.seq + 1 if start else 1,
        "last_entry": walk.last,
        "head": walk.prev_hash,
        "checkpoints": walk.checkpoints,
        "anchors": [{"seq": a.seq, "hash": a.hash} for a in published],
    }
    if as_json:
        output.emit_json(summary)
        return
    where = f" after the anchor at entry {start.seq}" if start else ""
    met = f"; {len(published)} anchor(s) met" if published else ""
    output.ok(f"audit chain intact: {walk.entries} entries checked{where}, up to entry {walk.last}; "
              f"{walk.checkpoints} signed checkpoint(s){met}")  # fmt: skip


@audit_cmd.command("anchor")
@home_option
@json_option
@click.option("--out", type=_ANCHOR_PATH, default=None,
              help="Also write the anchor here: the file to ship off the platform.")  # fmt: skip
@click.option("--from", "since", type=_ANCHOR_PATH, default=None,
              help="The previous anchor: verify only the entries after it before signing.")  # fmt: skip
def audit_anchor(home: Path | None, as_json: bool, out: Path | None, since: Path | None) -> None:
    """Verify the chain, sign its head into it as a checkpoint, and write the anchor.

    The anchor goes to the home's audit-anchor.json (the platform also writes one
    there at every checkpoint) and to --out.
    """
    h, store = _store(home)
    check = anchor_files.checker(anchor_files.public_key(h, None))
    start = anchor_files.read_anchor(since, check) if since else None
    store.verify_chain(start=start, check=check)
    signed = anchor_files.checkpoint(h, store)
    if out is not None:
        try:
            anchor_files.write_anchor(out, signed)
        except OSError as exc:
            raise InvalidInput(f"cannot write the anchor to {out}: {exc.strerror or exc}") from exc
    if as_json:
        output.emit_json({"seq": signed.seq, "hash": signed.hash, "key": signed.key, "at": signed.at,
                          "files": [str(h.audit_anchor), *([str(out)] if out else [])]})  # fmt: skip
        return
    output.ok(f"anchored entry {signed.seq} ({signed.hash[:16]}…) signed by {signed.key}; "
              f"ship {out or h.audit_anchor} off the platform")  # fmt: skip


# -- compute side -----------------------------------------------------------------------

from medbridge.cli.bench import bench  # noqa: E402
from medbridge.cli.demo import demo  # noqa: E402
from medbridge.cli.gateway import gateway  # noqa: E402
from medbridge.cli.ingest import ingest, shard  # noqa: E402
from medbridge.cli.job import job, residue, slurm  # noqa: E402

cli.add_command(job)
cli.add_command(residue)
cli.add_command(slurm)
cli.add_command(demo)
cli.add_command(gateway)
cli.add_command(bench)
cli.add_command(ingest)
cli.add_command(shard)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; every medbridge error becomes one line on stderr and its exit code."""
    try:
        rc = cli.main(args=list(argv) if argv is not None else None, prog_name="medbridge", standalone_mode=False)
    except MedbridgeError as exc:
        output.error(str(exc))
        return exc.exit_code
    except click.exceptions.Abort:
        output.error("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        output.error("interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # the CLI boundary: a bug must still not print a traceback at users
        if os.environ.get("MEDBRIDGE_DEBUG"):
            raise
        output.error(f"internal error ({type(exc).__name__}: {exc}); rerun with MEDBRIDGE_DEBUG=1 for details")
        return 1
    return rc if isinstance(rc, int) else 0


def entry() -> None:
    sys.exit(main())
