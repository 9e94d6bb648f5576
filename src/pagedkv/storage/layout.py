"""KVLayout: the shape of one device's KV cache, its storage format, and what a block weighs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch

from pagedkv._kv_formats import (
    COMPUTE_DTYPES,
    SCALE_BYTES,
    dtype_name,
    is_quantized,
    parse_kv_dtype,
)
from pagedkv._validate import check_int

KV_SCALES = ("dynamic", "static")


class _KVDtypeField:
    """``KVLayout.kv_dtype``: set from a dtype, a name ("fp8") or None, read as the
    ``torch.dtype`` that ``__post_init__`` normalised it to. A descriptor so that the
    constructor's type and the attribute's type can differ for type checkers too."""

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> None: ...
    @overload
    def __get__(self, obj: KVLayout, owner: type | None = None) -> torch.dtype: ...
    def __get__(self, obj: KVLayout | None, owner: type | None = None) -> torch.dtype | None:
        if obj is None:  # the dataclass asks the class for the default: None = "as dtype"
            return None
        return obj.__dict__["kv_dtype"]

    def __set__(self, obj: KVLayout, value: torch.dtype | str | None) -> None:
        obj.__dict__["kv_dtype"] = value


@dataclass(frozen=True, repr=False)
class KVLayout:
    """Geometry and storage format of a paged KV cache.

    A block holds ``block_size`` tokens of K and V for every layer and KV head.
    ``dtype`` is the compute dtype: what the model hands the cache (k, v, q) and gets
    back from attention (float16, bfloat16, float32; float64 on the reference backend).
    ``kv_dtype`` is how the cache stores K and V (default: ``dtype``): the same float
    dtype, or a quantized format, ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` /
    ``torch.int8`` (names accepted: ``"fp8"`` = e4m3fn, ``"fp8_e5m2"``, ``"int8"``),
    which stores one byte per element and a float32 scale per (layer, K or V, block, KV
    head): ``x = q * scale``. ``kv_scale``: ``"dynamic"`` (default; each block's scales
    follow the values written into it, see :mod:`pagedkv._kv_formats`) or ``"static"``:
    fixed per-layer scales ``k_scales`` / ``v_scales`` (one float, or one per layer, as
    calibrated for vLLM's ``kv_cache_dtype="fp8"``), also stored as each block's scales,
    so a block reads the same under either mode.

    One block's bytes, as :meth:`KVPool.read_blocks` returns them: the payload,
    ``(layer, k/v, token, head, dim)`` elements of ``kv_dtype`` (:attr:`payload_bytes`),
    then for a quantized format its scales, ``(layer, k/v, head)`` float32 little-endian
    (:attr:`scale_bytes`, 8 bytes per (layer, KV head)). ``bytes_per_block`` is their sum.

    Raises ``ValueError`` for non-positive sizes, an unknown format or bad scales, and
    ``TypeError`` for a non-int size or a dtype that is not a ``torch.dtype``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype = torch.bfloat16
    _: dataclasses.KW_ONLY
    kv_dtype: _KVDtypeField = _KVDtypeField()
    kv_scale: str = "dynamic"
    k_scales: tuple[float, ...] | None = None
    v_scales: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            check_int(getattr(self, name), f"KVLayout.{name}", minimum=1)
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(
                f"KVLayout.dtype must be a torch.dtype (e.g. torch.bfloat16), got {self.dtype!r}"
            )
        if self.dtype not in COMPUTE_DTYPES:
            hint = (
                f"; to store KV as {dtype_name(self.dtype)} pass kv_dtype={self.dtype} and "
                "the model's dtype as dtype"
                if is_quantized(self.dtype)
                else ""
            )
            raise TypeError(
                "KVLayout.dtype is the compute dtype and must be float16, bfloat16, float32 "
                f"(or float64), got {self.dtype}{hint}"
            )
        kv = self.dtype if self.kv_dtype is None else parse_kv_dtype(self.kv_dtype, "kv_dtype")
        if not is_quantized(kv) and kv != self.dtype:
            raise ValueError(
                f"kv_dtype {dtype_name(kv)} differs from dtype {dtype_name(self.dtype)}: an "
                "unquantized cache stores the compute dtype (set dtype), a compressed one "
                "fp8 / int8"
            )
        object.__setattr__(self, "kv_dtype", kv)
        self._check_scales(kv)

    def _check_scales(self, kv: torch.dtype) -> None:
        if self.kv_scale not in KV_SCALES:
            raise ValueError(f"kv_scale must be one of {KV_SCALES}, got {self.kv_scale!r}")
        static = self.kv_scale == "static"
        given = self.k_scales is not None or self.v_scales is not None
        if static and not is_quantized(kv):
            raise ValueError("kv_scale='static' needs a quantized kv_dtype (fp8 / int8)")
        if given and not static:
            raise ValueError("k_scales / v_scales are the scales of kv_scale='static'")
        if static:
            for name in ("k_scales", "v_scales"):
                object.__setattr__(self, name, self._per_layer(getattr(self, name), name))
        if is_quantized(kv) and (self.block_size * self.num_kv_heads * self.head_dim) % 2:
            raise ValueError(
                "a quantized layout needs block_size * num_kv_heads * head_dim even (its "
                "float32 scales follow the payload at a 4-byte boundary)"
            )

    def _per_layer(self, value: object, name: str) -> tuple[float, ...]:
        if value is None:
            raise ValueError(f"kv_scale='static' needs {name} (one float, or one per layer)")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * self.num_layers
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise TypeError(f"KVLayout.{name} must be a float or a sequence of floats")
        if len(value) != self.num_layers:
            raise ValueError(
                f"KVLayout.{name} must hold one scale per layer ({self.num_layers}), "
                f"got {len(value)}"
            )
        out = []
        for x in value:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise TypeError(f"KVLayout.{name} must hold floats, got {x!r}")
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"KVLayout.{name} must be finite and > 0, got {x!r}")
            out.append(float(x))
        return tuple(out)

    def __repr__(self) -> str:
        base = (
            f"KVLayout(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, block_size={self.block_size}, dtype={self.dtype}"
        )
        if not self.quantized:  # unchanged from before kv_dtype existed (tier frames use it)
            return base + ")"
        extra = f", kv_dtype={self.kv_dtype}, kv_scale={self.kv_scale!r}"
        if self.kv_scale == "static":
            extra += f", k_scales={self.k_scales}, v_scales={self.v_scales}"
        return base + extra + ")"

    # ---- format -------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether K/V are stored in a quantized format (fp8 / int8, with scales)."""
        return is_quantized(self.kv_dtype)

    @property
    def static_scales(self) -> tuple[tuple[float, float], ...] | None:
        """Per layer ``(k_scale, v_scale)`` of a static-scale layout, else None."""
        if self.kv_scale != "static":
            return None
        assert self.k_scales is not None and self.v_scales is not None  # __post_init__ set them
        return tuple(zip(self.k_scales, self.v_scales))

    def with_kv_dtype(self, kv_dtype: torch.dtype | str) -> KVLayout:
        """The same geometry and compute dtype stored as ``kv_dtype`` (dynamic scales)."""
        return dataclasses.replace(
            self, kv_dtype=kv_dtype, kv_scale="dynamic", k_scales=None, v_scales=None
        )

    # ---- sizes --------------------------------------------------------------------------
    @property
    def element_size(self) -> int:
        """Bytes of one stored K or V element."""
        return torch.empty((), dtype=self.kv_dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """Payload bytes of K and V of one token across all layers and KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def payload_bytes(self) -> int:
        """Bytes of one block's K and V elements (the first part of a block's bytes)."""
        return self.bytes_per_token * self.block_size

    @property
    def scale_bytes(self) -> int:
        """Bytes of one block's scales (0 unless quantized): 8 per (layer, KV head)."""
        return SCALE_BYTES * self.num_layers * self.num_kv_heads if self.quantized else 0

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block: its payload plus, when quantized, its scales."""
        return self.payload_bytes + self.scale_bytes

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)
