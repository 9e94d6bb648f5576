"""KV storage formats: which dtypes a KV cache may be stored in, and how quantized ones work.

Torch only, no other pagedkv import: :mod:`pagedkv.ops` (kernels) and
:mod:`pagedkv.storage` (layout, pool) both read these tables.

A quantized format stores ``q = round(x / s)`` (clamped to ``[-qmax, qmax]``) in one byte
and one float32 scale ``s`` per (layer, K or V, block, KV head); ``x = q * s`` reads it
back. ``round`` is round-to-nearest-even onto the format's grid (the fp8 value grid, or
the integers for int8).

Dynamic scales follow each block's running absolute maximum. A write that leaves the
block partly filled sets ``s = amax * headroom / qmax``, so later tokens (decode appends
one at a time) usually fit; when one does not, the block's earlier tokens are
re-quantized to the larger scale. Headroom is 2 for fp8: its precision is relative, so
a scale twice too large only pushes values below ``max / 2**14`` (e4m3) into
subnormals, and re-quantizations (each a second rounding of the old tokens) become
rare; measured on heavy-tailed synthetic K (tests/test_quant_formats.py prints it) the
error is as low as with any smaller headroom. Headroom is 1 for int8: its step is
``s``, so any headroom coarsens every token, while a re-quantization costs the old
tokens one more rounding of at most ``s / 2``; the smaller scale wins (0.037 vs 0.056
relative error at headroom 2). A write that fills the block to its end uses the exact
maximum (no later token can come).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class QuantFormat(NamedTuple):
    """One quantized storage format: grid, range and dynamic-scale headroom."""

    dtype: torch.dtype
    qmax: float  # largest magnitude stored
    mbits: int  # mantissa bits of the fp8 grid (0: the integer grid of int8)
    emin: int  # exponent of the smallest normal fp8 value (subnormal step 2**(emin-mbits))
    headroom: float  # dynamic scales of partly written blocks: amax * headroom / qmax
    code: int  # how the kernels name it (constexpr)


QUANT_FORMATS: dict[torch.dtype, QuantFormat] = {
    torch.float8_e4m3fn: QuantFormat(torch.float8_e4m3fn, 448.0, 3, -6, 2.0, 1),
    torch.float8_e5m2: QuantFormat(torch.float8_e5m2, 57344.0, 2, -14, 2.0, 2),
    torch.int8: QuantFormat(torch.int8, 127.0, 0, 0, 1.0, 0),
}

#: dtypes the model computes in (q, k, v handed to the cache; attention outputs).
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes a KV cache may be stored in.
KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32, *QUANT_FORMATS)

_ALIASES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

#: Bytes of the scales of one (layer, block, KV head): a float32 for K and one for V.
SCALE_BYTES = 8


def is_quantized(dtype: object) -> bool:
    """Whether ``dtype`` is a quantized KV format (fp8 e4m3 / e5m2, int8)."""
    return dtype in QUANT_FORMATS


def parse_kv_dtype(value: object, name: str = "kv_dtype") -> torch.dtype:
    """A KV storage dtype from a ``torch.dtype`` or a name (``"fp8"`` = e4m3fn,
    ``"fp8_e5m2"``, ``"int8"``, ``"bf16"``, ...); ``TypeError`` / ``ValueError`` else."""
    if isinstance(value, str):
        dtype = _ALIASES.get(value.lower().removeprefix("torch."))
        if dtype is None:
            raise ValueError(
                f"unknown {name} {value!r}; use one of {sorted(_ALIASES)} or a torch.dtype"
            )
        return dtype
    if not isinstance(value, torch.dtype):
        raise TypeError(
            f"{name} must be a torch.dtype or a name such as 'fp8', got {type(value).__name__}"
        )
    if value not in KV_DTYPES:
        shown = ", ".join(str(d).removeprefix("torch.") for d in KV_DTYPES)
        raise ValueError(f"{name} {value} is not a KV storage format; use one of {shown}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float8_e4m3fn`` -> ``"float8_e4m3fn"``."""
    return str(dtype).removeprefix("torch.")
