"""KVPool: the KV tensors of one device, and the copies, writes and gathers on them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedkv import _resources, _tensor_checks, ops
from pagedkv._validate import check_int
from pagedkv.storage import cudart
from pagedkv.storage.host import HostRowCache
from pagedkv.storage.layout import KVLayout
from pagedkv.storage.rows import payload_view, scale_view

BlockIds = Sequence[int] | torch.Tensor


class KVPool:
    """Paged K/V storage of ``num_blocks`` blocks on one device.

    ``kv`` is one tensor ``[num_layers, 2, num_blocks, block_size, Hkv, D]`` of the
    layout's ``kv_dtype``: per layer, K then V in NHD order (the paged layout FlashInfer
    and vLLM use), zero-initialised. A quantized layout (fp8 / int8) adds ``scales``,
    float32 ``[num_layers, 2, num_blocks, Hkv]`` (``None`` otherwise): every method that
    moves blocks (copy, read/write as bytes, the cross-pool copies) moves a block's scales
    with its payload. A slot is ``block * block_size + offset``.

    Every method checks its arguments (shapes, dtypes, devices, id ranges) before doing
    anything, so an error leaves the pool unchanged. The constructor raises
    :class:`~pagedkv.errors.ResourceError` before allocating when the device does not
    exist here or the pool (:meth:`bytes_needed`) exceeds its free memory. Kernels come from
    :mod:`pagedkv.ops` (Triton on CUDA, torch reference elsewhere; ``backend`` forces one).
    """

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        device: torch.device | str = "cpu",
        *,
        backend: str | None = None,
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        check_int(num_blocks, "num_blocks", minimum=1)
        device = _resources.resolve_device(device)
        ops.check_kv_readable(layout.kv_dtype, device, backend)  # before a byte is allocated
        _resources.require_memory(
            "KVPool", "num_blocks", num_blocks, self.bytes_needed(layout, num_blocks), device,
            unit_bytes=layout.bytes_per_block, detail=f"{layout.bytes_per_block} bytes per block",
        )  # fmt: skip
        self.layout = layout
        self.num_blocks = num_blocks
        self.backend = backend
        lbh = (layout.num_layers, 2, num_blocks, layout.block_size)
        shape = (*lbh, layout.num_kv_heads, layout.head_dim)
        if device.type == "cpu":  # its own pages, so a group can page-lock them safely
            self.kv = cudart.own_pages(shape, layout.kv_dtype)
        else:
            self.kv = torch.zeros(shape, dtype=layout.kv_dtype, device=device)
        self.device = self.kv.device  # with its index: "cuda" -> cuda:0
        self.scales: torch.Tensor | None = None
        if layout.quantized:
            self.scales = torch.zeros(
                (layout.num_layers, 2, num_blocks, layout.num_kv_heads),
                dtype=torch.float32, device=self.device,
            )  # fmt: skip
        self._static = layout.static_scales
        self._host_cache = HostRowCache() if self.device.type == "cpu" else None

    def __repr__(self) -> str:
        return f"KVPool({self.layout}, num_blocks={self.num_blocks}, device={self.device})"

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool tensors (payload and scales)."""
        return self.bytes_needed(self.layout, self.num_blocks)

    @staticmethod
    def bytes_needed(layout: KVLayout, num_blocks: int) -> int:
        """Bytes the pool tensors of ``num_blocks`` blocks of ``layout`` take."""
        return num_blocks * layout.bytes_per_block

    def host_rows(self, n: int) -> torch.Tensor:
        """Uninitialised host rows ``uint8 [n, bytes_per_block]`` to stage blocks in: pinned
        when the pool is on CUDA (torch's pinned caching allocator), recycled when on CPU
        (:class:`~pagedkv.storage.host.HostRowCache`: rows come back once unreferenced)."""
        if self._host_cache is not None:
            return self._host_cache.take(n, self.layout.bytes_per_block)
        return torch.empty((n, self.layout.bytes_per_block), dtype=torch.uint8, pin_memory=True)

    # ---- views --------------------------------------------------------------------------
    def k(self, layer: int) -> torch.Tensor:
        """K of ``layer``: a [num_blocks, block_size, Hkv, D] view."""
        return self.kv[self._layer(layer), 0]

    def v(self, layer: int) -> torch.Tensor:
        """V of ``layer``: a [num_blocks, block_size, Hkv, D] view."""
        return self.kv[self._layer(layer), 1]

    def k_scales(self, layer: int) -> torch.Tensor | None:
        """Scales of K of ``layer``: a float32 [num_blocks, Hkv] view (None unless quantized)."""
        return None if self.scales is None else self.scales[self._layer(layer), 0]

    def v_scales(self, layer: int) -> torch.Tensor | None:
        """Scales of V of ``layer``: a float32 [num_blocks, Hkv] view (None unless quantized)."""
        return None if self.scales is None else self.scales[self._layer(layer), 1]

    def _layer(self, layer: int) -> int:
        check_int(layer, "layer")
        if not 0 <= layer < self.layout.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        return layer

    # ---- per-layer token ops ------------------------------------------------------------
    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        check: bool = True,
    ) -> None:
        """Scatter new tokens' K/V: k, v [N, Hkv, D]; slots [N] int on the pool's device
        (-1 skips a token). A quantized pool quantizes them and keeps its scales. See
        :func:`pagedkv.ops.write_kv`."""
        static = None if self._static is None else self._static[self._layer(layer)]
        ops.write_kv(
            self.k(layer), self.v(layer), slots, k, v, k_scales=self.k_scales(layer),
            v_scales=self.v_scales(layer), static_scales=static, backend=self.backend,
            check=check,
        )  # fmt: skip

    def gather(
        self, layer: int, block_table: BlockIds, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``num_tokens`` tokens of a sequence as contiguous (k, v), each
        [num_tokens, Hkv, D] (dequantized to the layout's ``dtype`` when quantized);
        ``block_table`` lists its blocks in order."""
        k_cache, v_cache = self.k(layer), self.v(layer)
        ids = _tensor_checks.block_ids(block_table, self.num_blocks, self.device, "block_table")
        bs = self.layout.block_size
        if not 0 <= num_tokens <= ids.numel() * bs:
            raise ValueError(
                f"num_tokens {num_tokens} must lie in [0, {ids.numel() * bs}] "
                f"({ids.numel()} blocks of {bs} tokens)"
            )
        ids = ids[: -(-num_tokens // bs)]
        shape = (-1, self.layout.num_kv_heads, self.layout.head_dim)
        k, v = k_cache.index_select(0, ids), v_cache.index_select(0, ids)
        ks, vs = self.k_scales(layer), self.v_scales(layer)
        if ks is not None and vs is not None:  # quantized
            dt = self.layout.dtype
            k = k.to(dt) * ks.index_select(0, ids).to(dt)[:, None, :, None]
            v = v.to(dt) * vs.index_select(0, ids).to(dt)[:, None, :, None]
        k, v = k.reshape(shape)[:num_tokens], v.reshape(shape)[:num_tokens]
        return k.contiguous(), v.contiguous()

    # ---- whole-block ops ----------------------------------------------------------------
    def copy_blocks(self, pairs: Sequence[tuple[int, int]] | torch.Tensor) -> None:
        """Copy whole blocks (every layer, K and V) ``src -> dst`` for each pair, as if in
        list order (copy-on-write). One kernel for the whole list unless a destination is
        also a source or repeats, which is then done in order."""
        pt = (
            torch.as_tensor(pairs, dtype=torch.int64)
            if not isinstance(pairs, torch.Tensor)
            else pairs
        )
        if pt.numel() == 0:
            return
        if pt.dim() != 2 or pt.shape[1] != 2:
            raise ValueError(
                f"pairs must be a list of (src, dst) pairs, got shape {tuple(pt.shape)}"
            )
        cpu = torch.device("cpu")  # check on the host: one transfer, no device sync
        src = _tensor_checks.block_ids(pt[:, 0].cpu(), self.num_blocks, cpu, "copy_blocks src")
        dst = _tensor_checks.block_ids(pt[:, 1].cpu(), self.num_blocks, cpu, "copy_blocks dst")
        s, d = src.tolist(), dst.tolist()
        src, dst = src.to(self.device), dst.to(self.device)
        tensors = [self.kv] if self.scales is None else [self.kv, self.scales]
        if len(set(d)) == len(d) and not set(d) & set(s):
            for t in tensors:
                ops.copy_blocks(t, src, dst, backend=self.backend)
            return
        for i in range(len(s)):  # chained or repeated destinations: keep list-order semantics
            if s[i] != d[i]:
                for t in tensors:
                    ops.copy_blocks(t, src[i : i + 1], dst[i : i + 1], backend=self.backend)

    def read_blocks(
        self, block_ids: BlockIds, *, out: torch.Tensor | None = None, non_blocking: bool = False
    ) -> torch.Tensor:
        """Bytes of blocks ``block_ids`` as uint8 [n, bytes_per_block] on the CPU (pinned when
        the pool is on CUDA); each row ordered (layer, k/v, token, head, dim), then for a
        quantized pool the block's scales (layer, k/v, head) as float32.

        One gather into a device staging buffer, then one copy (a CPU pool copies
        straight into the rows). Without ``out`` the rows come from :meth:`host_rows`.
        ``out`` (uint8 [n, bytes_per_block], CPU) receives the bytes; with
        ``non_blocking=True`` and a pinned ``out`` the copy is only enqueued on the current
        stream (usable from a side stream): synchronize that stream before reading ``out``.
        """
        ids = _tensor_checks.block_ids(block_ids, self.num_blocks, self.device)
        n = ids.numel()
        if out is not None:
            self._check_bytes(out, n, "out")
            if out.device.type != "cpu":
                raise ValueError(f"out must be a CPU tensor, got {out.device}")
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
        else:
            out = self.host_rows(n)
        if n == 0:
            return out
        if self._host_direct():
            # out[i] viewed [L*2, chunk] <- rows_u8[:, id_i]: one pass, no staging copy
            rows = self._rows_u8()
            pay = out[:, : self.layout.payload_bytes].view(n, *rows.shape[::2])
            torch.index_select(rows, 1, ids, out=pay.transpose(0, 1))
            if self.scales is not None:
                scale_view(out, self.layout).copy_(self.scales.index_select(2, ids).movedim(2, 0))
            return out
        staged = torch.empty_like(out, device=self.device)
        self.gather_rows(ids, staged)
        out.copy_(staged, non_blocking=non_blocking)
        return out

    def gather_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Blocks ``ids`` ([n] int64 on the pool's device, in range) into the byte rows
        ``rows`` (uint8 [n, bytes_per_block] on the pool's device, each row dense): payload
        and scales, as :meth:`read_blocks` orders them. No checks: for the copy paths."""
        ops.gather_blocks(self.kv, ids, out=payload_view(rows, self.layout), backend=self.backend)
        if self.scales is not None:
            ops.gather_blocks(
                self.scales, ids, out=scale_view(rows, self.layout), backend=self.backend
            )

    def scatter_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Inverse of :meth:`gather_rows`: byte rows on the pool's device into blocks ``ids``
        (distinct)."""
        ops.scatter_blocks(self.kv, ids, payload_view(rows, self.layout), backend=self.backend)
        if self.scales is not None:
            ops.scatter_blocks(
                self.scales, ids, scale_view(rows, self.layout), backend=self.backend
            )

    def write_blocks(
        self, block_ids: BlockIds, data: torch.Tensor, *, non_blocking: bool = False
    ) -> None:
        """Exact inverse of :meth:`read_blocks`: ``data`` uint8 [n, bytes_per_block] (CPU or
        the pool's device) into the distinct blocks ``block_ids``. With ``non_blocking=True``
        a pinned ``data`` must stay untouched until the current stream has run the copy."""
        ids = _tensor_checks.block_ids(block_ids, self.num_blocks, self.device)
        n = ids.numel()
        self._check_bytes(data, n, "data")
        if data.device.type != "cpu" and data.device != self.device:
            raise ValueError(f"data must be on the CPU or {self.device}, got {data.device}")
        if n == 0:
            return
        if torch.unique(ids).numel() != n:
            raise ValueError(f"block_ids must be distinct, got {ids.tolist()}")
        if self._host_direct():
            rows, src = self._rows_u8(), data.contiguous()
            pay = src[:, : self.layout.payload_bytes].view(n, rows.shape[0], rows.shape[2])
            # a copy per block: index_copy_ over the strided block dim runs ~15x slower
            for i, b in enumerate(ids.tolist()):
                rows[:, b].copy_(pay[i])
            if self.scales is not None:
                self.scales[:, :, ids] = scale_view(src, self.layout).movedim(0, 2)
            return
        staged = data.contiguous().to(self.device, non_blocking=non_blocking)
        self.scatter_rows(ids, staged)

    def _host_direct(self) -> bool:
        """CPU pool on the reference backend: move bytes straight between pool and rows.

        The reference gather (advanced indexing, permute, contiguous, then a copy into
        ``out``) makes three passes at ~0.3 GB/s; one strided copy per block runs at
        memcpy speed.
        """
        return self.device.type == "cpu" and ops.resolve(self.backend, self.device) == "reference"

    def _rows_u8(self) -> torch.Tensor:
        """The pool as bytes ``[L*2, num_blocks, bytes of one block's K (or V) of a layer]``."""
        lay = self.layout
        return self.kv.view(torch.uint8).view(lay.num_layers * 2, self.num_blocks, -1)

    def _check_bytes(self, t: torch.Tensor, n: int, name: str) -> None:
        _tensor_checks.tensor(t, name)
        bpb = self.layout.bytes_per_block
        if t.dtype != torch.uint8:
            raise TypeError(f"{name} must be a uint8 tensor, got {t.dtype}")
        if tuple(t.shape) != (n, bpb):
            raise ValueError(
                f"{name} must be [{n}, {bpb}] (blocks x bytes_per_block), got {tuple(t.shape)}"
            )
