"""The block manager's record of one live sequence, and the reads over it."""

from __future__ import annotations

from array import array

from pagedkv._validate import check_int

#: The id a released block's entry holds in a block table (see
#: :mod:`~pagedkv.manager.window`): in range, so tables stay valid, and never read.
NULL_BLOCK = 0


class SeqRecord:
    """One sequence: its block table, its tokens and where its hash chain stands.

    ``blocks[:chain]`` are a prefix hit held through the manager's per-chain count
    (named by ``blocks[chain - 1]``: one shared reference per block for every live
    sequence that found that chain); ``blocks[chain:]`` hold a reference each, except
    ``blocks[:released]``: placeholders of blocks released outside a sliding window
    (then ``chain == 0``). ``gen``: the model generation it was allocated in; it
    registers the blocks it fills only while that is the manager's (``-1``: never, its
    KV came from another model).
    A ``private`` sequence (``share_prefix=False``, or a prompt shorter than
    ``min_prefix_tokens``) takes no part in prefix caching: no hit chain, none of its
    blocks registered, its hash chain never computed (``last_hash`` stays ROOT).
    """

    __slots__ = (
        "blocks", "tokens", "last_hash", "ns", "chain", "anonymous", "gen", "private",
        "last_access", "released",
    )  # fmt: skip

    def __init__(
        self,
        blocks: list[int],
        tokens: array,
        last_hash: bytes,
        ns: bytes,
        chain: int = 0,
        gen: int = 0,
        private: bool = False,
        last_access: float = 0.0,
    ) -> None:
        self.blocks = blocks  # physical block of each logical block
        self.chain = chain
        self.tokens = tokens  # every token id (uint32)
        # Chained hash of the last full block (ROOT if none), the parent of the next one.
        # Only this one is kept: a per-sequence list of every hash would cost an
        # allocation per block and a dereference per block when the sequence is freed.
        self.last_hash = last_hash
        self.ns = ns  # namespace digest (salt + extra keys)
        # Full blocks left unregistered (their content was cached elsewhere when they
        # filled); every other full block is registered while the sequence holds it,
        # so free() needs no per-block hash lookup. Usually empty.
        self.anonymous: list[int] = []
        self.gen = gen
        self.private = private
        # Clock time of the last operation that created it or grew its table.
        self.last_access = last_access
        # Leading blocks released outside a sliding window (placeholders in ``blocks``,
        # held by no reference; see :mod:`~pagedkv.manager.window`). Usually 0.
        self.released = 0

    def fork(self, now: float) -> SeqRecord:
        """A record sharing this one's blocks (the caller takes the references)."""
        child = SeqRecord(
            list(self.blocks), array("I", self.tokens), self.last_hash, self.ns, self.chain,
            self.gen, self.private, now,
        )  # fmt: skip
        child.anonymous = list(self.anonymous)
        child.released = self.released
        return child


def slot_mapping(seq: SeqRecord, block_size: int, start: int, stop: int | None) -> list[int]:
    """``block_id * block_size + offset`` of tokens ``start..stop`` (default: the end)."""
    n = len(seq.tokens)
    check_int(start, "start", minimum=0)
    if stop is None:
        stop = n
    check_int(stop, "stop", minimum=0)
    if stop > n:
        raise ValueError(f"stop={stop} is past the sequence's {n} tokens")
    if start > stop:
        raise ValueError(f"start={start} is after stop={stop}")
    if start < seq.released * block_size and start < stop:
        raise ValueError(
            f"start={start}: tokens before {seq.released * block_size} are in blocks "
            "released outside the sliding window (they have no slots)"
        )
    bs, blocks = block_size, seq.blocks
    out: list[int] = []
    pos = start
    while pos < stop:
        i, off = divmod(pos, bs)
        end = min(stop, (i + 1) * bs)
        base = blocks[i] * bs
        out.extend(range(base + off, base + off + end - pos))
        pos = end
    return out


def full_block_range(
    seq: SeqRecord, block_size: int, start: int, stop: int | None
) -> tuple[int, int]:
    """``start..stop`` clipped to the sequence's full blocks (default: all of them)."""
    full = len(seq.tokens) // block_size
    check_int(start, "start", minimum=0)
    stop = full if stop is None else min(check_int(stop, "stop", minimum=0), full)
    return start, stop
