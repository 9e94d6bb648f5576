"""``pagedkv snapshot ...``: list, inspect, verify, delete and garbage-collect snapshots.

A typer sub-app (``app``) the main CLI mounts. Every command takes ``--store``
(a directory or a ``redis://`` URL; default ``$PAGEDKV_SNAPSHOT_STORE``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from pagedkv.errors import PagedKVError
from pagedkv.snapshot.manifest import describe_layout

if TYPE_CHECKING:
    from pagedkv.snapshot.store import SnapshotStore

app = typer.Typer(
    help="Save/restore KV snapshots: list, show, verify, rm, gc.",
    no_args_is_help=True,
    add_completion=False,
)

StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        "-s",
        envvar="PAGEDKV_SNAPSHOT_STORE",
        help="Snapshot store: a directory or a redis:// URL.",
        show_envvar=True,
    ),
]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@contextmanager
def _open(location: str) -> Iterator[SnapshotStore]:
    """Open the store; turn pagedkv errors into a red message and exit code 1."""
    from pagedkv.snapshot.store import SnapshotStore  # imports torch: only when a command runs

    console = Console(stderr=True)
    try:
        with SnapshotStore(location) as store:
            yield store
    except (PagedKVError, ValueError, KeyError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None


@app.command("ls")
def ls(store: StoreOption) -> None:
    """List snapshots: sizes, dedup ratio, sequences, created."""
    console = Console()
    with _open(store) as s:
        infos = s.list()
        broken = sorted(set(s.names()) - {i.name for i in infos})
        table = Table(title=f"snapshots in {s.location}")
        for col in ("name", "created (UTC)", "seqs", "tokens", "logical", "unique", "written"):
            table.add_column(col, justify="left" if col in ("name", "created (UTC)") else "right")
        table.add_column("dedup", justify="right")
        table.add_column("parent")
        stored: dict[str, int] = {}
        logical = 0
        for i in infos:
            table.add_row(
                i.name,
                i.created_iso.replace("+00:00", ""),
                str(i.num_sequences),
                str(i.num_tokens),
                _size(i.logical_bytes),
                _size(i.unique_bytes),
                _size(i.written_bytes),
                f"{i.dedup_ratio:.2f}x",
                i.parent or "",
            )
            logical += i.logical_bytes
            for d in s.manifest(i.name).page_digests():
                stored[d] = int(i.layout["bytes_per_block"])
        for name in broken:
            table.add_row(f"[red]{name}[/red]", "[red]unreadable manifest[/red]", *[""] * 7)
        console.print(table)
        total = sum(stored.values())
        ratio = logical / total if total else 1.0
        console.print(
            f"{len(infos)} snapshots, {len(stored)} pages, {_size(total)} stored for "
            f"{_size(logical)} of KV: {ratio:.2f}x dedup"
        )


@app.command("show")
def show(name: str, store: StoreOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one snapshot: layout, fingerprint, metadata and its sequences."""
    console = Console()
    with _open(store) as s:
        m = s.manifest(name)
        if as_json:
            console.print_json(json.dumps(m.to_json()))
            return
        i = s.info(name)
        console.print(f"[bold]{i.name}[/bold]  created {i.created_iso}  parent {i.parent or '-'}")
        console.print(
            f"layout: {describe_layout(m.layout)} ({_size(m.layout['bytes_per_block'])}/page)"
        )
        console.print(f"fingerprint: {m.fingerprint}")
        console.print(
            f"{_size(i.logical_bytes)} logical, {_size(i.unique_bytes)} unique, "
            f"{_size(i.written_bytes)} written by its save, dedup {i.dedup_ratio:.2f}x"
            + (f", saved at {i.gbps:.2f} GB/s" if i.seconds else "")
        )
        if m.metadata:
            console.print(f"metadata: {json.dumps(m.metadata)}")
        table = Table()
        for col in ("seq id", "tokens", "pages", "last fill", "salt", "first tokens"):
            table.add_column(col)
        for e in m.sequences:
            head = " ".join(map(str, e.token_ids[:8])) + (" ..." if e.num_tokens > 8 else "")
            table.add_row(
                repr(e.seq_id),
                str(e.num_tokens),
                str(len(e.pages)),
                str(e.last_page_fill),
                "" if e.salt is None else repr(e.salt),
                head,
            )
        console.print(table)


@app.command("verify")
def verify(name: str, store: StoreOption) -> None:
    """Read back every page and check its digest; exit code 1 if anything is wrong."""
    console = Console()
    with _open(store) as s:
        r = s.verify(name, progress=True)
    if r.ok:
        console.print(
            f"[green]ok[/green] {name}: {r.num_pages} pages, {_size(r.bytes_checked)} "
            f"verified in {r.seconds:.2f} s ({r.gbps:.2f} GB/s)"
        )
        return
    if r.error:
        console.print(f"[red]FAILED[/red] {name}: {r.error}")
    else:
        console.print(
            f"[red]FAILED[/red] {name}: {len(r.missing)} missing, {len(r.corrupt)} corrupt "
            f"of {r.num_pages} pages"
        )
        for d in r.missing[:20]:
            console.print(f"  missing {d}")
        for d in r.corrupt[:20]:
            console.print(f"  corrupt {d}")
    raise typer.Exit(1)


@app.command("rm")
def rm(name: str, store: StoreOption) -> None:
    """Delete a snapshot (its manifest); run ``gc`` to reclaim the pages."""
    with _open(store) as s:
        s.delete(name)
    Console().print(f"deleted {name} (run `gc` to reclaim pages no other snapshot uses)")


@app.command("gc")
def gc(
    store: StoreOption,
    grace: float = typer.Option(
        None, min=0.0, help="Seconds a lease from another host protects its pages (default 3600)."
    ),
) -> None:
    """Delete pages no snapshot references (keeps those of saves in progress)."""
    with _open(store) as s:
        r = s.gc(grace_seconds=grace)
    freed = "" if r.bytes_freed is None else f" ({_size(r.bytes_freed)})"
    Console().print(
        f"deleted {r.pages_deleted} pages{freed}, kept {r.pages_kept}, "
        f"{r.pages_protected} protected by saves in progress, "
        f"{r.leases_removed} dead leases removed, {r.seconds:.2f} s"
    )
