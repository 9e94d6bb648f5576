"""Why a prompt missed the cache: where each of its full blocks is, and what it would get.

``cache.explain(token_ids, salt=None)`` returns a :class:`PrefixReport`: each full
block's status, the first block a new request would compute rather than reuse, and the
tokens it would get from the device and from each tier. Statuses, best first:

- ``"device"``: registered on the device, a prefix hit would use it;
- ``"tier:<name>"``: held by that tier (``cpu``, ``disk``, ``redis``; the fastest one);
- ``"evicted"`` / ``"expired"``: it was on the device and was evicted / idled past the
  TTL lately (the manager's ghost list remembers the last ~57,000 by default,
  ``ManagerConfig.ghost_bytes``); an expired block not yet dropped says so too;
- ``"never_seen"``: none of the above (or dropped longer ago than the ghost list
  remembers, or computed under another model fingerprint).

Everything is computed from the hashes of ``salt``'s namespace: a report for one
tenant never looks at another's blocks, ghosts or tier entries, so the same tokens
cached under another salt read ``"never_seen"``. :func:`explain_report` formats one
for a terminal (the ``pagedkv explain`` command).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pagedkv.manager import BlockManager
    from pagedkv.tiers import TieredStore

DEVICE = "device"
NEVER_SEEN = "never_seen"


class TierProbe(Protocol):
    """Where below the device each block is: ``names`` of the tiers, fastest first, and
    a call answering, for each hash, the name of the fastest tier holding it or None."""

    names: tuple[str, ...]

    def __call__(self, hashes: Sequence[bytes]) -> list[str | None]: ...


class ChainProbe:
    """A :class:`TierProbe` over a :class:`~pagedkv.tiers.TieredStore`.

    Pending write-backs are stored first (``flush``), so a block demoted a moment ago is
    found where a request would load it from; then each tier is asked once (one batched
    ``contains`` per tier, fastest first). A tier that cannot be reached holds nothing.
    """

    def __init__(self, chain: TieredStore) -> None:
        self._chain = chain
        self.names = tuple(level.name for level in chain.levels)

    def __call__(self, hashes: Sequence[bytes]) -> list[str | None]:
        chain = self._chain
        chain.flush()
        keys = [chain.key(h) for h in hashes]
        where: list[str | None] = [None] * len(keys)
        for level in chain.levels:
            ask = [i for i, w in enumerate(where) if w is None]
            if not ask:
                break
            for i, held in zip(ask, level.contains([keys[i] for i in ask])):
                if held:
                    where[i] = level.name
        return where


@dataclass(frozen=True)
class PrefixReport:
    """Where a prompt's full blocks are and what a new request with it would get.

    ``blocks``: the status of each full block (see :mod:`pagedkv.explain`);
    ``first_miss``: the first full block a request would compute rather than reuse
    (``None``: it reuses all it can, every full block but the one holding its last
    token); ``device_tokens``: prompt tokens reused from the device's prefix cache;
    ``tier_tokens``: tokens loaded from each tier (every tier named, 0 included).
    """

    num_tokens: int
    block_size: int
    blocks: tuple[str, ...]
    first_miss: int | None
    device_tokens: int
    tier_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        """Tokens a request would not compute: device + tiers (what allocate returns)."""
        return self.device_tokens + sum(self.tier_tokens.values())

    @property
    def computed_tokens(self) -> int:
        """Tokens a request would compute."""
        return self.num_tokens - self.cached_tokens

    def __str__(self) -> str:
        return format_report(self)


def explain_prefix(
    manager: BlockManager,
    token_ids: Sequence[int],
    salt: object = None,
    *,
    tiers: TierProbe | None = None,
) -> PrefixReport:
    """The :class:`PrefixReport` of ``token_ids`` in ``salt``'s namespace of ``manager``
    (and of ``tiers``, asked only for this namespace's hashes). Changes nothing."""
    view = manager.device_prefix(token_ids, salt)  # validates the tokens and the salt
    n, bs = len(token_ids), manager.block_size
    limit = (n - 1) // bs if n else 0  # a request always computes its last token
    statuses: list[Any] = list(view.statuses)
    served = view.hit_blocks
    tier_tokens: dict[str, int] = {}
    if tiers is not None:
        tier_tokens = dict.fromkeys(tiers.names, 0)
        # The tiers are asked for blocks not on the device, and for those after the device
        # hit that a request would ask them for (allocate loads the leading run found).
        ask = [i for i, s in enumerate(statuses) if s != DEVICE or served <= i < limit]
        where: list[str | None] = [None] * len(statuses)
        for i, name in zip(ask, tiers([view.hashes[i] for i in ask]) if ask else []):
            where[i] = name
            if name is not None and statuses[i] != DEVICE:
                statuses[i] = f"tier:{name}"
        while served < limit and (found := where[served]) is not None:
            tier_tokens[found] += bs
            served += 1
    return PrefixReport(
        num_tokens=n,
        block_size=bs,
        blocks=tuple(NEVER_SEEN if s is None else s for s in statuses),
        first_miss=served if served < limit else None,
        device_tokens=view.hit_blocks * bs,
        tier_tokens=tier_tokens,
    )


def format_report(report: PrefixReport) -> str:
    """``report`` as lines of text: runs of blocks with their status, then the totals."""
    bs = report.block_size
    lines = [f"prompt: {report.num_tokens} tokens, {len(report.blocks)} full blocks of {bs} tokens"]
    start = 0
    for i in range(1, len(report.blocks) + 1):
        if i == len(report.blocks) or report.blocks[i] != report.blocks[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            note = ""
            if report.first_miss is not None and start <= report.first_miss < i:
                note = f"   <- first miss: block {report.first_miss}"
            lines.append(f"  blocks {span}: {report.blocks[start]}{note}")
            start = i
    got = [f"{report.device_tokens} from the device"]
    got += [f"{t} from {name}" for name, t in report.tier_tokens.items()]
    lines.append(
        f"a request gets {report.cached_tokens} cached tokens ({', '.join(got)}) and "
        f"computes {report.computed_tokens}"
    )
    return "\n".join(lines)


def explain_report(cache: Any, token_ids: Sequence[int], salt: object = None) -> str:
    """``cache.explain(token_ids, salt)`` formatted for a terminal (:func:`format_report`)."""
    return format_report(cache.explain(token_ids, salt))
