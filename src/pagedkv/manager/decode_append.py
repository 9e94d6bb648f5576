"""One token for each of many sequences: the append of an engine's decode step.

A decode step appends one token to every running sequence; almost every such token
lands in its sequence's partly filled last block, held by it alone, without filling it.
:meth:`DecodeAppends.append_each` does exactly that in one line per sequence and hands
every other case (a new block, a copy-on-write, a block that fills and is registered,
an unknown id) to :meth:`BlockManager.append <pagedkv.manager.BlockManager.append>`,
so the result is that of ``append(seq_id, [token])`` for each pair in order.

:class:`DecodeAppends` is a part of :class:`~pagedkv.manager.BlockManager` (which
subclasses it and sets the attributes declared below).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from pagedkv.manager.hashing import as_token_array
from pagedkv.manager.sequence import SeqRecord


class DecodeAppends:
    """``append_each`` (see the module doc)."""

    block_size: int
    _ref: list[int]
    _seqs: dict[Hashable, SeqRecord]
    _observed: bool

    if TYPE_CHECKING:  # BlockManager's

        def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None: ...

    def append_each(self, seq_ids: Sequence[Hashable], token_ids: Sequence[int]) -> None:
        """``append(seq_ids[i], [token_ids[i]])`` for each ``i``, in order.

        Checked first, nothing changed on error: the lengths match (``ValueError``),
        every token id is valid (as in append()) and every sequence is live
        (``KeyError``). Out of blocks part way raises append()'s :class:`OutOfBlocks`
        with the appends before it done.
        """
        if len(seq_ids) != len(token_ids):
            raise ValueError(
                f"append_each() needs one token per sequence: {len(seq_ids)} sequence ids, "
                f"{len(token_ids)} token ids"
            )
        tokens = as_token_array(token_ids if type(token_ids) is list else list(token_ids))
        seqs = self._seqs
        for seq_id in seq_ids:
            if seq_id not in seqs:
                raise KeyError(f"unknown sequence {seq_id!r}: allocate() it first (or it was "
                               "already freed)")  # fmt: skip
        if self._observed:  # subscribers and watchers see every append
            for seq_id, token in zip(seq_ids, tokens):
                self.append(seq_id, [token])
            return
        ref, bs = self._ref, self.block_size
        for seq_id, token in zip(seq_ids, tokens):
            seq = seqs[seq_id]
            n = len(seq.tokens) + 1  # its length after this token
            blocks = seq.blocks
            # in its last block, which it holds alone, and that block is not full yet
            if n % bs and n <= len(blocks) * bs and (n % bs == 1 or ref[blocks[-1]] == 1):
                seq.tokens.append(token)
            else:
                self.append(seq_id, [token])
