"""Batch-invariant prefill: every query row computed exactly as decode computes it.

In batch-invariant mode a query row's attention output must be one function of its q and
of the keys it sees, whichever kernel computes it: the engine computes a token's KV in a
decode step on one run and in a prefill chunk on another (a recompute after preemption,
a prefix computed in another batch, a chunk budget that cuts the prompt elsewhere), and
that KV feeds every later layer and token. Decode and prefill kernels reduce in
different orders (the decode kernel stacks the G query heads of a KV head as the rows of
its tiles, splits the keys at fixed 512-token boundaries and merges the splits; the
prefill kernel stacks BLOCK_M query positions of one head and does not split; the torch
reference multiplies all of a sequence's rows by all of its keys), so their bits differ.

Here, in invariant mode, prefill runs the decode path: row i of sequence b becomes a
decode "sequence" of length ``p + 1`` (p its position) with b's block table. Its result
is then the invariant decode result by construction, whatever the chunk, the prefix hit
or the batch: same kernel, same constants, same inputs. Invariant decode is itself
independent of the batch (:mod:`pagedkv.ops.decode_splits`).

Cost: a row reads its keys alone (no reuse of a K/V tile across the rows of a chunk), so
prefill attention reads ``sum of positions`` keys instead of ``chunk x context / BLOCK_M``
— mostly from L2 for a chunk's own sequences. It stays a small part of a step for
prompts of a few thousand tokens; for very long prompts invariant prefill attention
becomes the step's main cost.
"""

from __future__ import annotations

import torch


def rows_as_sequences(
    cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_tables [T, W], seq_lens [T]) of the ``num_rows`` packed query rows as decode
    sequences: row ``cu[b] + j`` of sequence b sits at position ``seq_lens[b] - q_len_b +
    j``, so it is a sequence of that position + 1 tokens with b's table. On the tensors'
    device, without a host sync; dtypes are kept (the decode kernels' shape class)."""
    dev = seq_lens.device
    cu = cu_seqlens_q.to(device=dev, dtype=torch.int64)
    q_lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(
        torch.arange(q_lens.shape[0], device=dev), q_lens, output_size=num_rows
    )  # [T]: the sequence of each row
    rows = torch.arange(num_rows, device=dev)
    # position + 1 = seq_lens[b] - (cu[b + 1] - row)
    lens = seq_lens.to(torch.int64)[seq] - (cu[1:][seq] - rows) + 1
    return block_tables.index_select(0, seq.to(block_tables.device)), lens.to(seq_lens.dtype)
