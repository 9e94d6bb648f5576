"""KVCacheGroup: several KVCaches of one model on different devices, one namespace of ids.

Each member is an ordinary :class:`~pagedkv.cache.KVCache` with a name (``"cuda:0"``,
``"cpu"``; ``"cpu#0"``, ``"cpu#1"`` for two pools on one device). The group places new
sequences (prefix affinity, then a preference list, then free blocks), moves a sequence
between members bit-exactly, reusing the blocks of its prefix the target already caches,
and evens out how full the members are. It calls only the members' public methods and
keeps one map, sequence id -> member, which :meth:`KVCacheGroup.check_integrity` audits.

Every operation is atomic: on bad input, :class:`~pagedkv.errors.OutOfBlocks` or a failed
copy it raises and no member's sequences or KV change (a failed copy may leave cached
blocks evicted on its target; see :meth:`KVCacheGroup.move`).

Not thread-safe (like ``KVCache``): between a move's allocation on the target and the
end of its copy, the target's new full blocks are already findable there, so no other
call may run on that member meanwhile.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from pagedkv._validate import live_entry
from pagedkv.cache import KVCache
from pagedkv.errors import CacheIntegrityError, OutOfBlocks
from pagedkv.group import members as _members
from pagedkv.group.moves import Device, GroupMoves
from pagedkv.group.results import Counters, DeviceStats
from pagedkv.group.transport import Transport
from pagedkv.storage import KVLayout, pool_copy


class KVCacheGroup(GroupMoves):
    """KV caches of one layout and model fingerprint on several devices.

    Args:
        caches: the members: a mapping name -> :class:`KVCache`, or a sequence of caches
            named after their devices (``"cuda:0"``; ``"cpu#0"``, ``"cpu#1"`` when several
            share one). Sequences already live in them join the group.
        chunk_bytes: staging granularity of moves (see :mod:`pagedkv.storage.pool_copy`).
        staging: how moves between a CPU and a CUDA member go: ``"auto"`` (a copy kernel
            through the device mapping of the page-locked CPU pool, else pitched copies
            pool to pool on the copy engine when it is page-locked, else host threads
            through pinned rows), ``"kernel"``, ``"direct"`` (the copy engine: leaves the
            SMs to the model) or ``"host"``.
        host_threads: threads that copy a CPU pool's blocks: ``"host"`` staging, and
            moves between two CPU members (default: the cores here, at most 8).
        pin_host: page-lock the CPU members' pools (``cudaHostRegister``) for direct
            copies: ``None`` (default) when the group also has a CUDA member, falling
            back to host staging if the lock fails; ``True`` always, raising
            :class:`~pagedkv.errors.ResourceError` if it fails; ``False`` never. The
            pages stay locked until :meth:`close` (or until the group is collected).

    Raises ``TypeError``/``ValueError`` for no members, a member that is not a
    ``KVCache``, the same cache (or pool) twice, members whose layouts or model
    fingerprints differ, a sequence id live in two members, or bad copy options.
    """

    def __init__(
        self,
        caches: Mapping[str, KVCache] | Sequence[KVCache],
        *,
        chunk_bytes: int = pool_copy.CHUNK_BYTES,
        staging: str = "auto",
        host_threads: int | None = None,
        pin_host: bool | None = None,
    ) -> None:
        members = _members.named(caches)
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.layout, self.fingerprint, where = _members.common(members)
        transport = Transport(
            members, chunk_bytes=chunk_bytes, staging=staging, host_threads=host_threads,
            pin_host=pin_host,
        )  # fmt: skip
        transport.lock()  # the last step: nothing after it can refuse the arguments
        self._transport = transport
        self._members = members
        self._where = where
        self._preference: list[str] = []
        self._pinned: set[Hashable] = set()
        self._counters = {name: Counters() for name in members}

    @classmethod
    def create(
        cls,
        layout: KVLayout,
        num_blocks: int | Sequence[int],
        devices: Sequence[Device],
        *,
        names: Sequence[str] | None = None,
        model_fingerprint: str = "",
        chunk_bytes: int = pool_copy.CHUNK_BYTES,
        staging: str = "auto",
        host_threads: int | None = None,
        pin_host: bool | None = None,
        **cache_options: Any,
    ) -> KVCacheGroup:
        """A group of new caches: one per entry of ``devices`` (a device may repeat),
        ``num_blocks`` each (an int) or per device (a sequence); ``cache_options`` go to
        every :class:`KVCache`; the copy options as in the constructor."""
        if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence):
            raise TypeError("devices must be a sequence, e.g. ['cuda:0', 'cuda:1'] or ['cpu'] * 2")
        counts = [num_blocks] * len(devices) if isinstance(num_blocks, int) else list(num_blocks)
        if len(counts) != len(devices):
            raise ValueError(f"{len(counts)} num_blocks for {len(devices)} devices")
        if names is not None and len(names) != len(devices):
            raise ValueError(f"{len(names)} names for {len(devices)} devices")
        caches = [
            KVCache(layout, n, device=d, model_fingerprint=model_fingerprint, **cache_options)
            for n, d in zip(counts, devices)
        ]
        members = caches if names is None else dict(zip(names, caches))
        return cls(
            members, chunk_bytes=chunk_bytes, staging=staging, host_threads=host_threads,
            pin_host=pin_host,
        )  # fmt: skip

    @property
    def chunk_bytes(self) -> int:
        """Staging granularity of moves."""
        return self._transport.chunk_bytes

    @property
    def staging(self) -> str:
        """How moves between a CPU and a CUDA member stage (``"auto"``, ``"kernel"``,
        ``"direct"``, ``"host"``)."""
        return self._transport.staging

    @property
    def host_threads(self) -> int:
        """Threads that copy CPU pools' blocks (host staging, CPU to CPU)."""
        return self._transport.threads.threads

    # ------------------------------------------------------------------ members

    def supported_devices(self) -> list[str]:
        """Member names, in member order."""
        return list(self._members)

    def member(self, device: Device) -> KVCache:
        """The member cache named (or on the device) ``device``."""
        return self._members[self._name(device)]

    def members(self) -> dict[str, KVCache]:
        """Name -> cache of every member (a copy of the mapping)."""
        return dict(self._members)

    def _name(self, device: object) -> str:
        return _members.resolve(self._members, device)

    def set_device_preference(self, devices: Sequence[Device]) -> None:
        """Rank members for placing new sequences: listed ones first, in this order, the
        rest after them (a prefix hit still comes first; see :meth:`allocate`). An empty
        list clears the preference. Unknown or repeated members raise ``ValueError``."""
        if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence):
            raise TypeError("set_device_preference() takes a sequence of members")
        names = [self._name(d) for d in devices]
        if len(set(names)) != len(names):
            raise ValueError(f"a member appears twice in the preference {names}")
        self._preference = names

    def device_preference(self) -> list[str]:
        return list(self._preference)

    # ---------------------------------------------------------------- sequences

    def __contains__(self, seq_id: object) -> bool:
        try:
            return seq_id in self._where
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._where)

    def seq_ids(self) -> list:
        """Live sequences of every member, oldest first (a move keeps a sequence's place)."""
        return list(self._where)

    def device_of(self, seq_id: Hashable) -> str:
        """The member holding ``seq_id`` (``KeyError`` if none)."""
        return live_entry(self._where, seq_id)

    def cache_of(self, seq_id: Hashable) -> KVCache:
        """The member cache holding ``seq_id``: its tensors and kernels serve the sequence."""
        return self._members[self.device_of(seq_id)]

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self.cache_of(seq_id).block_table(seq_id)

    def token_ids(self, seq_id: Hashable) -> list[int]:
        return self.cache_of(seq_id).token_ids(seq_id)

    def num_released(self, seq_id: Hashable) -> int:
        return self.cache_of(seq_id).num_released(seq_id)

    def release_before(self, seq_id: Hashable, num_tokens: int) -> int:
        """:meth:`KVCache.release_before` on the sequence's member."""
        return self.cache_of(seq_id).release_before(seq_id, num_tokens)

    def num_tokens(self, seq_id: Hashable) -> int:
        return self.cache_of(seq_id).num_tokens(seq_id)

    def salt(self, seq_id: Hashable) -> object:
        return self.cache_of(seq_id).salt(seq_id)

    def _check_new(self, seq_id: object, what: str) -> None:
        try:
            where = self._where.get(seq_id)
        except TypeError:
            raise TypeError(f"{what} must be hashable, got {type(seq_id).__name__}") from None
        if where is not None:
            raise ValueError(f"sequence {seq_id!r} is already live on {where!r}; use a new id")
        for name, cache in self._members.items():
            if seq_id in cache or seq_id in cache.swapped_ids():
                raise ValueError(
                    f"sequence {seq_id!r} is held by member {name!r} outside the group "
                    "(allocated or swapped out there directly); use a new id"
                )

    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        salt: object = None,
        device: Device | None = None,
    ) -> int:
        """Start a sequence on one member; return how many prompt tokens already have KV.

        With ``device=None`` the member is, in order of precedence: the one caching the
        longest prefix of the prompt (prefix affinity), then the earliest in the
        preference list, then the one with most free blocks, then member order; a
        member without room is skipped. Raises ``ValueError`` for an id live anywhere in
        the group, :class:`OutOfBlocks` when no member (or not ``device``) has room;
        nothing changes then.
        """
        self._check_new(seq_id, "seq_id")
        if device is not None:
            order = [self._name(device)]
        else:
            hits = {n: c.manager.lookup(token_ids, salt) for n, c in self._members.items()}
            rank = {n: i for i, n in enumerate(self._preference)}
            index = {n: i for i, n in enumerate(self._members)}
            order = sorted(
                self._members,
                key=lambda n: (
                    -hits[n],
                    rank.get(n, len(rank)),
                    -self._members[n].num_free_blocks,
                    index[n],
                ),
            )
        refused = []
        for name in order:
            try:
                cached = self._members[name].allocate(seq_id, token_ids, salt)
            except OutOfBlocks:
                if device is not None:
                    raise
                refused.append(f"{name} has {self._members[name].num_free_blocks}")
                continue
            self._where[seq_id] = name
            counters = self._counters[name]
            counters.placements += 1
            if cached:
                counters.prefix_hits += 1
                counters.prefix_hit_tokens += cached
            return cached
        need = self.layout.num_blocks_for(len(token_ids))
        raise OutOfBlocks(
            f"allocate({seq_id!r}, {len(token_ids)} tokens) needs up to {need} blocks but no "
            f"member has room ({', '.join(refused)} free or evictable); free or preempt "
            "sequences, or add a member"
        )

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Reserve slots for more tokens on the sequence's member."""
        self.cache_of(seq_id).append(seq_id, token_ids)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """A child sharing all of the parent's blocks, on the parent's member."""
        cache = self.cache_of(parent_id)
        self._check_new(child_id, "child_id")
        cache.fork(parent_id, child_id)
        self._where[child_id] = self._where[parent_id]

    def free(self, seq_id: Hashable) -> None:
        """Release a live sequence (and its pin)."""
        self.cache_of(seq_id).free(seq_id)
        del self._where[seq_id]
        self._pinned.discard(seq_id)

    def pin(self, seq_id: Hashable) -> None:
        """Keep a live sequence on its member (it is busy, e.g. in a running step):
        :meth:`move` refuses it and :meth:`rebalance` passes it over until :meth:`unpin`."""
        self.device_of(seq_id)
        self._pinned.add(seq_id)

    def unpin(self, seq_id: Hashable) -> None:
        """Undo :meth:`pin` (``KeyError`` if the sequence is not pinned)."""
        if seq_id not in self._pinned:
            raise KeyError(f"sequence {seq_id!r} is not pinned")
        self._pinned.discard(seq_id)

    def pinned(self) -> list:
        """Pinned sequences, oldest first."""
        return [s for s in self._where if s in self._pinned]

    # ---------------------------------------------------------- stats, checks

    def device_stats(self) -> dict[str, DeviceStats]:
        """Per member: its :class:`CacheStats`, bytes used / total, and the group's counters."""
        out = {}
        bpb = self.layout.bytes_per_block
        for name, cache in self._members.items():
            s = cache.stats()
            c = self._counters[name]
            out[name] = DeviceStats(
                name, str(cache.device), s, s.used_blocks * bpb, cache.pool.nbytes,
                s.used_blocks / s.num_blocks, s.num_sequences, c.placements, c.prefix_hits,
                c.prefix_hit_tokens, c.moves_in, c.moves_out, c.blocks_copied_in,
                c.blocks_reused_in, self._transport.page_locked(name),
            )  # fmt: skip
        return out

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` when a member's own check fails or the
        group's map disagrees with the members: every id in exactly one member's
        ``seq_ids()``, the one the map names; pins only on live ids; one layout and
        fingerprint throughout."""
        problems = _members.violations(
            self._members, self._where, self._pinned, self.layout, self.fingerprint
        )
        if problems:
            raise CacheIntegrityError("KVCacheGroup: " + "; ".join(problems))

    def close(self) -> None:
        """Flush and close every member's tiers, join the host copy threads and unlock the
        pages the group locked (idempotent). Moves still work afterwards, staged by host
        threads started again."""
        self._transport.close()
        for cache in self._members.values():
            cache.close()

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: {c.manager.num_used_blocks}/{c.num_blocks}" for n, c in self._members.items()
        )
        return f"KVCacheGroup({self.layout}, sequences={len(self._where)}, used={{{parts}}})"
