"""Starting an admitted request's sequence, and dropping those of a failed batch.

Two pieces of the scheduler's bookkeeping that touch the cache directly:
:func:`allocate_first_chunk` starts a waiting request's sequence on its prefix hits (or,
for a prompt stored whole, on all of it: a zero-compute repeat,
:mod:`pagedkv.engine.repeats`), and :func:`discard_batch` releases the sequences of a
batch whose forward failed without caching the blocks it was to write.
"""

from __future__ import annotations

from pagedkv.cache import KVCache
from pagedkv.engine.chunks import Chunk
from pagedkv.engine.repeats import PromptRepeats, Replay
from pagedkv.engine.request import Request


def allocate_first_chunk(
    cache: KVCache, repeats: PromptRepeats | None, req: Request, budget: int
) -> Replay | None:
    """Start ``req``'s sequence on its prefix hits, with blocks for its first chunk (at
    most ``budget`` tokens computed); sets ``num_computed`` and ``num_allocated``. A
    prompt stored whole gets all its blocks and its replay is returned.
    :class:`~pagedkv.errors.OutOfBlocks` when the pool is full (nothing changed)."""
    tokens, salt, bs = req.all_tokens, req.cache_salt, cache.block_size
    n = len(tokens)
    hit = cache.lookup(tokens, salt)
    # every block but the last (which lookup leaves out) matched: maybe stored
    if repeats is not None and not req.output and hit == (n - 1) // bs * bs:
        replay = repeats.find(tokens, salt)
        if replay is not None:
            cached = cache.allocate(req.seq_id, tokens, salt, whole=True)
            if cached == n - n % bs:  # the full blocks are hits, the rest is stored
                req.num_computed = req.num_allocated = n
                return replay
            # a block expired (TTL) between the two reads: compute it as usual
            cache.discard(req.seq_id)
            hit = cache.lookup(tokens, salt)
    end = min(n, hit + budget)
    req.num_computed = cache.allocate(req.seq_id, tokens[:end], salt)
    req.num_allocated = end
    return None


def discard_batch(cache: KVCache, chunks: list[Chunk]) -> None:
    """Release the sequences of a batch whose forward did not run through, caching none
    of the blocks registered for it (their KV was not written): each sequence is
    discarded with its first ``chunk.start`` tokens written (earlier steps' KV, which
    stays cached). Last admitted first: a request may hold blocks registered this step
    by one admitted before it, which can only be unregistered once it let go of them.
    With overlap, a request's earlier tokens may be computed by the step still in
    flight; they count as written (that step runs first)."""
    for c in reversed(chunks):
        req = c.req
        if req.num_allocated and req.seq_id in cache:
            cache.discard(req.seq_id, written=c.start)
            req.num_allocated = 0
