"""Argument checks shared by every backend: they raise before anything is launched.

Shape / dtype / device checks read tensor metadata only. Value checks (block ids in
range, lengths that fit their table) read the data, which on CUDA costs one
device-to-host sync per call; callers on a hot path pass ``check=False`` after
validating once (e.g. in :class:`pagedkv.ops.DecodePlan`).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from pagedkv._kv_formats import COMPUTE_DTYPES, dtype_name, is_quantized
from pagedkv._tensor_checks import block_ids  # noqa: F401 (re-exported: ops' id checks are the shared ones)

INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def plan_int(who: str, name: str, val: object, minimum: int = 1) -> int:
    """``val`` if it is an int (not a bool) ``>= minimum`` (1 or 0); else the ``ValueError``
    naming argument ``name`` of plan class ``who``."""
    if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{who} {name} must be {wanted}, got {val!r}")
    return val


def head_group(num_q_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head; ``ValueError`` unless ``num_kv_heads`` divides them."""
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    return num_q_heads // num_kv_heads


def plan_device(device: torch.device | str) -> torch.device:
    """``device`` as a plan holds it: ``"cuda"`` names the current CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def index_tensor(x: object, name: str, ndim: int, device: torch.device) -> torch.Tensor:
    x = tensor(x, name)
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must be an int32 or int64 tensor, got {x.dtype}; use .to(torch.int32)"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    same_device(x, name, device)
    return x


def same_device(x: torch.Tensor, name: str, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on device {x.device} but the KV cache is on {device}; move it")


def cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Check one layer's K and V caches; return (num_blocks, block_size, Hkv, D)."""
    tensor(k_cache, "k_cache")
    tensor(v_cache, "v_cache")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache "
            f"{tuple(v_cache.shape)} {v_cache.dtype} must have the same shape and dtype"
        )
    if k_cache.device != v_cache.device:
        raise ValueError(f"k_cache on {k_cache.device} but v_cache on {v_cache.device}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last (head_dim) dimension")
    return tuple(k_cache.shape)  # type: ignore[return-value]


def query(q: object, name: str, k_cache: torch.Tensor, ndim: int) -> tuple[int, int]:
    """Check q against the cache; return (rows, Hq)."""
    q = tensor(q, name)
    _, _, hkv, d = k_cache.shape
    if q.dim() != ndim:
        want = "[B, Hq, D]" if ndim == 3 else "[T, Hq, D]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(q.shape)}")
    if q.shape[-1] != d:
        raise ValueError(f"{name} head_dim {q.shape[-1]} != cache head_dim {d}")
    if q.shape[1] % hkv != 0:
        raise ValueError(
            f"{name} has {q.shape[1]} query heads, not a multiple of the cache's "
            f"{hkv} KV heads (GQA)"
        )
    if is_quantized(k_cache.dtype):
        if q.dtype not in COMPUTE_DTYPES:
            raise TypeError(
                f"{name} dtype {q.dtype} must be a compute dtype (float16, bfloat16, float32) "
                f"over a quantized {dtype_name(k_cache.dtype)} KV cache"
            )
    elif q.dtype != k_cache.dtype:
        raise TypeError(f"{name} dtype {q.dtype} != KV cache dtype {k_cache.dtype}; cast q first")
    same_device(q, name, k_cache.device)
    return q.shape[0], q.shape[1]


def kv_scales(k_cache: torch.Tensor, k_scales: object, v_scales: object, backend: str) -> bool:
    """The scales that go with one layer's caches: float32 ``[num_blocks, Hkv]`` each, on
    the cache's device, for a quantized (fp8 / int8) cache; None for any other. Also
    refuses a quantized cache the chosen backend cannot read. Returns whether it is
    quantized."""
    nb, _, hkv, _ = k_cache.shape
    if not is_quantized(k_cache.dtype):
        if k_scales is not None or v_scales is not None:
            raise TypeError(
                f"k_scales / v_scales are for quantized (fp8 / int8) KV caches; this one is "
                f"{dtype_name(k_cache.dtype)}: pass None"
            )
        return False
    if k_scales is None or v_scales is None:
        raise TypeError(
            f"a {dtype_name(k_cache.dtype)} KV cache needs its k_scales and v_scales "
            f"(float32 [num_blocks, Hkv] = [{nb}, {hkv}]; pool.k_scales(layer), "
            "pool.v_scales(layer))"
        )
    for name, given in (("k_scales", k_scales), ("v_scales", v_scales)):
        sc = tensor(given, name)
        if sc.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {sc.dtype}")
        if tuple(sc.shape) != (nb, hkv):
            raise ValueError(
                f"{name} must be [num_blocks, Hkv] = [{nb}, {hkv}] (one scale per block and "
                f"KV head), got {tuple(sc.shape)}"
            )
        if sc.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last (head) dimension")
        same_device(sc, name, k_cache.device)
    if backend == "triton":
        triton_reads(k_cache.dtype, k_cache.device)
    return True


def triton_reads(dtype: torch.dtype, device: torch.device) -> None:
    """Raise when the Triton kernels cannot handle a quantized ``dtype`` on ``device``:
    Triton converts float8_e4m3fn only on compute capability 8.9+ (Ada, Hopper)."""
    if dtype == torch.float8_e4m3fn and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(
                f"the Triton kernels read float8_e4m3fn KV on compute capability 8.9+ "
                f"(Ada, Hopper); {device} is {major}.{minor}: use kv_dtype='fp8_e5m2' or "
                "'int8', or backend='reference'"
            )


def static_scales(value: object, dtype: torch.dtype) -> tuple[float, float] | None:
    """``None`` (dynamic scales) or ``(k_scale, v_scale)``: two finite floats > 0, only
    for a quantized cache."""
    if value is None:
        return None
    if not is_quantized(dtype):
        raise TypeError(
            f"static_scales are for quantized (fp8 / int8) KV caches; this one is "
            f"{dtype_name(dtype)}"
        )
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"static_scales must be a (k_scale, v_scale) pair, got {value!r:.60}")
    out = tuple(_real(x, "static_scales") for x in value)
    if not all(math.isfinite(x) and x > 0 for x in out):
        raise ValueError(f"static_scales must be finite numbers > 0, got {out}")
    return out  # type: ignore[return-value]


def block_runs(slots: torch.Tensor, block_size: int) -> None:
    """Dynamic-scale writes: the slots of one block are distinct and contiguous in the call
    (a -1 between them splits them too), so one program owns each block. One sync."""
    s = slots.to(torch.int64)
    blk = torch.where(s >= 0, s // block_size, -1)
    prev = torch.cat([blk.new_full((1,), -1), blk[:-1]])
    n_runs = int(((blk >= 0) & (blk != prev)).sum())
    valid = s[s >= 0]
    n_blocks = torch.unique(blk[blk >= 0]).numel()
    n_distinct, n_valid = torch.unique(valid).numel(), valid.numel()
    if n_distinct != n_valid:
        raise ValueError("slots must be distinct (a slot written twice in one call)")
    if n_runs != n_blocks:
        raise ValueError(
            "the slots of one block must be contiguous in a write into a dynamically scaled "
            f"(fp8 / int8) cache ({n_blocks} blocks appear in {n_runs} separate runs); write "
            "each sequence's tokens together, in order"
        )


def tables(block_tables: object, seq_lens: object, batch: int, device: torch.device) -> None:
    bt = index_tensor(block_tables, "block_tables", 2, device)
    sl = index_tensor(seq_lens, "seq_lens", 1, device)
    if bt.shape[0] != batch or sl.shape[0] != batch:
        raise ValueError(
            f"block_tables {tuple(bt.shape)} and seq_lens {tuple(sl.shape)} must have "
            f"{batch} rows (one per sequence)"
        )


def table_values(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_blocks: int,
    block_size: int,
    first_key: torch.Tensor | None = None,
) -> None:
    """Lengths within [0, table capacity], and every block id a sequence uses in range.

    ``first_key`` ([B], sliding windows): the first key position each sequence's queries
    see; blocks wholly before it are never read, so their entries may hold anything
    (e.g. blocks already released)."""
    if seq_lens.numel() == 0:
        return
    cap = block_tables.shape[1] * block_size
    lens = seq_lens.to(torch.int64)
    starts = torch.arange(block_tables.shape[1], device=lens.device)[None, :] * block_size
    used = starts < lens[:, None]
    if first_key is not None:
        used &= starts + block_size > first_key.to(torch.int64)[:, None]
    bad_id = used & ((block_tables < 0) | (block_tables >= num_blocks))
    stats = torch.stack([lens.min(), lens.max(), bad_id.any().to(torch.int64)]).tolist()
    lo, hi, any_bad = stats
    if lo < 0:
        raise ValueError(f"seq_lens must be >= 0, got {seq_lens.tolist()}")
    if hi > cap:
        b = int((lens > cap).nonzero()[0, 0])
        raise ValueError(
            f"seq_lens[{b}] = {int(lens[b])} exceeds its block table capacity "
            f"({block_tables.shape[1]} blocks x {block_size} tokens = {cap})"
        )
    if any_bad:
        b, j = (int(i) for i in bad_id.nonzero()[0])
        raise ValueError(
            f"block_tables[{b}, {j}] = {int(block_tables[b, j])} is out of range "
            f"[0, {num_blocks}) (the pool has {num_blocks} blocks)"
        )


class AttnOptions(NamedTuple):
    """Validated attention options shared by decode and prefill (see :func:`attn_options`)."""

    scale: float
    window: int | None
    softcap: float | None
    sinks: torch.Tensor | None


def attn_options(
    scale: object, window: object, softcap: object, sinks: object, q: torch.Tensor, check: bool
) -> AttnOptions:
    """Check the scale, sliding window, logit softcap and attention sinks of one call.

    ``scale`` None means 1/sqrt(D); ``window`` an int >= 1 or None; ``softcap`` a finite
    number > 0 or None; ``sinks`` a [Hq] tensor of float32 or q's dtype on q's device, or
    None. With ``check`` the sink values are read too (no NaN / +inf; -inf = no sink).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        scale = _real(scale, "scale")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"window must be an int (tokens) or None, got {type(window).__name__}")
        window = int(window)
        if window < 1:
            raise ValueError(
                f"window must be >= 1 token (a query sees itself), got {window}; "
                "use window=None for full attention"
            )
    if softcap is not None:
        softcap = _real(softcap, "softcap")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(
                f"softcap must be a finite number > 0 (or None for no capping), got {softcap}"
            )
    if sinks is not None:
        sinks = tensor(sinks, "sinks")
        hq = q.shape[1]
        if sinks.dim() != 1 or sinks.shape[0] != hq:
            raise ValueError(
                f"sinks must be [Hq] = [{hq}] (one logit per query head), "
                f"got shape {tuple(sinks.shape)}"
            )
        if sinks.dtype not in (torch.float32, q.dtype):
            raise TypeError(
                f"sinks dtype {sinks.dtype} must be float32 or q's dtype {q.dtype}; use .float()"
            )
        same_device(sinks, "sinks", q.device)
        if check:
            sink_values(sinks)
    return AttnOptions(scale, window, softcap, sinks)


def sink_values(sinks: torch.Tensor | None) -> None:
    """Sink logits hold no NaN / +inf (-inf = no sink); one device sync on CUDA."""
    if sinks is not None and sinks.numel() and bool((sinks.isnan() | (sinks == math.inf)).any()):
        raise ValueError("sinks must not be NaN or +inf (-inf means no sink for that head)")


def _real(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def cu_seqlens(cu: object, device: torch.device) -> torch.Tensor:
    cu = index_tensor(cu, "cu_seqlens_q", 1, device)
    if cu.shape[0] < 1:
        raise ValueError("cu_seqlens_q must have B+1 >= 1 entries (it starts with 0)")
    return cu


def cu_values(cu: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> None:
    """cu_seqlens_q starts at 0, never decreases, ends at T; each q_len <= its seq_len."""
    q_lens = (cu[1:] - cu[:-1]).to(torch.int64)
    stats = torch.stack(
        [
            cu[0].to(torch.int64),
            cu[-1].to(torch.int64),
            (q_lens < 0).any().to(torch.int64),
            (q_lens > seq_lens.to(torch.int64)).any().to(torch.int64),
        ]
    ).tolist()
    first, last, decreasing, too_long = stats
    if first != 0 or last != num_tokens or decreasing:
        raise ValueError(
            f"cu_seqlens_q must start at 0, never decrease and end at T={num_tokens}; "
            f"got {cu.tolist()}"
        )
    if too_long:
        b = int((q_lens > seq_lens.to(torch.int64)).nonzero()[0, 0])
        raise ValueError(
            f"sequence {b} has {int(q_lens[b])} queries but seq_lens[{b}] = {int(seq_lens[b])}; "
            "seq_lens counts the cached prefix plus the new tokens, whose K/V must be written first"
        )


def slots(slots: object, n: int, num_slots: int, device: torch.device, check: bool) -> torch.Tensor:
    s = index_tensor(slots, "slots", 1, device)
    if s.shape[0] != n:
        raise ValueError(f"slots has {s.shape[0]} entries but k/v have {n} tokens")
    if check and n:
        lo, hi = torch.stack([s.min(), s.max()]).to(torch.int64).tolist()
        if lo < -1 or hi >= num_slots:
            raise ValueError(
                f"slots must lie in [0, {num_slots}) (block * block_size + offset) or be -1 "
                f"(skip); got min {lo}, max {hi}"
            )
    return s
