"""``medbridge ingest`` (the anonymisation gate, CT series to volumes) and ``medbridge shard``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from medbridge.cli import output

PATH = click.Path(path_type=Path)
GATE_FAILED = 11


@click.group()
def ingest() -> None:
    """Check data before it enters the platform; build volumes from DICOM series."""


@ingest.command("check")
@click.argument("folder", type=PATH)
@click.option("--profile", type=PATH, default=None, help="Anonymisation profile (TOML); default: PS3.15 basic.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def ingest_check(folder: Path, profile: Path | None, as_json: bool) -> None:
    """Run the anonymisation gate alone; exit 0 if every file passes, 11 if any fails."""
    from medbridge.errors import InvalidInput
    from medbridge.ingest.gate import check_tree
    from medbridge.ingest.profile import load_profile

    if not folder.is_dir():
        raise InvalidInput(f"{folder}: not a directory")
    report = check_tree(folder, load_profile(profile))
    if as_json:
        output.emit_json(report.as_dict())
    else:
        for f in report.files:
            mark = "ok  " if f.passed else "FAIL"
            output.out.print(f"{mark} {f.media_type:<26} {f.path}", markup=False, highlight=False)
            for issue in f.issues:
                output.out.print(f"       {issue.tag} {issue.keyword}: {issue.reason}", markup=False, highlight=False)
        verdict = "passed" if report.passed else f"{len(report.failed)} file(s) failed"
        output.out.print(f"{len(report.files)} files, profile {report.profile}: {verdict}")
    raise click.exceptions.Exit(0 if report.passed else GATE_FAILED)


@ingest.command("series")
@click.argument("folder", type=PATH)
@click.option("--to", "fmt", type=click.Choice(["nifti", "npy"]), default="nifti", show_default=True)
@click.option("--out", type=PATH, required=True, help="Folder for the volumes (created).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def ingest_series(folder: Path, fmt: Literal["nifti", "npy"], out: Path, as_json: bool) -> None:
    """Build one 3-D volume per DICOM series (slices ordered by position, rescale applied, spacing kept)."""
    from medbridge.ingest.series import build_volumes, write_volume

    volumes = build_volumes(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, v in enumerate(volumes):
        suffix = ".nii" if fmt == "nifti" else ".npy"
        dest = write_volume(v, out / f"series-{i + 1:03d}{suffix}", fmt)
        rows.append({"file": str(dest), **v.metadata()})
    if as_json:
        output.emit_json({"volumes": rows})
        return
    for r in rows:
        output.out.print(f"{r['file']}: {r.get('shape')} spacing {r.get('spacing')}", markup=False, highlight=False)


@click.group()
def shard() -> None:
    """Inspect and unpack shard files."""


@shard.command("list")
@click.argument("file", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def shard_list(file: Path, as_json: bool) -> None:
    """List a shard's members: name, data offset, size, SHA-256."""
    from medbridge.ingest.shards import load_index

    members = load_index(file)
    if as_json:
        output.emit_json({"shard": str(file), "members": [m.__dict__ for m in members]})
        return
    output.table(str(file), ["member", "offset", "size", "sha256"],
                 [(m.name, m.offset, m.size, m.sha256[:16] + "…") for m in members])  # fmt: skip


@shard.command("extract")
@click.argument("file", type=PATH)
@click.argument("dest", type=PATH)
def shard_extract(file: Path, dest: Path) -> None:
    """Unpack a shard into DEST, checking every member's SHA-256."""
    from medbridge.ingest.shards import extract

    written = extract(file, dest)
    output.out.print(f"extracted {len(written)} files into {dest}")
