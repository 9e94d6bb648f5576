"""Runs one engine step on the model: packs the chunks, forwards, samples — without waiting.

All requests' new tokens form one packed sequence ``[1, T]`` with explicit
``position_ids``; the attention metadata of the step (slots, block tables, lengths,
cu_seqlens, logit rows) is built in Python lists once per step and moved to the device
in a single copy. A decode step replays a captured CUDA graph when one fits
(:mod:`~pagedkv.engine.cuda_graphs`), else runs the model eagerly. Decode rows that
share cached prefix blocks carry a cascade plan (:mod:`~pagedkv.engine.prefix_groups`):
full-attention layers read the shared blocks once per group.

Sampled ids stay on the device, in :attr:`ModelRunner.last_tokens`: the next step reads a
row's pending token from there (:attr:`Chunk.from_device`), so it can be launched before
the host knows the ids. They reach the host in one asynchronous copy per step;
:meth:`SampledTokens.tolist` is a step's only wait, and with overlap (``core.py``) it
happens after the next step was launched.

With zero-compute repeats on (:mod:`pagedkv.engine.repeats`), the logits row of every
prompt that completes is stored; the chunks of stored prompts (last in the list) are
left out of the forward and sampled from their stored rows.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch

from pagedkv import ops
from pagedkv.engine.chunks import Chunk
from pagedkv.engine.config import EngineConfig
from pagedkv.engine.cuda_graphs import DecodeGraphs, capture_blocker
from pagedkv.engine.host import host_int64
from pagedkv.engine.prefix_groups import PrefixGroups
from pagedkv.engine.repeats import PromptRepeats
from pagedkv.engine.sampling import sample
from pagedkv.integrations.attention import PagedAttention, PagedAttentionMetadata, layer_views
from pagedkv.integrations.compiled import CompiledDecode
from pagedkv.integrations.support import ModelSupport, check_model_supported
from pagedkv.ops.cascade_fixed import CascadeGrouping, FixedCascadePlan


class SampledTokens:
    """The ids one launched step sampled (one per sampling chunk, in order), on their way
    to the host; :meth:`tolist` waits for them."""

    __slots__ = ("_values", "_n", "_event")

    def __init__(self, values: torch.Tensor, n: int, event: Any = None) -> None:
        self._values, self._n, self._event = values, n, event

    def tolist(self) -> list[int]:
        """The ids (waits for the step's copy to the host, if it is still running)."""
        if self._event is not None:
            self._event.synchronize()
        return self._values[: self._n].tolist()


class EngineWarmup(NamedTuple):
    """What :meth:`ModelRunner.warmup` did: Triton kernel launches (each variant compiled
    if it was not already), warm-up forwards, CUDA graphs held, graphs torch.compile
    compiled for decode (``torch_compile``; 0 when off), wall seconds."""

    kernels: int
    forwards: int
    graphs: int
    compiles: int
    seconds: float


class ModelRunner:
    """Owns the model forward of the engine (eager; CUDA graphs for decode buckets).
    Reads ``cuda_graphs``, ``max_num_seqs``, ``cascade`` and ``torch_compile`` of
    ``config``; ``support``: the model's :class:`ModelSupport` (checked if None);
    ``repeats``: where prompts' last logits are stored (``None``: zero-compute repeats off).

    Every forward goes through :class:`PagedAttention`: the model runs on the paged
    attention for that forward only, with the step's metadata in its kwargs, whatever
    attention implementation the model is set to between steps.

    Hooks for a mode a step runs under (e.g. batch invariance): :attr:`forward_context`
    (a callable returning a context manager) is entered around each launch, graph
    capture and warm-up; :attr:`graph_tag` is part of every CUDA graph's key, so graphs
    captured under one mode are never replayed under another. Cascade attention is off
    while :func:`pagedkv.ops.is_batch_invariant` (inside the context).
    """

    def __init__(
        self,
        model,
        cache,
        block_table_of,
        config: EngineConfig | None = None,
        support: ModelSupport | None = None,
        repeats: PromptRepeats | None = None,
    ) -> None:
        config = config or EngineConfig()
        self.model = model
        self.repeats = repeats
        self.cache = cache
        self.block_table_of = block_table_of
        self.block_size = cache.block_size
        self.device = cache.pool.kv.device
        self.paged = PagedAttention(model)
        self.support = support or check_model_supported(model)
        self.num_q_heads = int(model.config.num_attention_heads)
        self.pin = self.device.type == "cuda"
        self.forward_context: Callable[[], AbstractContextManager[Any]] = self._step_mode
        self.graph_tag: Hashable = None
        self.invariant = config.batch_invariant
        s = self.support
        # the cascade kernels have no softcap / sinks / compressed KV; windowed layers run
        # plain decode
        self.cascade = bool(
            config.cascade and cache.manager.prefix_caching and s.softcap is None and not s.sinks
            and not s.all_windowed and not cache.layout.quantized
        )  # fmt: skip
        self.groups = PrefixGroups(self.block_size)
        self.layers = layer_views(cache.pool.kv)
        rows = config.max_num_seqs
        #: the last step's sampled ids, row i = its i-th sampling chunk
        self.last_tokens = torch.zeros(rows, dtype=torch.int64, device=self.device)
        #: request id -> its row in last_tokens (the last launched step)
        self.prev_rows: dict[int, int] = {}
        self._host: list[torch.Tensor] = []
        if self.device.type == "cuda":  # two: one being filled while the other is read
            self._host = [torch.empty(rows, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._flip = 0
        # a compiled decode specialises a table width of 1 (its own graph): pad to 2
        self.min_width = 2 if config.torch_compile else 1
        #: the compiled decode forward (None: eager; also after a failed compile)
        self.compiled: CompiledDecode | None = None
        if config.torch_compile:
            self.compiled = CompiledDecode(model)
        self.graphs: DecodeGraphs | None = None
        #: why decode is not replayed from CUDA graphs although they were asked for
        self.graphs_off: str | None = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.graphs_off = capture_blocker(model)
            if self.graphs_off is None:
                self.graphs = DecodeGraphs(self, max_batch=rows)
            else:
                warnings.warn(f"CUDA graphs off, decode stays eager: {self.graphs_off}",
                              stacklevel=3)  # fmt: skip

    def _step_mode(self) -> AbstractContextManager[Any]:
        """The default :attr:`forward_context`: batch-invariant mode for the step when the
        engine was built with it or the calling context has it on (graphs are then
        tagged with it: one captured in the other mode is never replayed)."""
        invariant = self.invariant or ops.is_batch_invariant()
        self.graph_tag = "batch_invariant" if invariant else None
        return ops.batch_invariant_mode() if invariant else contextlib.nullcontext()

    def cascade_on(self) -> bool:
        """Whether decode steps group shared prefixes now (off in batch-invariant mode)."""
        return self.cascade and not ops.is_batch_invariant()

    # ------------------------------------------------------------------ a step
    @torch.inference_mode()
    def launch(self, chunks: list[Chunk]) -> SampledTokens:
        """Compute the chunks and sample the next token of each that samples; the
        device may still be running when this returns."""
        with self.forward_context():
            if chunks[-1].replay is not None:
                return self._sample(self._replay_logits(chunks), chunks)
            logits = self._logits(chunks)
            if self.repeats is not None:
                self._store_prompts(logits, chunks)
            return self._sample(logits, chunks)

    def _logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """logits [n, V] of the chunks that sample, in order."""
        logits = None
        is_decode = all(c.end - c.start == 1 for c in chunks)
        if is_decode and self.graphs is not None:
            logits = self.graphs.run(chunks)  # a row per chunk
            if logits is not None and not all(c.sample for c in chunks):
                # a one-token prefill chunk that does not end its prompt (a chunk budget's
                # remainder) looks like decode but samples nothing
                logits = logits[[i for i, c in enumerate(chunks) if c.sample]]
        if logits is None:
            if self.graphs is not None:  # tables may change (preemption) while eager
                self.graphs.invalidate_tables()
            meta, ids, pos, logit_rows = self.prepare(chunks, is_decode)
            logits = self.forward(ids, pos, meta, logit_rows)
        return logits

    def _replay_logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """logits [n, V] of a step whose last chunks are stored prompts: their partial
        blocks are written back, the others computed (their prompts stored)."""
        k = len(chunks)
        while k and chunks[k - 1].replay is not None:
            k -= 1
        computed, replays = chunks[:k], chunks[k:]
        assert self.repeats is not None
        rows = []
        for c in replays:
            assert c.replay is not None
            self.repeats.restore(c.replay, self._tail_block(c.req))
            rows.append(c.replay.logits)
        stored = torch.stack(rows)  # [len(replays), V]
        if not computed:
            return stored
        logits = self._logits(computed)
        self._store_prompts(logits, computed)
        return torch.cat([logits, stored])

    def _store_prompts(self, logits: torch.Tensor, chunks: list[Chunk]) -> None:
        """Store the logits row of each chunk that completes its prompt (with overlap a
        request may have a pending token and no output yet: its chunk ends later)."""
        assert self.repeats is not None
        j = 0  # the chunk's row in logits (one per sampling chunk)
        for c in chunks:
            if c.sample:
                req = c.req
                if c.end == len(req.prompt):
                    tail = self._tail_block(req)
                    self.repeats.store(req.prompt, req.cache_salt, logits[j], tail)
                j += 1

    def _tail_block(self, req) -> int:
        """The block of the prompt's partial last block (-1: the prompt is aligned)."""
        n, bs = len(req.prompt), self.block_size
        return self.block_table_of(req)[n // bs] if n % bs else -1

    def execute(self, chunks: list[Chunk]) -> list[int]:
        """:meth:`launch`, then wait for the sampled ids."""
        return self.launch(chunks).tolist()

    def forward(self, ids, pos, meta: PagedAttentionMetadata, logit_rows) -> torch.Tensor:
        """logits [n, V] of the rows ``logit_rows`` of the packed input (None: every row).
        Decode forwards run compiled when ``torch_compile`` is on (prefill: eagerly; in
        batch-invariant mode too: its dispatch mode is what makes the forward invariant)."""
        if self.compiled is not None and meta.is_decode and not ops.is_batch_invariant():
            try:
                # every row's logits: a decode batch has a row per sequence, and a fixed
                # logits_to_keep keeps the compiled graph's inputs to the batch dimension
                kw = dict(forward=self.compiled, position_ids=pos[None], logits_to_keep=0)
                logits = self.paged(meta, ids[None], **kw).logits[0]
                return logits if logit_rows is None else logits[logit_rows]
            except Exception as exc:  # keep serving, uncompiled
                capturing = ids.is_cuda and torch.cuda.is_current_stream_capturing()
                warnings.warn(f"torch.compile disabled, the model runs eagerly: {exc!r}",
                              stacklevel=2)  # fmt: skip
                self.compiled = None
                if capturing:
                    raise
        keep = 0 if logit_rows is None else logit_rows
        return self.paged(meta, ids[None], position_ids=pos[None], logits_to_keep=keep).logits[0]

    def _sample(self, logits: torch.Tensor, chunks: list[Chunk]) -> SampledTokens:
        reqs = [c.req for c in chunks if c.sample]
        self.prev_rows = {r.request_id: i for i, r in enumerate(reqs)}
        n = len(reqs)
        if not n:
            return SampledTokens(torch.zeros(0, dtype=torch.int64), 0)
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        self.last_tokens[:n].copy_(tokens)
        if not self._host:  # CPU: the values are there already
            return SampledTokens(tokens, n)
        host = self._host[self._flip]
        self._flip ^= 1
        host[:n].copy_(self.last_tokens[:n], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return SampledTokens(host, n, event)

    def prepare(self, chunks: list[Chunk], is_decode: bool):
        """Pack the step's inputs and metadata; one host-to-device copy."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        cu = [0]
        rows: list[int] = []
        tables = []
        dst: list[int] = []  # input rows whose id is a pending sample, and its row in
        src: list[int] = []  # last_tokens
        prev = self.prev_rows
        for c in chunks:
            req, start, end = c.req, c.start, c.end
            table = self.block_table_of(req)
            tables.append(table)
            if c.from_device:
                dst.append(len(ids))
                src.append(prev[req.request_id])
                ids.append(0)
            else:
                ids += req.token_slice(start, end)
            pos += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            lens.append(end)
            cu.append(cu[-1] + end - start)
            if c.sample:
                rows.append(cu[-1] - 1)
        n_seq, n_tok = len(chunks), len(ids)
        width = max(self.min_width, max(len(t) for t in tables))
        flat = [b for t in tables for b in (t + [0] * (width - len(t)))]
        host = host_int64(ids + pos + slots + lens + cu + rows + dst + src + flat, self.pin)
        dev = host.to(self.device, non_blocking=True)
        o = 0
        parts = []
        sizes = (n_tok, n_tok, n_tok, n_seq, n_seq + 1, len(rows), len(dst), len(dst))
        for n in (*sizes, n_seq * width):
            parts.append(dev[o : o + n])
            o += n
        d_ids, d_pos, d_slots, d_lens, d_cu, d_rows, d_dst, d_src, d_tab = parts
        if dst:
            d_ids.index_copy_(0, d_dst, self.last_tokens.index_select(0, d_src))
        plan = None
        if is_decode and n_seq > 1 and self.cascade_on():
            groups = self.groups.of(chunks, tables)
            if groups:
                plan = self.cascade_plan(n_seq, width * bs)
                plan.grouping.refill(groups)
        meta = PagedAttentionMetadata(
            kv=self.cache.pool.kv,
            slots=d_slots,
            block_tables=d_tab.view(n_seq, width).to(torch.int32),
            seq_lens=d_lens.to(torch.int32),
            cu_seqlens_q=d_cu.to(torch.int32),
            max_q_len=max(c.end - c.start for c in chunks),
            is_decode=is_decode,
            kv_scales=self.cache.pool.scales,
            static_kv_scales=self.cache.layout.static_scales,
            cascade=plan,
            layers=self.layers,
        )
        return meta, d_ids, d_pos, d_rows

    def cascade_plan(self, num_seqs: int, max_seq_len: int, max_groups: int = 8):
        """A :class:`FixedCascadePlan` of ``num_seqs`` decode rows over a fresh grouping."""
        lay = self.cache.layout
        grouping = CascadeGrouping(
            num_seqs, num_q_heads=self.num_q_heads, num_kv_heads=lay.num_kv_heads,
            head_dim=lay.head_dim, block_size=lay.block_size, dtype=lay.dtype,
            device=self.device, max_groups=max(1, min(max_groups, num_seqs // 2)),
        )  # fmt: skip
        return FixedCascadePlan(grouping, max_seq_len=max_seq_len)

    # ------------------------------------------------------------------ warm-up
    @torch.inference_mode()
    def warmup(self, max_seq_len: int | None = None) -> EngineWarmup:
        """Compile every Triton kernel the model's layers use (decode splits up to
        ``max_seq_len``; default: what the model and the pool allow), run the eager
        forward shapes once (torch.compile variants, cuBLAS handles) and capture every
        CUDA graph bucket, so that no later step pays for any of it. Nothing is
        written to the cache."""
        t0 = time.perf_counter()
        if max_seq_len is None:
            max_pos = getattr(self.model.config, "max_position_embeddings", None) or 8192
            max_seq_len = min(max_pos, self.cache.num_blocks * self.block_size)
        with self.forward_context():
            s = self.support
            k0, v0 = self.layers[0]
            sinks = (None,)
            if s.sinks:
                sinks = (next(self.model.parameters()).dtype,)
            kernels = ops.warmup(
                k0, v0, self.num_q_heads, max_seq_len=max_seq_len,
                windows=tuple(dict.fromkeys(s.windows)) or (None,), softcaps=(s.softcap,),
                sinks=sinks,
            ).launches  # fmt: skip
            shapes = ((1, (1,)), (2, (2,)), (2, (1, 1)))  # (tokens, rows per sequence)
            for n_tok, q_lens in shapes:
                self._warm_forward(n_tok, q_lens)
            forwards = len(shapes)
            if self.compiled is not None and self.cascade_on():  # its third decode graph
                self._warm_forward(2, (1, 1), cascade=True)
                forwards += 1
            # compiled before any capture: compiling inside a stream capture breaks it
            graphs = self.graphs.capture_all() if self.graphs is not None else 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compiles = self.compiled.graphs if self.compiled is not None else 0
        return EngineWarmup(kernels, forwards, graphs, compiles, time.perf_counter() - t0)

    def _warm_forward(self, n_tok: int, q_lens: tuple[int, ...], cascade: bool = False) -> None:
        """One forward writing nothing (slots -1), attending block 0 (``cascade``: planned)."""
        dev, i32 = self.device, dict(dtype=torch.int32, device=self.device)
        n = len(q_lens)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], **i32)
        plan = None
        if cascade:
            plan = self.cascade_plan(n, self.min_width * self.block_size)
            plan.grouping.refill(())
        meta = PagedAttentionMetadata(
            kv=self.cache.pool.kv, slots=torch.full((n_tok,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(n, self.min_width, **i32),
            seq_lens=torch.tensor(q_lens, **i32), cu_seqlens_q=cu, max_q_len=max(q_lens),
            is_decode=max(q_lens) == 1 and n_tok == n, layers=self.layers, cascade=plan,
        )  # fmt: skip
        ids = torch.zeros(n_tok, dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(q, device=dev) for q in q_lens])
        self.forward(ids, pos, meta, cu[1:].long() - 1)
