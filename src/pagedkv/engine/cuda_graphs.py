"""CUDA-graph capture of decode steps for fixed batch-size and table-width buckets.

A decode step of ``n`` requests replays the graph of the smallest batch bucket >= n and
table-width bucket >= its widest block table (the decode kernels' work follows the width
they are given, so short contexts get narrow graphs); the unused rows are padding (slot
-1: nothing written; length 0: attends to nothing). The step's inputs are packed on the
host and copied into one static device buffer with a single copy; inside the graph the
int32 views the kernels read are filled, and the input id of each row whose token is
the previous step's pending sample is gathered from the runner's device-resident
sampled ids (so a step is launched before the host knows them). Every graph writes its
logits into one shared buffer.

When the engine groups shared prefixes, a bucket has a second graph running cascade
decode over a :class:`~pagedkv.ops.cascade_fixed.FixedCascadePlan`; its grouping buffer
(one per batch bucket) is refilled in place only when the batch's grouping changes,
which it rarely does (:mod:`~pagedkv.engine.prefix_groups`): no capture per grouping.
Graph keys also hold the runner's ``graph_tag`` (a mode the step runs under).
:meth:`DecodeGraphs.capture_all` captures every key ahead of time (``Engine.warmup``);
otherwise a key is captured when first needed. With ``torch_compile`` the captured
forward is the runner's compiled decode forward (compiled by ``Engine.warmup`` before
any capture, else in the eager warm-up run that precedes each capture, never inside
one); replay runs its fused kernels and the paged op's kernels alike. If capture fails
(an op that syncs or allocates on the host), graphs are switched off with a warning and
the engine stays on its eager path; a model known not to capture
(:func:`capture_blocker`) gets no graphs.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import torch

from pagedkv.engine.host import host_int64
from pagedkv.integrations.attention import PagedAttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
MIN_WIDTH = 8  # narrowest table-width bucket (blocks)


def capture_blocker(model: torch.nn.Module) -> str | None:
    """Why ``model``'s decode forward cannot be captured, or None. Known: mixture-of-experts
    layers on transformers' "eager" experts implementation, which loops over the experts
    hit (``nonzero()``, a host sync the capture forbids). The model is only read."""
    for m in model.modules():
        # transformers' use_experts_implementation sets these on every experts module (5.17+)
        if not hasattr(m, "is_concatenated") or not hasattr(m, "has_gate"):
            continue
        impl = getattr(m.__dict__.get("config"), "_experts_implementation", None)
        if impl in (None, "eager"):
            return (
                f"{type(m).__name__} runs transformers' 'eager' experts implementation, whose "
                "loop over the experts hit syncs with the host; call "
                "model.set_experts_implementation('grouped_mm') (or 'batched_mm') before "
                "building the engine to replay decode from CUDA graphs"
            )
    return None


class DecodeGraphs:
    """Captured decode forwards of a :class:`~pagedkv.engine.model_runner.ModelRunner`,
    keyed by ``(batch bucket, width bucket, cascade, graph_tag)``.

    ``runner`` is the runner that owns these graphs (known here only by the attributes
    read: ``model``, ``cache``, ``block_table_of``, ``block_size``, ``device``,
    ``layers``, ``last_tokens``, ``prev_rows``, ``groups``, ``graph_tag``, ``pin``,
    ``compiled``, ``cascade_on``, ``cascade_plan``, ``forward``), so this module does not
    import ``model_runner``: the dependency goes one way.
    """

    def __init__(self, runner, max_batch: int | None = None, max_width: int | None = None):
        self.runner = runner
        cache = runner.cache
        cfg = runner.model.config
        self.max_batch = max_batch or 256
        self.buckets = [b for b in BUCKETS if b < self.max_batch] + [self.max_batch]
        bs = cache.block_size
        max_pos = getattr(cfg, "max_position_embeddings", 8192) or 8192
        self.width = max_width or min(cache.num_blocks, -(-max_pos // bs))
        self.widths = sorted({self.width_bucket(w) for w in range(1, self.width + 1)})
        dev = runner.device
        b, w = self.max_batch, self.width
        # One int64 staging buffer; bucket b reads it packed as [ids b | pos b | slots b |
        # lens b | src b | changed rows m | their tables m*w], so a step's inputs arrive
        # in a single host-to-device copy. Tables are sent at their real width w and
        # copied (outside the graph) into the fixed-width table the graph reads; columns
        # past a sequence's last block are never read, so stale values there are harmless.
        # Inference tensors, like every other input of a step's forward (steps run under
        # inference mode): a compiled forward guards on the kind, so all must be alike.
        with torch.inference_mode():
            self.static = torch.zeros(b * (6 + w), dtype=torch.int64, device=dev)
            self.lens32 = torch.zeros(b, dtype=torch.int32, device=dev)
            self.tables32 = torch.zeros(b, w, dtype=torch.int32, device=dev)
            self.cu32 = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.logits: torch.Tensor | None = None  # [max_batch, V], written by every graph
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.plans: dict[tuple[int, int], Any] = {}  # (batch, width bucket) -> cascade plan
        self._grouped: dict[int, tuple | None] = {}  # batch bucket -> grouping key it holds
        self._tables_key: list | None = None  # (request id, admission, table length) per row
        self.mempool: Any = None
        self.disabled = False

    def width_bucket(self, w: int) -> int:
        """The table-width bucket (blocks) of a widest table of ``w`` blocks."""
        return min(self.width, max(MIN_WIDTH, 1 << (max(w, 1) - 1).bit_length()))

    def invalidate_tables(self) -> None:
        """Forget which block tables the graphs' static buffer holds, so the next
        :meth:`run` sends every row (the tables may change on the eager path)."""
        self._tables_key = None

    def _forward(self, b: int, wb: int, cascade: bool) -> torch.Tensor:
        ids, pos, slots, lens, src = torch.split(self.static[: 5 * b], b)
        self.lens32[:b].copy_(lens)
        r = self.runner
        # rows whose token is the last step's pending sample read it on the device
        ids = torch.where(src >= 0, r.last_tokens.index_select(0, src.clamp(min=0)), ids)
        # The metadata views the static buffers, so a replay reads the step's values;
        # the attention switch is only needed while Python runs (warm-up, capture).
        tables = self.tables32[:b, :wb]
        if r.compiled is not None:  # a packed copy (in the graph), as eager steps pass: the
            # compiled forward guards on strides (even a [1, w] view's; hence no contiguous())
            tables = tables.clone(memory_format=torch.contiguous_format)
        meta = PagedAttentionMetadata(
            kv=r.cache.pool.kv, slots=slots, block_tables=tables,
            seq_lens=self.lens32[:b], cu_seqlens_q=self.cu32[: b + 1], max_q_len=1,
            is_decode=True, cascade=self.plans[b, wb] if cascade else None, layers=r.layers,
            kv_scales=r.cache.pool.scales, static_kv_scales=r.cache.layout.static_scales,
        )  # fmt: skip
        return r.forward(ids, pos, meta, None)  # every row's logits

    def _capture(self, key: tuple) -> None:
        b, wb, cascade, _ = key
        self.static.zero_()
        self.static[2 * b : 3 * b].fill_(-1)  # padding slots: nothing is written
        self.static[4 * b : 5 * b].fill_(-1)  # no pending ids
        if cascade:
            plan = self.plans.get((b, wb))
            if plan is None:
                plan = self.plans[b, wb] = self._plan(b, wb)
            plan.grouping.refill(())
            self._grouped[b] = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self._forward(b, wb, cascade)  # warm-up (Triton compiles, cuBLAS picks kernels)
        torch.cuda.current_stream().wait_stream(stream)
        if self.logits is None:
            self.logits = torch.empty(
                self.max_batch, out.shape[-1], dtype=out.dtype, device=out.device
            )
        del out
        graph = torch.cuda.CUDAGraph()
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        # No garbage collection while capturing: a finalizer run then (an engine or cache
        # of the user's being collected: unregistering pages, closing tiers, freeing a
        # graph pool) would make a CUDA call the capture forbids, and the process aborts
        # (seen on the H200). torch.cuda.graph collects once before it starts.
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self.mempool):
                self.logits[:b].copy_(self._forward(b, wb, cascade))
        finally:
            if enabled:
                gc.enable()
        self.graphs[key] = graph
        self._tables_key = None  # resend every row after a capture

    def _capture_key(self, key: tuple) -> None:
        """:meth:`_capture`; if it failed in the runner's compiled forward (which then
        turned itself off, with its warning), once more on the eager forward."""
        compiled = self.runner.compiled is not None
        try:
            self._capture(key)
        except Exception:
            if not compiled or self.runner.compiled is not None:
                raise
            self._capture(key)

    def _plan(self, b: int, wb: int):
        """The cascade plan of bucket (b, wb); the plans of one batch bucket share one
        grouping buffer (its layout depends on b only)."""
        r = self.runner
        same_b = next((p for (pb, _), p in self.plans.items() if pb == b), None)
        plan = r.cascade_plan(b, wb * r.block_size)
        if same_b is None:
            return plan
        return type(plan)(same_b.grouping, max_seq_len=wb * r.block_size)

    def capture_all(self) -> int:
        """Capture every graph this engine can replay now: each batch bucket x table-width
        bucket, plain and (where shared prefixes are grouped) cascade, under the runner's
        current ``graph_tag``. Returns how many graphs are held."""
        r = self.runner
        variants = (False, True) if r.cascade_on() else (False,)
        for b in self.buckets:
            for wb in self.widths:
                for cascade in variants:
                    key = (b, wb, cascade and b > 1, r.graph_tag)
                    if self.disabled or key in self.graphs:
                        continue
                    try:
                        self._capture_key(key)
                    except Exception as exc:
                        self._disable(exc)
        return len(self.graphs)

    def _disable(self, exc: Exception) -> None:
        warnings.warn(f"CUDA graphs disabled, decode stays eager: {exc!r}", stacklevel=3)
        self.disabled = True

    def run(self, chunks) -> torch.Tensor | None:
        """logits [n, V] of a decode step, or None when it does not fit a graph."""
        n = len(chunks)
        if self.disabled or n > self.max_batch:
            return None
        r = self.runner
        table_of = r.block_table_of
        tables = [table_of(c.req) for c in chunks]
        w = max(map(len, tables))
        if w > self.width:
            return None
        b = next(x for x in self.buckets if x >= n)
        wb = self.width_bucket(w)
        groups = r.groups.of(chunks, tables) if n > 1 and r.cascade_on() else []
        key = (b, wb, bool(groups), r.graph_tag)
        bs, pad = r.block_size, b - n
        try:
            if key not in self.graphs:
                self._capture_key(key)
            if groups and self._grouped.get(b) != r.groups.key:
                self.plans[b, wb].grouping.refill(groups)
                self._grouped[b] = r.groups.key
            # A row's table changes only when its request gains a block or the batch
            # changes: only rows whose (request, admission, table length) differs from the
            # rows already in tables32 are sent (their row index, then the row at width w).
            # Per-row work is list comprehensions: this runs for every row of every step.
            reqs = [c.req for c in chunks]
            pos = [c.start for c in chunks]
            slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos)]
            lens = [p + 1 for p in pos]
            prev_rows = r.prev_rows
            if all(c.from_device for c in chunks):  # the usual decode step (overlap)
                ids = [0] * n
                src = [prev_rows[req.request_id] for req in reqs]
            else:
                ids, src = [], []
                for c, req, p in zip(chunks, reqs, pos):
                    if c.from_device:
                        ids.append(0)
                        src.append(prev_rows[req.request_id])
                    else:
                        o = p - len(req.prompt)
                        ids.append(req.output[o] if o >= 0 else req.prompt[p])
                        src.append(-1)
            keys = [(req.request_id, req.admitted, len(t)) for req, t in zip(reqs, tables)]
            prev = self._tables_key or []
            changed: list[int] = []
            flat: list[int] = []
            if keys != prev:
                n_prev = len(prev)
                for i, (k, t) in enumerate(zip(keys, tables)):
                    if i >= n_prev or prev[i] != k:
                        changed.append(i)
                        flat += t
                        if len(t) < w:
                            flat += [0] * (w - len(t))
            m = len(changed)
            host = host_int64(
                ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad + lens + [0] * pad
                + src + [-1] * pad + changed + flat,
                r.pin,
            )  # fmt: skip
            self.static[: host.numel()].copy_(host, non_blocking=True)
            if m:
                rows = self.static[5 * b : 5 * b + m]
                new = self.static[5 * b + m : 5 * b + m + m * w].view(m, w)
                self.tables32[:, :w].index_copy_(0, rows, new.to(torch.int32))
            self._tables_key = keys
            self.graphs[key].replay()
        except Exception as exc:  # keep serving on the eager path
            self._disable(exc)
            return None
        assert self.logits is not None
        return self.logits[:n]
