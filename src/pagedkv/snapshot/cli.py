"""``pagedkv snapshot ...``: list, inspect, verify, delete and garbage-collect snapshots.

A typer sub-app (``app``) the main CLI mounts. Every command takes ``--store``
(a directory or a ``redis://`` URL; default ``$PAGEDKV_SNAPSHOT_STORE``) of a store
that exists: none creates one, and ``ls``/``show``/``verify`` change nothing. Every
failure, damage included, is one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pagedkv.errors import PagedKVError
from pagedkv.snapshot.manifest import describe_layout
from pagedkv.snapshot.reports import SnapshotInfo

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
    """Open an existing store; errors become one red line on stderr and exit code 1.

    No command creates a store: a directory that does not exist is an error (most
    likely a typo in ``--store``), not an empty store to make.
    """
    from pagedkv.snapshot.store import SnapshotStore  # imports torch: only when a command runs

    try:
        with SnapshotStore(location) as store:
            if not store.exists:
                raise ValueError(
                    f"no snapshot store at {store.location!r}: the directory does not exist "
                    "(check --store / $PAGEDKV_SNAPSHOT_STORE)"
                )
            yield store
    except (PagedKVError, ValueError, KeyError, TypeError, OSError) as e:
        _fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


@app.command("ls")
def ls(store: StoreOption) -> None:
    """List snapshots: sizes, dedup ratio, sequences, created; damaged ones as DAMAGED."""
    console = Console()
    with _open(store) as s:
        cat = s.catalogue()
        table = Table(title=f"snapshots in {escape(s.location)}")
        for col in ("name", "created (UTC)", "seqs", "tokens", "logical", "unique", "written"):
            table.add_column(col, justify="left" if col in ("name", "created (UTC)") else "right")
        table.add_column("dedup", justify="right")
        table.add_column("parent")
        for i in cat.snapshots:
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
        for d in cat.damaged:
            what = "newer pagedkv format" if d.newer_version else "DAMAGED"
            table.add_row(f"[red]{escape(d.name)}[/red]", f"[red]{what}[/red]", *[""] * 7)
        console.print(table)
        ratio = cat.logical_bytes / cat.page_bytes if cat.page_bytes else 1.0
        console.print(
            f"{len(cat.snapshots)} snapshots, {cat.pages} pages, {_size(cat.page_bytes)} stored "
            f"for {_size(cat.logical_bytes)} of KV: {ratio:.2f}x dedup"
        )
    for d in cat.damaged:
        console.print(f"[red]DAMAGED[/red] {escape(d.name)}: {escape(d.error)}", soft_wrap=True)
    if cat.damaged:
        _fail(
            f"{len(cat.damaged)} unreadable snapshot manifests; `pagedkv snapshot rm NAME` "
            "removes one (gc deletes no page while they remain)"
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
    i = SnapshotInfo.from_manifest(m)
    console.print(f"[bold]{i.name}[/bold]  created {i.created_iso}  parent {i.parent or '-'}")
    console.print(
        f"layout: {escape(describe_layout(m.layout))} ({_size(m.layout['bytes_per_block'])}/page)"
    )
    console.print(f"fingerprint: {escape(m.fingerprint)}", soft_wrap=True)
    console.print(
        f"{_size(i.logical_bytes)} logical, {_size(i.unique_bytes)} unique, "
        f"{_size(i.written_bytes)} written by its save, dedup {i.dedup_ratio:.2f}x"
        + (f", saved at {i.gbps:.2f} GB/s" if i.seconds else "")
    )
    if m.metadata:
        console.print(f"metadata: {escape(json.dumps(m.metadata))}", soft_wrap=True)
    table = Table()
    for col in ("seq id", "tokens", "pages", "last fill", "salt", "first tokens"):
        table.add_column(col)
    for e in m.sequences:
        head = " ".join(map(str, e.token_ids[:8])) + (" ..." if e.num_tokens > 8 else "")
        table.add_row(
            escape(repr(e.seq_id)),
            str(e.num_tokens),
            str(len(e.pages)),
            str(e.last_page_fill),
            "" if e.salt is None else escape(repr(e.salt)),
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
        console.print(f"[red]FAILED[/red] {name}: {escape(r.error)}", soft_wrap=True)
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
    """Delete a snapshot (its manifest, damaged or not); run ``gc`` to reclaim the pages."""
    with _open(store) as s:
        s.delete(name)
    Console().print(f"deleted {name} (run `gc` to reclaim pages no other snapshot uses)")


@app.command("gc")
def gc(
    store: StoreOption,
    grace: float = typer.Option(
        None, min=0.0, help="Seconds a lease from another host protects its pages (default 3600)."
    ),
    drop_damaged: bool = typer.Option(
        False,
        "--drop-damaged",
        help="Delete unreadable (damaged) manifests first; without it a gc that finds one "
        "deletes no page.",
    ),
) -> None:
    """Delete pages no snapshot references (keeps those of saves in progress)."""
    with _open(store) as s:
        r = s.gc(grace_seconds=grace, drop_damaged=drop_damaged)
    freed = "" if r.bytes_freed is None else f" ({_size(r.bytes_freed)})"
    console = Console()
    for name in r.dropped:
        console.print(f"dropped damaged snapshot {name}")
    console.print(
        f"deleted {r.pages_deleted} pages{freed}, kept {r.pages_kept}, "
        f"{r.pages_protected} protected by saves in progress, "
        f"{r.leases_removed} dead leases removed, {r.seconds:.2f} s"
    )
    if r.blocked:
        names = ", ".join(d.name for d in r.damaged[:10])
        _fail(
            f"deleted no page: {len(r.damaged)} snapshot manifests are unreadable ({names}); "
            "`pagedkv snapshot rm NAME` them or run gc --drop-damaged"
        )
