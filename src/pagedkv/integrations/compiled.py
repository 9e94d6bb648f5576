"""A model's paged decode forward under ``torch.compile`` (``EngineConfig.torch_compile``).

The model's own ``forward`` is compiled (the model is not changed or wrapped: its
modules keep working with plain transformers); the paged attention of each layer is the
custom op ``pagedkv::paged_attention`` (:mod:`pagedkv.integrations.attention_op`), so
one decode forward is ONE graph, and inductor fuses the ~25 small elementwise kernels
of each layer (RMSNorm, RoPE, SiLU-and-mul, residual adds) into a few.

Only decode forwards are compiled; prefill chunks run eagerly (they are GEMM-bound, and
their shapes vary in more ways: logit rows, chunk lengths). Recompiles are bounded by
design: the token / sequence dimension and the block-table width are marked dynamic
and duck sizing is off (a batch of 8 over tables of width 8 must not tie the two), so
a decode forward compiles at most three graphs per engine, whatever the batch sizes:
one sequence (size 1 is always specialised), two or more, and two or more with a
cascade plan. The runner pads decode block tables to a width of at least 2 (width 1
would be specialised too). :attr:`CompiledDecode.graphs` counts the graphs compiled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch._dynamo import maybe_mark_dynamic

__all__ = ["MAX_DECODE_GRAPHS", "CompiledDecode"]

#: graphs a decode forward compiles at most (one sequence; more; more with cascade)
MAX_DECODE_GRAPHS = 3


class CompiledDecode:
    """``torch.compile(model.forward)`` for paged decode forwards: call it with the
    keyword arguments of the model's forward (``input_ids`` [1, T], ``position_ids``
    [1, T], ``pagedkv_metadata``, ...) inside a :class:`PagedAttention` forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.graphs = 0  # graphs compiled (each dynamic in the batch size)
        self.fn = torch.compile(model.forward, backend=self._backend, dynamic=None)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)

    def __call__(self, **kwargs: Any) -> Any:
        meta = kwargs["pagedkv_metadata"]
        maybe_mark_dynamic(kwargs["input_ids"], 1)
        maybe_mark_dynamic(kwargs["position_ids"], 1)
        for t in (meta.slots, meta.seq_lens, meta.cu_seqlens_q):
            maybe_mark_dynamic(t, 0)
        maybe_mark_dynamic(meta.block_tables, 0)
        maybe_mark_dynamic(meta.block_tables, 1)
        with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            return self.fn(**kwargs)
