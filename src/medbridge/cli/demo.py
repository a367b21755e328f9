"""``medbridge demo``: the README's main command."""

from __future__ import annotations

from collections import Counter
from typing import Any

import click
from rich.table import Table

from medbridge.cli import output


@click.command("demo")
@click.option("--volumes", type=click.IntRange(1, 32), default=4, show_default=True, help="Synthetic CT volumes.")
@click.option("--keep", is_flag=True, help="Keep the demo's temporary folder (platform home, job folder).")
@click.option("--no-mount", is_flag=True, help="Read over SFTP instead of an sshfs mount.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def demo(volumes: int, keep: bool, no_mount: bool, as_json: bool) -> None:
    """Run the whole system on this machine: platform, dataset, grant, a lung-segmentation job, teardown.

    Everything runs on loopback with SQLite and local storage in a temporary folder
    (removed afterwards unless --keep).
    """
    from medbridge.demo.run import run_demo

    with output.err.status("running the demo (platform, dataset, job, teardown)…"):
        result = run_demo(volumes=volumes, keep=keep, mount=False if no_mount else None)
    if as_json:
        output.emit_json(result)
        return
    show(result)


def show(r: dict[str, Any]) -> None:
    o = output.out
    p, d, a, j, out, t = r["platform"], r["dataset"], r["access"], r["job"], r["outputs"], r["teardown"]
    o.print(f"[bold]medbridge demo[/] — finished in {r['seconds']} s, everything on this machine over loopback\n")
    o.print(f"[bold]platform[/]  {p['address']}  host key {p['host_key']}  ({p['database']}, {p['storage']} storage)")
    shape = "x".join(map(str, d["shape"]))
    o.print(
        f"[bold]dataset[/]   {d['name']}: {d['files']} synthetic chest CTs ({shape} int16 HU), {d['bytes']:,} bytes"
    )
    o.print(
        f"[bold]access[/]    user {a['user']} in group {a['group']}, grant on @{a['group']} until {a['grant_until']}"
    )
    o.print(f"[bold]job[/]       {j['id']}: certificate serial {j['certificate_serial']}, "
            f"read {j['read_bytes']:,} bytes via {j['read_via']}, exit {j['exit_code']}")  # fmt: skip
    table = Table("volume", "lungs (ml)", "lung fraction", "seconds", title="lung segmentation", title_justify="left")
    for v in j["volumes"]:
        table.add_row(v["volume"], f"{v['lung_ml']:.1f}", f"{v['lung_fraction']:.3f}", f"{v['seconds']:.2f}")
    o.print(table)
    committed = "manifest verified and committed by the platform" if out["manifest_committed"] else "NOT committed"
    o.print(f"[bold]outputs[/]   {out['files']} files, {out['bytes']:,} bytes → /results/{a['user']}/{j['id']} "
            f"({committed}): {', '.join(out['on_platform'])}")  # fmt: skip
    res = t["residue"]
    agent = "stopped" if t["agent_stopped"] else "STILL RUNNING"
    o.print(f"[bold]teardown[/]  {'unmounted' if t['unmounted'] else 'no mount'}, agent {agent}, "
            f"residue scan: {res['files_scanned']} file(s)")  # fmt: skip
    for f in res["findings"]:
        state = "[green]purged[/]" if f["purged"] else "[red]LEFT[/]"
        o.print(f"          {state} {f['path']} — {f['reason']}", highlight=False)
    if not res["findings"]:
        o.print("          nothing left behind")
    counts = Counter(e["action"] for e in r["audit"])
    o.print(f"\n[bold]audit[/] ({len(r['audit'])} entries for job {j['id']}; "
            + ", ".join(f"{n} {k}" for k, n in counts.most_common()) + ")")  # fmt: skip
    shown = r["audit"][:6] + ([None] if len(r["audit"]) > 10 else []) + r["audit"][-4:]
    for e in shown:
        if e is None:
            o.print("   …")
            continue
        o.print(f"  {e['seq']:>4} {e['at'][11:19]} {e['actor']:<6} {e['action']:<17} {e['outcome']:<7} {e['subject']}",
                highlight=False, markup=False)  # fmt: skip
    o.print(f"[bold]audit chain[/] intact ({r['audit_chain_entries']} entries, `medbridge audit verify`)")
    if r["workdir"]:
        o.print(f"kept {r['workdir']}")
