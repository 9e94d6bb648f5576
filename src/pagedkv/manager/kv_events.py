"""The manager's KV events: building them from what an operation did, only when subscribed.

Registration is the hottest loop of the manager, so it records nothing for events;
when someone subscribes, the operation reads what it registered back from the prefix
index afterwards (:func:`stored_events`: no digest is recomputed for a registered
block). Removals are built once per eviction run from the hashes that run collects
anyway (for the ghost list). See :mod:`pagedkv.events` for what the events mean.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

from pagedkv.events import DEVICE, BlockStored
from pagedkv.manager.hashing import ROOT
from pagedkv.manager.prefix_index import PrefixIndex

_BIG_ENDIAN = sys.byteorder == "big"


def _token_ids(raw: bytes) -> list[int]:
    tokens = array("I", raw)
    if _BIG_ENDIAN:  # pragma: no cover - token bytes are little-endian uint32
        tokens.byteswap()
    return tokens.tolist()


def stored_events(
    prefix: PrefixIndex,
    blocks: Sequence[int],
    start: int,
    stop: int,
    raw: bytes,
    offset: int,
    ns: bytes,
    parent: bytes,
    skipped: Sequence[int],
) -> list[BlockStored]:
    """The :class:`BlockStored` events of a ``register_blocks`` call that just ran with
    these arguments and left ``skipped`` unregistered (their content had a block).

    Registered blocks come in runs, one event each; a skipped block ends a run and its
    content's hash (read from the block that holds it) is the next run's parent.
    """
    skip = set(skipped)
    step, bs = 4 * prefix.block_size, prefix.block_size
    hashes, by_key = prefix.hashes, prefix.by_key
    out: list[BlockStored] = []
    run: list[bytes] = []
    run_parent, run_from = parent, 0
    for i in range(start, stop):
        b = blocks[i]
        at = (i - offset) * step
        if b in skip:
            if run:
                out.append(_stored(run, run_parent, raw[run_from:at], bs))
                run = []
            key = parent + ns + raw[at : at + step]
            holder = by_key.get(key)
            parent = hashes[holder] if holder is not None else prefix.digest(key)
            continue
        if not run:
            run_parent, run_from = parent, at
        parent = hashes[b]
        run.append(parent)
    if run:
        out.append(_stored(run, run_parent, raw[run_from : (stop - offset) * step], bs))
    return out


def _stored(hashes: list[bytes], parent: bytes, raw: bytes, block_size: int) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None if parent == ROOT else parent,
        token_ids=_token_ids(raw),
        block_size=block_size,
        medium=DEVICE,
    )
