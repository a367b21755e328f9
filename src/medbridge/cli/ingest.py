"""``medbridge ingest`` (the anonymisation gate, CT series to volumes) and ``medbridge shard``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click

from medbridge.cli import output

PATH = click.Path(path_type=Path)
GATE_FAILED = 11


@click.group()
def ingest() -> None:
    """Check data before it enters the platform; build volumes from DICOM series."""


PSEUDONYM_HELP = ("Declared pseudonyms: KEYWORD=REGEX (repeatable), e.g. PatientID='LIDC-IDRI-[0-9]{4}'; "
                  "values must match in full; Patient Identity Removed = YES and a De-identification Method "
                  "are then required.")  # fmt: skip


def gate_profile(profile: Path | None, pseudonyms: tuple[str, ...]) -> Any:
    """The profile from ``--profile``, narrowed to the dataset's declared pseudonyms."""
    from medbridge.ingest.profile import load_profile, parse_declarations, with_pseudonyms

    return with_pseudonyms(load_profile(profile), parse_declarations(pseudonyms))


@ingest.command("check")
@click.argument("folder", type=PATH)
@click.option("--profile", type=PATH, default=None, help="Anonymisation profile (TOML); default: PS3.15 basic.")
@click.option("--pseudonym", "pseudonyms", multiple=True, metavar="KEYWORD=REGEX", help=PSEUDONYM_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def ingest_check(folder: Path, profile: Path | None, pseudonyms: tuple[str, ...], as_json: bool) -> None:
    """Run the anonymisation gate alone; exit 0 if every file passes, 11 if any fails."""
    from medbridge.errors import InvalidInput
    from medbridge.ingest.gate import check_tree

    if not folder.is_dir():
        raise InvalidInput(f"{folder}: not a directory")
    report = check_tree(folder, gate_profile(profile, pseudonyms))
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


@ingest.command("anonymise")
@click.argument("src", type=PATH)
@click.option("--out", "dst", type=PATH, required=True, help="Folder for the rewritten copy (new or empty).")
@click.option(
    "--mapping",
    type=PATH,
    required=True,
    help="Pseudonym mapping (JSON, created if missing): holds the original IDs; keep it, never upload it.",
)
@click.option("--prefix", default="ANON", show_default=True, help="Pseudonyms are PREFIX-0001, PREFIX-0002, ...")
@click.option("--profile", type=PATH, default=None, help="Anonymisation profile (TOML); default: PS3.15 basic.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out (files of the same name are replaced).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def ingest_anonymise(src: Path, dst: Path, mapping: Path, prefix: str, profile: Path | None, force: bool,
                     as_json: bool) -> None:  # fmt: skip
    """Rewrite a folder per the PS3.15 basic profile (pseudonyms, new UIDs, pixels untouched), then gate it."""
    from rich.progress import BarColumn, DownloadColumn, Progress

    from medbridge.errors import InvalidInput
    from medbridge.ingest.anonymise import anonymise, summary
    from medbridge.ingest.gate import check_tree
    from medbridge.ingest.profile import load_profile, with_pseudonyms

    if not src.is_dir():
        raise InvalidInput(f"{src}: not a directory")
    rules = load_profile(profile)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), console=output.err,
                  transient=True, disable=as_json or not output.err.is_terminal) as bar:  # fmt: skip
        task = bar.add_task("anonymising", total=total)
        done = anonymise(src, dst, mapping, rules, prefix=prefix, force=force,
                         progress=lambda n: bar.advance(task, n))  # fmt: skip
    report = check_tree(dst, with_pseudonyms(rules, done.declared))
    result = {**summary(done), "out": str(dst), "gate_passed": report.passed,
              "gate_failed": [f.as_dict() for f in report.failed]}  # fmt: skip
    if as_json:
        output.emit_json(result)
    else:
        output.out.print(f"{done.rewritten} DICOM files rewritten, {done.copied} other files copied unchanged, "
                         f"{done.patients} patients ({done.new_pseudonyms} new pseudonyms in {mapping}), "
                         f"{done.uids_remapped} UIDs remapped into {dst}", markup=False, highlight=False)  # fmt: skip
        for rel in done.skipped:
            output.err.print(f"  skipped {rel}: not a regular file (links are not followed)", markup=False)
        if done.declared:
            flags = " ".join(f"--pseudonym {k}='{v}'" for k, v in sorted(done.declared.items()))
            output.out.print(f"declare the pseudonyms when adding the dataset: {flags}", markup=False, highlight=False)
        for f in report.failed:
            for issue in f.issues:
                output.err.print(f"  {f.path}: {issue.tag} {issue.keyword}: {issue.reason}", markup=False,
                                 highlight=False)  # fmt: skip
        output.out.print("the gate accepts the output" if report.passed
                         else f"the gate still refuses {len(report.failed)} file(s) (see above)")  # fmt: skip
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
