"""Batch-invariant attention: a query row's bits are one function of its q and the keys
it sees, whichever op computes it — decode alone, decode in a batch, prefill in chunks of
any budget, after any prefix hit, packed with other sequences' chunks — on the torch
reference and on the Triton kernels (the interpreter without CUDA)."""

from __future__ import annotations

import pytest
import torch

from _kvcases import paged_case
from pagedkv import ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HKV, G, BS = 2, 2, 8
FEATURES = {  # the per-layer options, each on its own and mixed
    "plain": {},
    "window": dict(window=13),
    "softcap+sinks": dict(softcap=0.5, sinks=True),
}


def _case(dtype, d, target_len, seed):
    """A cache holding a target sequence of ``target_len`` tokens and 4 others; q rows of
    the target for every position (a row's q is fixed by its position)."""
    torch.manual_seed(seed)
    lens = [target_len, 7, 40, 1, 23]
    k, v, bt, sl = paged_case(lens, G * HKV, HKV, d, BS, dtype, DEV)
    q_all = torch.randn(target_len, G * HKV, d, device=DEV).to(dtype)  # q of position p
    return k, v, bt, sl, q_all


def _opts(feature, dtype):
    opts = dict(FEATURES[feature])
    if opts.pop("sinks", False):
        opts["sinks"] = torch.randn(G * HKV, device=DEV)
    return opts


def _decode_row(q_all, k, v, bt, sl, p, others, backend, opts):
    """Row p of the target (sequence 0) by decode, in a batch with ``others`` (indices of
    other sequences) around it: [others[0], others[1], target, others[2:]...]."""
    rows = [*others[:2], 0, *others[2:]]
    at = rows.index(0)
    q = torch.randn(len(rows), *q_all.shape[1:], device=DEV).to(q_all.dtype)
    q[at] = q_all[p]
    lens = sl[rows].clone()
    lens[at] = p + 1
    out = ops.decode_attention(q, k, v, bt[rows], lens, backend=backend, **opts)
    return out[at]


def _prefill_rows(q_all, k, v, bt, sl, chunks, others, backend, opts):
    """The target's rows of ``chunks`` (``(start, end)`` position ranges, each after a
    cached prefix of ``start`` tokens), each chunk prefilled in its own call packed
    between chunks of the ``others`` sequences. Returns {position: row output}."""
    got = {}
    order = [*others[:1], 0, *others[1:]]
    for start, end in chunks:
        q_parts, q_lens, lens = [], [], []
        for s in order:
            if s == 0:
                n, m, qs = end, end - start, q_all[start:end]
            else:
                n = int(sl[s])
                m = max(1, n // 3)  # the other sequence's last third: a prefix-hit chunk
                qs = torch.randn(m, *q_all.shape[1:], device=DEV).to(q_all.dtype)
            q_parts.append(qs)
            q_lens.append(m)
            lens.append(n)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
        out = ops.prefill_attention(
            torch.cat(q_parts), cu.to(DEV), k, v, bt[order], lens_t, backend=backend, **opts
        )
        first = int(cu[order.index(0)])
        for i, p in enumerate(range(start, end)):
            got[p] = out[first + i]
    return got


def _check_rows(
    backend, dtype, d, feature, target_len, positions, chunkings, seed=0, batch=(1, 2, 3, 4),
    packed=(2, 4),
):  # fmt: skip
    """Row p of the target by decode alone, by decode in a batch with the sequences
    ``batch``, and by prefill in each of ``chunkings`` packed with chunks of ``packed``."""
    k, v, bt, sl, q_all = _case(dtype, d, target_len, seed)
    opts = _opts(feature, dtype)
    batch, packed = list(batch), list(packed)
    with ops.batch_invariant_mode():
        alone = {p: _decode_row(q_all, k, v, bt, sl, p, [], backend, opts) for p in positions}
        batched = {p: _decode_row(q_all, k, v, bt, sl, p, batch, backend, opts)
                   for p in positions}  # fmt: skip
        prefilled = [_prefill_rows(q_all, k, v, bt, sl, c, packed, backend, opts)
                     for c in chunkings]  # fmt: skip
    for p in positions:
        assert torch.equal(alone[p], batched[p]), f"decode row {p}: alone != in a batch"
        for chunks, rows in zip(chunkings, prefilled):
            diff = (rows[p].float() - alone[p].float()).abs().max().item()
            assert torch.equal(rows[p], alone[p]), (
                f"{backend} {dtype} {feature}: row {p} by prefill in chunks {chunks} differs "
                f"from decode by up to {diff:.3g}"
            )
    # the same rows outside the mode: prefill reduces in its own order (shown, not asserted)
    default = _prefill_rows(q_all, k, v, bt, sl, chunkings[0], packed, backend, opts)
    same = sum(torch.equal(default[p], alone[p]) for p in positions)
    print(f"{backend} {dtype} {feature}: default-mode prefill rows == invariant decode: "
          f"{same}/{len(positions)}")  # fmt: skip


# chunkings of positions 0..39 of a 40-token target: one chunk (no prefix), chunks of 5,
# 8 (block-aligned), 13 and a ragged cut, i.e. every row after several prefix lengths
SHORT_CHUNKINGS = [
    [(0, 40)],
    [(i, i + 5) for i in range(0, 40, 5)],
    [(i, min(i + 13, 40)) for i in range(0, 40, 13)],
    [(0, 8), (8, 9), (9, 31), (31, 40)],
]


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_reference_rows_are_the_same_by_decode_and_by_prefill(dtype, feature):
    _check_rows("reference", dtype, 16, feature, 40, range(40), SHORT_CHUNKINGS)


def test_reference_rows_across_the_invariant_split_boundary():
    """Rows of a 530-token sequence around the 512-token split of invariant decode, each
    after prefix hits of several lengths."""
    chunkings = [[(500, 530)], [(500, 512), (512, 530)], [(500, 507), (507, 521), (521, 530)]]
    _check_rows("reference", torch.bfloat16, 16, "plain", 530, range(500, 530), chunkings)


@pytest.mark.parametrize(
    "dtype,feature", [(torch.bfloat16, "plain"), (torch.float32, "window"),
                      (torch.bfloat16, "softcap+sinks")], ids=str,
)  # fmt: skip
def test_triton_rows_are_the_same_by_decode_and_by_prefill(dtype, feature):
    pytest.importorskip("triton")
    chunkings = [[(0, 12)], [(0, 3), (3, 11), (11, 12)], [(0, 8), (8, 9), (9, 12)]]
    _check_rows("triton", dtype, 16, feature, 12, range(12), chunkings, 1, (1, 3), (3,))


@pytest.mark.slow
def test_triton_rows_across_the_invariant_split_boundary():
    pytest.importorskip("triton")
    chunkings = [[(509, 515)], [(509, 512), (512, 515)], [(509, 514), (514, 515)]]
    rows = range(509, 515)
    _check_rows("triton", torch.bfloat16, 16, "plain", 515, rows, chunkings, 0, (3,), (3,))


def test_rows_as_sequences_gives_each_row_its_position_and_table():
    from pagedkv.ops.invariant_attention import rows_as_sequences

    cu = torch.tensor([0, 3, 3, 4], dtype=torch.int32)  # q_lens 3, 0, 1
    tables = torch.tensor([[5, 6], [7, 8], [9, 10]], dtype=torch.int32)
    lens = torch.tensor([10, 4, 1], dtype=torch.int32)  # prefixes 7, 4, 0
    t, n = rows_as_sequences(cu, tables, lens, 4)
    assert n.tolist() == [8, 9, 10, 1] and n.dtype == torch.int32
    assert t.tolist() == [[5, 6], [5, 6], [5, 6], [9, 10]] and t.dtype == torch.int32
