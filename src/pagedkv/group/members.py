"""The members of a KVCacheGroup: their names, how a device argument resolves to one, and
the checks that tie the group's map to what the members hold."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from pagedkv.cache import KVCache
from pagedkv.errors import CacheIntegrityError
from pagedkv.storage import KVLayout


def named(caches: object) -> dict[str, KVCache]:
    """Members by name: a mapping as given, or caches named after their devices
    (``"cuda:0"``; ``"cpu#0"``, ``"cpu#1"`` for several on one device). Checks that each
    is a ``KVCache`` and that no pool appears twice."""
    if isinstance(caches, Mapping):
        items = list(caches.items())
        for name, _ in items:
            if not isinstance(name, str) or not name:
                raise TypeError(f"member names must be non-empty strings, got {name!r}")
    elif isinstance(caches, (list, tuple)):
        devices = [str(getattr(c, "device", "?")) for c in caches]
        items = [
            (dev if devices.count(dev) == 1 else f"{dev}#{devices[:i].count(dev)}", cache)
            for i, (dev, cache) in enumerate(zip(devices, caches))
        ]
    else:
        raise TypeError("caches must be a mapping name -> KVCache or a list of KVCaches")
    if not items:
        raise ValueError("a KVCacheGroup needs at least one member")
    pools: dict[int, str] = {}
    for name, cache in items:
        if not isinstance(cache, KVCache):
            raise TypeError(f"member {name!r} must be a KVCache, got {type(cache).__name__}")
        ptr = cache.pool.kv.data_ptr()
        if ptr in pools:
            raise ValueError(f"members {pools[ptr]!r} and {name!r} are the same cache (one pool)")
        pools[ptr] = name
    return dict(items)


def common(members: Mapping[str, KVCache]) -> tuple[KVLayout, str, dict[Hashable, str]]:
    """The members' one layout and model fingerprint, and where each live sequence is;
    ``ValueError`` when layouts or fingerprints differ or an id is in two members (live
    or swapped out)."""
    first = next(iter(members.values()))
    layout, fingerprint = first.layout, first.fingerprint
    where: dict[Hashable, str] = {}
    for name, cache in members.items():
        if cache.layout != layout:
            raise ValueError(f"member {name!r} has layout {cache.layout}, not {layout}")
        if cache.fingerprint != fingerprint:
            raise ValueError(
                f"member {name!r} holds KV of model {cache.model_fingerprint!r}, not "
                f"{first.model_fingerprint!r} (fingerprints {cache.fingerprint} vs "
                f"{fingerprint}); a group serves one model"
            )
        for sid in [*cache.seq_ids(), *cache.swapped_ids()]:
            if sid in where:
                raise ValueError(f"sequence {sid!r} is in members {where[sid]!r} and {name!r}")
            where[sid] = name
    return layout, fingerprint, {sid: n for sid, n in where.items() if sid in members[n]}


def resolve(members: Mapping[str, KVCache], device: object) -> str:
    """The member ``device`` names: a member name, or a device exactly one member is on
    (``"cuda"`` without an index: the one CUDA member)."""
    if isinstance(device, str) and device in members:
        return device
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a member name or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    found = [
        n
        for n, c in members.items()
        if dev is not None
        and (c.device == dev or (dev.index is None and c.device.type == dev.type))
    ]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"device {device!r} is ambiguous: name one of members {found}")
    raise ValueError(f"unknown device {device!r}: members are {list(members)}")


def violations(
    members: Mapping[str, KVCache],
    where: Mapping[Hashable, str],
    pinned: set,
    layout: object,
    fingerprint: str,
) -> list[str]:
    """What disagrees between the group's map and its members (empty: all holds)."""
    problems = []
    held: dict[Hashable, list[str]] = {}
    for name, cache in members.items():
        try:
            cache.check_integrity()
        except CacheIntegrityError as e:
            problems.append(f"member {name!r}: {e}")
        if cache.layout != layout or cache.fingerprint != fingerprint:
            problems.append(f"member {name!r}: layout or fingerprint differs from the group's")
        for sid in cache.seq_ids():
            held.setdefault(sid, []).append(name)
    for sid, names in held.items():
        if len(names) > 1:
            problems.append(f"sequence {sid!r} is live in members {names}")
        if sid not in where:
            problems.append(f"sequence {sid!r} is live in {names} but not in the group's map")
    for sid, name in where.items():
        if held.get(sid, [])[:1] != [name]:
            problems.append(
                f"map puts {sid!r} on {name!r}; members holding it: {held.get(sid, [])}"
            )
    stray = [s for s in pinned if s not in where]
    if stray:
        problems.append(f"pinned ids {stray} are not live")
    return problems
