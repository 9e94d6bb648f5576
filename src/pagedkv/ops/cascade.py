"""Shared-prefix (cascade) attention: rows that share a cached prefix read it once.

When many sequences share a cached chain (one system prompt, parallel samples of one
prompt), plain paged attention reads the shared blocks once per sequence. Cascade
attention splits each sequence's keys in two and merges the parts exactly through their
log-sum-exp (as FlashInfer's ``MultiLevelCascadeAttentionWrapper`` and SGLang do):

1. **shared level**: per group, the query rows of all its sequences (decode: one row per
   sequence; prefill: every row of every chunk), times the G query heads of each KV
   head, are stacked into tiles of a matrix product against the group's shared K/V, so
   each shared block is read once per tile of up to 128 (row, head) pairs, not once per
   sequence; split along the prefix to fill the GPU. Float32 partial outputs + LSE.
2. **private level**: each sequence's own suffix ``[shared, seq_len)`` (split-KV decode,
   or causal prefill tiles), merged in the same kernel with the shared partials of its
   rows (a separate merge kernel when the suffixes themselves are split).

Contract (a :class:`CascadePlan` describes the grouping; the block tables stay the usual
per-sequence tables, shared part first):

- a group is ``(seqs, shared_blocks)``: the first ``shared_blocks`` entries of the block
  tables of all ``seqs`` are the same physical block ids, full blocks of cached KV (the
  block manager shares only full blocks), so ``shared = shared_blocks * block_size``
  tokens; a sequence is in at most one group; sequences in none have no shared part;
- decode: ``shared <= seq_len`` (the suffix may be empty); prefill: the shared prefix
  lies in the cached part before the chunk, ``shared <= seq_len - q_len``;
- the result equals plain :func:`pagedkv.ops.decode_attention` /
  :func:`~pagedkv.ops.prefill_attention` up to float32 rounding of the merge
  (``check=True`` verifies the sharing against the tables: one device sync).

Batch invariance: a row's bits in cascade mode depend on its group (the tiles it shares
and the split chosen from the batch), so a plan built in batch-invariant mode
(:func:`pagedkv.ops.batch_invariant_mode`, or ``batch_invariant=True``) ignores the
grouping and runs the plain kernels over the full block tables: decode results are then
bit-identical to ``decode_attention(..., batch_invariant=True)`` whatever the grouping
and the batch (the guarantee kept, the sharing speed-up given up); prefill results are
those of ``prefill_attention(..., batch_invariant=True)``.

A plan is built once per step on the host (O(rows), one host-to-device copy) and used
by every layer; :func:`cascade_decode` with ``out=`` and ``check=False`` allocates
nothing and never syncs, so it can be captured in a CUDA graph together with the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pagedkv._kv_formats import is_quantized
from pagedkv.ops import _checks
from pagedkv.ops._config import resolve, resolve_invariant
from pagedkv.ops.cascade_launch import plan_launch


class CascadeGroup(NamedTuple):
    """Sequences (batch indices) whose first ``shared_blocks`` table entries are shared."""

    seqs: tuple[int, ...]
    shared_blocks: int


def _int_list(obj: object, what: str) -> list[int]:
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 1 or obj.dtype.is_floating_point or obj.dtype == torch.bool:
            raise TypeError(f"{what} must be a 1-D integer tensor or a sequence of ints")
        return [int(x) for x in obj.tolist()]
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence):
        raise TypeError(f"{what} must be a sequence of ints, got {type(obj).__name__}")
    for x in obj:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{what} must hold ints, got {x!r}")
    return list(obj)


class CascadePlan:
    """The grouping of one batch for :func:`cascade_decode` / :func:`cascade_prefill`.

    ``groups``: ``[(seqs, shared_blocks), ...]`` (see the module docstring); ``num_seqs``:
    the batch size B (rows of the block tables). ``q_lens`` (prefill only): the chunk
    length of each sequence, packed in order (``cu_seqlens_q`` is their prefix sum); None
    builds a decode plan (one query row per sequence). ``max_seq_len`` bounds seq_lens.
    Groups with fewer than ``min_group_size`` sequences or no shared block are computed as
    plain rows (a group of one gains nothing from a separate shared pass).
    ``shared_split_tokens`` / ``private_split_tokens`` override the split sizes (tuning).

    Usage, once per step, shared by all layers::

        plan = CascadePlan([(range(0, 200), 64), ([201, 205], 8)], 256, num_q_heads=32,
                           num_kv_heads=8, head_dim=128, block_size=16, max_seq_len=4096,
                           dtype=torch.bfloat16, device="cuda")
        out = ops.cascade_decode(q, pool.k(layer), pool.v(layer), tables, seq_lens, plan)
    """

    def __init__(
        self,
        groups: Sequence[tuple[Sequence[int], int]],
        num_seqs: int,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        q_lens: Sequence[int] | None = None,
        min_group_size: int = 2,
        batch_invariant: bool | None = None,
        backend: str | None = None,
        shared_split_tokens: int | None = None,
        private_split_tokens: int | None = None,
    ) -> None:
        _checks.plan_int("CascadePlan", "num_seqs", num_seqs, minimum=0)
        sizes = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        sizes.update(block_size=block_size, max_seq_len=max_seq_len, min_group_size=min_group_size)
        for name, val in sizes.items():
            _checks.plan_int("CascadePlan", name, val)
        for name, split in (("shared_split_tokens", shared_split_tokens),
                            ("private_split_tokens", private_split_tokens)):  # fmt: skip
            if split is not None:
                _checks.plan_int("CascadePlan", name, split)
        _checks.head_group(num_q_heads, num_kv_heads)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"CascadePlan dtype must be a torch.dtype, got {dtype!r}")
        dev = _checks.plan_device(device)
        self.device = dev
        self.backend = resolve(backend, self.device)
        self.batch_invariant = resolve_invariant(batch_invariant)
        self.shape = (num_q_heads, num_kv_heads, head_dim, block_size)
        self.dtype, self.num_seqs, self.max_seq_len = dtype, num_seqs, max_seq_len
        self.is_prefill = q_lens is not None
        lens = [1] * num_seqs if q_lens is None else _int_list(q_lens, "q_lens")
        if len(lens) != num_seqs or min(lens, default=0) < 0:
            raise ValueError(f"q_lens must hold {num_seqs} ints >= 0, got {lens}")
        self.q_lens = tuple(lens)
        self.cu_seqlens = [0]
        for n in lens:
            self.cu_seqlens.append(self.cu_seqlens[-1] + n)
        self.num_q_rows = self.cu_seqlens[-1]
        self.max_q_len = max(lens, default=0)
        self.groups, self.shared_tokens = self._normalise(groups, min_group_size)
        self.cu_seqlens_q = torch.tensor(self.cu_seqlens, dtype=torch.int32).to(self.device)
        self._check_index: tuple[torch.Tensor, ...] | None = None
        self.launch = None  # what the Triton kernels launch (cascade_launch.Launch)
        if self.backend == "triton" and not self.batch_invariant and num_seqs:
            self.launch = plan_launch(self, shared_split_tokens, private_split_tokens)

    def _normalise(self, groups, min_group_size) -> tuple[tuple[CascadeGroup, ...], tuple]:
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
            raise TypeError(
                f"groups must be a sequence of (seqs, shared_blocks) pairs, got "
                f"{type(groups).__name__}"
            )
        bs = self.shape[3]
        owner: dict[int, int] = {}
        kept, shared = [], [0] * self.num_seqs
        for gi, grp in enumerate(groups):
            if not isinstance(grp, (tuple, list)) or len(grp) != 2:
                raise TypeError(f"groups[{gi}] must be a (seqs, shared_blocks) pair, got {grp!r}")
            seqs, nblk = _int_list(grp[0], f"groups[{gi}] seqs"), grp[1]
            if isinstance(nblk, bool) or not isinstance(nblk, int) or nblk < 0:
                raise ValueError(f"groups[{gi}] shared_blocks must be an int >= 0, got {nblk!r}")
            if not seqs:
                raise ValueError(f"groups[{gi}] has no sequences")
            for s in seqs:
                if not 0 <= s < self.num_seqs:
                    raise ValueError(
                        f"groups[{gi}] names sequence {s}, outside [0, {self.num_seqs})"
                    )
                if s in owner:
                    raise ValueError(
                        f"sequence {s} is in groups[{owner[s]}] and groups[{gi}]; a sequence "
                        "shares its prefix with one group only"
                    )
                owner[s] = gi
                need = nblk * bs + (self.q_lens[s] if self.is_prefill else 0)
                if need > self.max_seq_len:
                    raise ValueError(
                        f"groups[{gi}]: {nblk} shared blocks ({nblk * bs} tokens) plus sequence "
                        f"{s}'s chunk exceed max_seq_len {self.max_seq_len}"
                    )
            if nblk == 0 or len(seqs) < min_group_size:
                continue
            kept.append(CascadeGroup(tuple(seqs), nblk))
            for s in seqs:
                shared[s] = nblk * bs
        return tuple(kept), tuple(shared)

    @classmethod
    def for_pool(cls, pool, groups, num_seqs: int, num_q_heads: int, max_seq_len: int, **kw):
        """A plan matching a :class:`pagedkv.storage.KVPool`'s layout and device."""
        lay = pool.layout
        refuse_quantized(lay.kv_dtype)
        return cls(groups, num_seqs, num_q_heads=num_q_heads, num_kv_heads=lay.num_kv_heads,
                   head_dim=lay.head_dim, block_size=lay.block_size, max_seq_len=max_seq_len,
                   dtype=lay.dtype, device=pool.device, **kw)  # fmt: skip

    def group_q_rows(self, grp: CascadeGroup) -> list[int]:
        """The query rows of a group's sequences (decode: the sequences themselves)."""
        if not self.is_prefill:
            return list(grp.seqs)
        return [r for s in grp.seqs for r in range(self.cu_seqlens[s], self.cu_seqlens[s + 1])]

    def __repr__(self) -> str:
        kind = "prefill" if self.is_prefill else "decode"
        sizes = [len(g.seqs) for g in self.groups]
        return (
            f"CascadePlan({kind}, {self.num_seqs} seqs, {len(self.groups)} groups of {sizes}, "
            f"backend={self.backend}, batch_invariant={self.batch_invariant})"
        )

    # ---- checks at run time ------------------------------------------------------------
    def check_args(self, q, k_cache, v_cache, block_tables, seq_lens, out) -> None:
        """Shapes, dtypes and devices of one call against the plan (no device sync)."""
        hq, hkv, d, bs = self.shape
        _checks.cache_pair(k_cache, v_cache)
        refuse_quantized(k_cache.dtype)
        if tuple(k_cache.shape[1:]) != (bs, hkv, d) or k_cache.dtype != self.dtype:
            raise ValueError(
                f"cache {tuple(k_cache.shape)} {k_cache.dtype} does not match the plan "
                f"(block_size {bs}, Hkv {hkv}, D {d}, {self.dtype})"
            )
        if k_cache.device != self.device:
            raise ValueError(f"the KV cache is on {k_cache.device} but the plan on {self.device}")
        rows, heads = _checks.query(q, "q", k_cache, 3)
        if rows != self.num_q_rows or heads != hq:
            raise ValueError(
                f"q {tuple(q.shape)} does not match the plan: [{self.num_q_rows}, {hq}, {d}]"
            )
        _checks.tables(block_tables, seq_lens, self.num_seqs, k_cache.device)
        if out is not None:
            _checks.tensor(out, "out")
            if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
                raise ValueError(
                    f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                    f"{tuple(out.shape)} {out.dtype} on {out.device}"
                )
            if out.stride(-1) != 1:
                raise ValueError("out needs a contiguous last (head_dim) dimension")

    def check_values(self, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Tables in range, lengths within the plan, shared prefixes really shared (one sync)."""
        if self.num_seqs == 0:
            return
        lens = seq_lens.to(torch.int64)
        shared = torch.tensor(self.shared_tokens, dtype=torch.int64, device=lens.device)
        need = shared + torch.tensor(self.q_lens, dtype=torch.int64, device=lens.device) * int(
            self.is_prefill
        )
        width = block_tables.shape[1]
        max_blk = max((g.shared_blocks for g in self.groups), default=0)
        if max_blk > width:
            raise ValueError(
                f"the plan shares {max_blk} blocks but the block tables have {width} columns"
            )
        bad_share = torch.zeros((), dtype=torch.bool, device=lens.device)
        if self.groups:
            rows, lead, nblk = self._share_index(lens.device)
            cols = torch.arange(max_blk, device=lens.device)
            differ = block_tables[rows, :max_blk] != block_tables[lead, :max_blk]
            bad_share = (differ & (cols[None, :] < nblk[:, None])).any()
        short = lens < need
        stats = torch.stack(
            [lens.max(), short.any().to(torch.int64), bad_share.to(torch.int64)]
        ).tolist()
        hi, any_short, any_bad = stats
        if hi > self.max_seq_len:
            raise ValueError(f"a sequence is longer than the plan's max_seq_len {self.max_seq_len}")
        if any_short:
            b = int(short.nonzero()[0, 0])
            what = "its shared prefix plus its chunk" if self.is_prefill else "its shared prefix"
            raise ValueError(
                f"seq_lens[{b}] = {int(lens[b])} is shorter than {what} ({int(need[b])} tokens)"
            )
        if any_bad:
            for grp in self.groups:
                ref = block_tables[grp.seqs[0], : grp.shared_blocks]
                for s in grp.seqs:
                    if not torch.equal(block_tables[s, : grp.shared_blocks], ref):
                        raise ValueError(
                            f"sequence {s} does not share the first {grp.shared_blocks} blocks "
                            f"of sequence {grp.seqs[0]} (its group); regroup or rebuild the plan"
                        )

    def _share_index(self, device) -> tuple[torch.Tensor, ...]:
        if self._check_index is None:
            rows: list[int] = []
            lead: list[int] = []
            nblk: list[int] = []
            for grp in self.groups:
                rows += grp.seqs
                lead += [grp.seqs[0]] * len(grp.seqs)
                nblk += [grp.shared_blocks] * len(grp.seqs)
            self._check_index = tuple(
                torch.tensor(x, dtype=torch.int64, device=device) for x in (rows, lead, nblk)
            )
        return self._check_index


def refuse_quantized(kv_dtype: torch.dtype) -> None:
    """Cascade attention reads bf16 / fp16 / fp32 caches only: raise for fp8 / int8 ones."""
    if is_quantized(kv_dtype):
        raise TypeError(
            f"cascade attention does not read quantized ({kv_dtype}) KV caches; use "
            "pagedkv.ops.decode_attention / prefill_attention with k_scales and v_scales "
            "(each sequence reads its shared prefix itself)"
        )
