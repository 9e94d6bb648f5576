"""DecodePlan: decode attention with static buffers, for CUDA-graph capture."""

from __future__ import annotations

import torch

from pagedkv._kv_formats import is_quantized
from pagedkv.ops import _checks, _specs, reference
from pagedkv.ops._config import resolve, resolve_invariant


class DecodePlan:
    """Decode attention for up to ``max_batch`` sequences of up to ``max_seq_len`` tokens,
    with every buffer allocated once, so that :meth:`run` allocates nothing, never syncs
    (with ``check=False`` or while capturing) and can be captured in a CUDA graph.

    The split size is fixed by the plan (from ``max_batch`` and ``max_seq_len``, or the
    batch-invariant constant), so results do not depend on the batch actually run.

    ``window`` and ``softcap`` are fixed per plan (the splits and workspace are sized for
    the window: a windowed plan does window-sized work whatever ``max_seq_len``), so a
    model mixing sliding-window and full layers holds one plan per kind of layer;
    ``sinks`` ([Hq], per layer) are given to :meth:`run`.

    Usage::

        plan = DecodePlan(64, 32, 8, 128, 16, 4096, dtype=torch.bfloat16, device="cuda")
        out = plan.run(q, pool.k(layer), pool.v(layer), block_tables, seq_lens)  # [B, Hq, D]
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = plan.run(q_static, k, v, tables_static, lens_static)
    """

    def __init__(
        self,
        max_batch: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_dtype: torch.dtype | None = None,
        scale: float | None = None,
        window: int | None = None,
        softcap: float | None = None,
        batch_invariant: bool | None = None,
        backend: str | None = None,
    ) -> None:
        for name, val in (("max_batch", max_batch), ("num_q_heads", num_q_heads),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("block_size", block_size), ("max_seq_len", max_seq_len)):  # fmt: skip
            _checks.plan_int("DecodePlan", name, val)
        _checks.head_group(num_q_heads, num_kv_heads)
        self.device = torch.device(device)
        probe = torch.empty(0, num_q_heads, head_dim, dtype=dtype, device="meta")
        opts = _checks.attn_options(scale, window, softcap, None, probe, check=False)
        self.backend = resolve(backend, self.device)
        self.batch_invariant = resolve_invariant(batch_invariant)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.shape = (num_q_heads, num_kv_heads, head_dim, block_size)
        self.dtype = dtype
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        if not is_quantized(self.kv_dtype) and self.kv_dtype != dtype:
            raise ValueError(
                f"kv_dtype {self.kv_dtype} must be dtype {dtype} or a quantized format (fp8 / int8)"
            )
        if is_quantized(self.kv_dtype) and self.backend == "triton":
            _checks.triton_reads(self.kv_dtype, self.device)
        self.scale, self.window, self.softcap = opts.scale, opts.window, opts.softcap
        self.out = torch.zeros(max_batch, num_q_heads, head_dim, dtype=dtype, device=self.device)
        self.split_tokens = self.num_splits = 0
        self.splits = None
        self.workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.backend == "triton":
            from pagedkv.ops import triton_decode as td

            cfg = td.config(head_dim, dtype, self.kv_dtype if is_quantized(self.kv_dtype) else None)
            self.splits = td.plan_splits(
                max_batch, num_kv_heads, max_seq_len, self.window, cfg["BLOCK_N"], self.device,
                self.batch_invariant, programs_per_sm=cfg["programs_per_sm"],
            )  # fmt: skip
            self.split_tokens, self.num_splits = self.splits.split_tokens, self.splits.num_splits
            f32, dev = torch.float32, self.device
            self.workspace = (
                torch.empty(
                    max_batch, num_q_heads, self.num_splits, head_dim, dtype=f32, device=dev
                ),
                torch.empty(max_batch, num_q_heads, self.num_splits, dtype=f32, device=dev),
            )

    @classmethod
    def for_pool(cls, pool, max_batch: int, num_q_heads: int, max_seq_len: int, **kwargs):
        """A plan matching a :class:`pagedkv.storage.KVPool`'s layout and device."""
        lay = pool.layout
        return cls(max_batch, num_q_heads, lay.num_kv_heads, lay.head_dim, lay.block_size,
                   max_seq_len, dtype=lay.dtype, kv_dtype=lay.kv_dtype, device=pool.device,
                   **kwargs)  # fmt: skip

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        sinks: torch.Tensor | None = None,
        k_scales: torch.Tensor | None = None,
        v_scales: torch.Tensor | None = None,
        check: bool | None = None,
    ) -> torch.Tensor:
        """Decode q [B <= max_batch, Hq, D]; returns a view ``self.out[:B]`` (overwritten by
        the next run). seq_lens must not exceed ``max_seq_len``. ``sinks``: [Hq] sink
        logits of this layer (see :func:`pagedkv.ops.decode_attention`); pass a
        contiguous tensor when capturing a CUDA graph. ``k_scales`` / ``v_scales``: the
        layer's scales of a quantized cache (``pool.k_scales(layer)``). ``check=None`` checks values
        except while a CUDA graph is being captured."""
        hq, hkv, d, bs = self.shape
        spec = _specs.decode(
            q, k_cache, v_cache, block_tables, seq_lens, self.scale, self.window, self.softcap,
            sinks, self.backend, self.batch_invariant, k_scales, v_scales,
        )  # fmt: skip
        if k_cache.shape[1:] != (bs, hkv, d) or k_cache.dtype != self.kv_dtype:
            raise ValueError(
                f"cache {tuple(k_cache.shape)} {k_cache.dtype} does not match the plan "
                f"(block_size {bs}, Hkv {hkv}, D {d}, {self.kv_dtype})"
            )
        if q.dtype != self.dtype:
            raise TypeError(f"q dtype {q.dtype} != the plan's dtype {self.dtype}")
        bsz = q.shape[0]
        if bsz > self.max_batch or q.shape[1] != hq:
            raise ValueError(f"q {tuple(q.shape)} exceeds the plan ({self.max_batch}, {hq}, {d})")
        if check is None:
            check = not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        if check:
            _checks.sink_values(sinks)
            first = None if self.window is None else (seq_lens - self.window).clamp(min=0)
            _checks.table_values(block_tables, seq_lens, k_cache.shape[0], bs, first)
            if bsz and int(seq_lens.max()) > self.max_seq_len:
                raise ValueError(
                    f"a sequence is longer than the plan's max_seq_len {self.max_seq_len}"
                )
        out = self.out[:bsz]
        if spec.kernels is not None:
            spec.kernels.run(
                q, k_cache, v_cache, block_tables, seq_lens, sinks, spec.scalars, self.window,
                splits=self.splits, out=out, workspace=self.workspace, k_scales=k_scales,
                v_scales=v_scales,
            )  # fmt: skip
        else:
            res = reference.decode(
                q, k_cache, v_cache, block_tables, seq_lens, self.scale, self.batch_invariant,
                window=self.window, softcap=self.softcap, sinks=sinks, k_scales=k_scales,
                v_scales=v_scales,
            )  # fmt: skip
            out.copy_(res)
        return out
