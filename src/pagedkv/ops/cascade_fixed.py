"""Cascade plans of fixed capacity, refilled in place: shared-prefix decode in CUDA graphs.

A :class:`~pagedkv.ops.CascadePlan` is built for one batch: its launch grid, split sizes
and metadata follow that batch's grouping, so a CUDA graph captured with it only replays
that grouping. Here the two halves are apart:

- :class:`CascadeGrouping` holds the grouping of up to ``num_seqs`` decode rows in one
  int32 device buffer of fixed size (tiles, rows, groups, per-row shared lengths, with
  room for ``max_groups`` groups). :meth:`CascadeGrouping.refill` rewrites it in place
  with one host-to-device copy (pinned, asynchronous: no sync), so the same device
  addresses describe each new grouping.
- :class:`FixedCascadePlan` is a decode :class:`~pagedkv.ops.CascadePlan` over such a
  grouping whose launch parameters depend only on the capacity (``num_seqs``, the
  longest sequence ``max_seq_len``, ``max_groups``): the grid has every tile a grouping
  can need (unused ones belong to an empty group and return at once), the shared-level
  split is chosen for a prefix as long as ``max_seq_len`` (a shorter one leaves slots
  unused: they are neither written nor read) and the private split for a row without a
  shared part. A graph captured with the plan replays correctly for any grouping
  refilled later; rows outside every group (and padding rows of length 0) are plain.

Several plans (e.g. one per table-width bucket) may share one grouping. The kernels are
those of :mod:`pagedkv.ops.triton_cascade`; on the torch reference backend the plan reads
the host copy of the grouping. Results equal plain decode up to float32 rounding, as for
any cascade plan; a plan built in batch-invariant mode runs the plain kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pagedkv.ops import _checks
from pagedkv.ops._config import resolve, resolve_invariant
from pagedkv.ops.cascade import CascadeGroup, CascadePlan, _int_list
from pagedkv.ops.cascade_launch import (
    Launch,
    choose_private_split,
    choose_shared_split,
    private_decode_config,
    shared_config,
    sm_count,
)

_FIELDS = ("tile_group", "tile_start", "rows", "row_ptr", "leader", "shared_len", "row_shared")


class CascadeGrouping:
    """The cascade grouping of a decode batch of ``num_seqs`` rows, in fixed-size device
    buffers (``meta``: int32 views the kernels read) refilled in place by :meth:`refill`.

    ``num_q_heads``, ``num_kv_heads``, ``head_dim``, ``block_size``, ``dtype`` and
    ``device`` are the layout of the caches and queries the plans over it serve;
    ``max_groups``: the most groups kept (a grouping with more keeps those that save
    the most block reads; the rest of its rows run plain). ``groups`` and
    ``shared_tokens`` are the host copy of the current grouping.
    """

    def __init__(
        self,
        num_seqs: int,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_groups: int = 8,
    ) -> None:
        for name, val in (("num_seqs", num_seqs), ("max_groups", max_groups)):
            _checks.plan_int("CascadeGrouping", name, val, minimum=0)
        for name, val in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("block_size", block_size)):  # fmt: skip
            _checks.plan_int("CascadeGrouping", name, val)
        g = _checks.head_group(num_q_heads, num_kv_heads)
        dev = _checks.plan_device(device)
        self.device, self.dtype, self.num_seqs = dev, dtype, num_seqs
        self.shape = (num_q_heads, num_kv_heads, head_dim, block_size)
        self.max_groups = max_groups
        self.block_q = shared_config(head_dim, dtype)["BLOCK_Q"]
        # each group's (row, head) pairs fill whole tiles but its last: at most one more
        self.max_tiles = max(1, -(-num_seqs * g // self.block_q) + max_groups)
        m = max_groups
        sizes = (self.max_tiles, self.max_tiles, num_seqs, m + 2, m + 1, m + 1, num_seqs)
        self.buffer = torch.zeros(max(1, sum(sizes)), dtype=torch.int32, device=dev)
        self.meta: dict[str, torch.Tensor] = {}
        at = 0
        for name, n in zip(_FIELDS, sizes):
            self.meta[name] = self.buffer[at : at + n]
            at += n
        self._sizes = sizes
        self.groups: tuple[CascadeGroup, ...] = ()
        self.shared_tokens: tuple[int, ...] = (0,) * num_seqs
        self.refill(())

    def refill(self, groups: Sequence[tuple[Sequence[int], int]]) -> None:
        """Make ``groups`` (``[(rows, shared_blocks), ...]``, as for
        :class:`~pagedkv.ops.CascadePlan`: the first ``shared_blocks`` table entries of
        every row of a group are the same full blocks) the grouping the plans read.

        Groups of one row or no block are dropped (they run plain); past ``max_groups``
        the groups saving the most block reads are kept. One asynchronous copy; a graph
        replayed after it reads the new grouping. ``ValueError``/``TypeError`` for rows
        out of range, a row in two groups or a negative block count (nothing changes).
        """
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
            raise TypeError(f"groups must be a sequence of (rows, shared_blocks) pairs, got "
                            f"{type(groups).__name__}")  # fmt: skip
        hq, hkv, _, bs = self.shape
        g = hq // hkv
        seen: set[int] = set()
        kept = []
        for gi, grp in enumerate(groups):
            if not isinstance(grp, (tuple, list)) or len(grp) != 2:
                raise TypeError(f"groups[{gi}] must be a (rows, shared_blocks) pair, got {grp!r}")
            rows = _int_list(grp[0], f"groups[{gi}] rows")
            nblk = grp[1]
            if isinstance(nblk, bool) or not isinstance(nblk, int) or nblk < 0:
                raise ValueError(f"groups[{gi}] shared_blocks must be an int >= 0, got {nblk!r}")
            for r in rows:
                if not 0 <= r < self.num_seqs:
                    raise ValueError(f"groups[{gi}] names row {r}, outside [0, {self.num_seqs})")
                if r in seen:
                    raise ValueError(f"row {r} is in two groups; a row shares with one group")
                seen.add(r)
            if len(rows) >= 2 and nblk > 0:
                kept.append(CascadeGroup(tuple(rows), nblk))
        if len(kept) > self.max_groups:
            kept.sort(key=lambda grp: -(len(grp.seqs) - 1) * grp.shared_blocks)
            kept = kept[: self.max_groups]
        m, n_tiles = self.max_groups, self.max_tiles
        tile_group, tile_start, rows, row_ptr, leader, shared_len = [], [], [], [0], [], []
        row_shared = [0] * self.num_seqs
        for gi, grp in enumerate(kept):
            for p0 in range(0, len(grp.seqs) * g, self.block_q):
                tile_group.append(gi)
                tile_start.append(p0)
            rows += grp.seqs
            row_ptr.append(len(rows))
            leader.append(grp.seqs[0])
            shared_len.append(grp.shared_blocks * bs)
            for r in grp.seqs:
                row_shared[r] = grp.shared_blocks * bs
        # unused tiles name group m, which has no rows and no shared tokens: they return
        tile_group += [m] * (n_tiles - len(tile_group))
        tile_start += [0] * (n_tiles - len(tile_start))
        row_ptr += [len(rows)] * (m + 2 - len(row_ptr))
        rows += [0] * (self.num_seqs - len(rows))
        leader += [0] * (m + 1 - len(leader))
        shared_len += [0] * (m + 1 - len(shared_len))
        flat = tile_group + tile_start + rows + row_ptr + leader + shared_len + row_shared
        host = torch.from_numpy(np.asarray(flat or [0], dtype=np.int32))
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.buffer[: host.numel()].copy_(host, non_blocking=True)
        self.groups = tuple(kept)
        self.shared_tokens = tuple(row_shared)

    def __repr__(self) -> str:
        sizes = [len(grp.seqs) for grp in self.groups]
        return f"CascadeGrouping({self.num_seqs} rows, {len(self.groups)} groups of {sizes})"


class FixedCascadePlan(CascadePlan):
    """A decode :class:`~pagedkv.ops.CascadePlan` over a :class:`CascadeGrouping`, with
    launch parameters fixed by the capacity (see the module docstring): use it with
    :func:`pagedkv.ops.cascade_decode` (``check=False``, inside a CUDA graph or not) for
    any grouping the grouping object is refilled with, and any seq_lens up to
    ``max_seq_len``. ``backend`` / ``batch_invariant`` as for a ``CascadePlan``.
    """

    def __init__(
        self,
        grouping: CascadeGrouping,
        *,
        max_seq_len: int,
        backend: str | None = None,
        batch_invariant: bool | None = None,
    ) -> None:
        if not isinstance(grouping, CascadeGrouping):
            raise TypeError(f"grouping must be a CascadeGrouping, got {type(grouping).__name__}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        self.grouping = grouping
        self.device, self.dtype, self.shape = grouping.device, grouping.dtype, grouping.shape
        self.backend = resolve(backend, self.device)
        self.batch_invariant = resolve_invariant(batch_invariant)
        b = self.num_seqs = grouping.num_seqs
        self.max_seq_len = max_seq_len
        self.is_prefill = False
        self.q_lens = (1,) * b
        self.cu_seqlens = list(range(b + 1))
        self.num_q_rows, self.max_q_len = b, min(b, 1)
        self.cu_seqlens_q = torch.arange(b + 1, dtype=torch.int32, device=self.device)
        self._check_index = None
        self.launch = None
        if self.backend == "triton" and not self.batch_invariant and b:
            self.launch = self._fixed_launch()

    @property
    def groups(self) -> tuple[CascadeGroup, ...]:  # type: ignore[override]
        return self.grouping.groups

    @property
    def shared_tokens(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.grouping.shared_tokens

    def check_values(self, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """As :meth:`CascadePlan.check_values`, for the grouping refilled last."""
        self._check_index = None  # the grouping may have been refilled since
        super().check_values(block_tables, seq_lens)
        if self.groups and max(g.shared_blocks for g in self.groups) * self.shape[3] > (
            self.max_seq_len
        ):
            raise ValueError(f"a shared prefix is longer than max_seq_len {self.max_seq_len}")

    def _fixed_launch(self) -> Launch:
        hq, hkv, d, _ = self.shape
        b, n = self.num_seqs, self.max_seq_len
        sms = sm_count(self.device)
        scfg = shared_config(d, self.dtype)
        pcfg = private_decode_config(d, self.dtype)
        assert scfg["BLOCK_Q"] == self.grouping.block_q  # the tiles were packed with it
        full_tiles = max(1, -(-b * (hq // hkv) // scfg["BLOCK_Q"]))
        split1 = choose_shared_split(full_tiles * hkv, n, scfg["BLOCK_N"], sms)
        slots1 = -(-n // split1)
        split2 = choose_private_split(b, hkv, n, pcfg["BLOCK_N"], sms)
        splits2 = max(1, -(-n // split2))
        fused = splits2 == 1
        slots = slots1 + (0 if fused else splits2)
        f32, dev = torch.float32, self.device
        return Launch(
            shared_cfg=scfg, private_cfg=pcfg, n_tiles=self.grouping.max_tiles, split1=split1,
            slots1=slots1, split2=split2, splits2=splits2, fused=fused, prefill_tiles=0,
            meta=self.grouping.meta, o_ws=torch.empty(b, hq, slots, d, dtype=f32, device=dev),
            lse_ws=torch.empty(b, hq, slots, dtype=f32, device=dev),
        )  # fmt: skip

    def __repr__(self) -> str:
        sizes = [len(g.seqs) for g in self.groups]
        return (
            f"FixedCascadePlan({self.num_seqs} seqs, max_seq_len {self.max_seq_len}, "
            f"{len(self.groups)} groups of {sizes}, backend={self.backend})"
        )
