"""CUDA-graph capture of decode steps for fixed batch-size buckets.

A decode step of ``n`` requests runs the graph of the smallest bucket >= n; the
unused rows are padding (slot -1: nothing written; length 0: attends to nothing).
The step's metadata is packed on the host and copied into one static device buffer
with a single copy; the int32 views the kernels read are filled inside the graph.
If capture fails (an op that syncs or allocates on the host), graphs are switched
off with a warning and the engine stays on its eager path.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from pagedkv.engine.host import host_int64
from pagedkv.integrations.attention import PagedAttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    """Captured decode forwards of a :class:`~pagedkv.engine.model_runner.ModelRunner`,
    one per batch bucket.

    ``runner`` is the runner that owns these graphs (known here only by the attributes
    read: ``model``, ``cache``, ``paged``, ``block_table_of``, ``block_size``,
    ``device``), so this module does not import ``model_runner``: the dependency goes
    one way.
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
        dev = runner.device
        b, w = self.max_batch, self.width
        # One int64 staging buffer; bucket b reads it packed as [ids b | pos b | slots b |
        # lens b | tables n*w], so a step's metadata arrives in a single host-to-device
        # copy. Tables are sent at their real width w and copied (outside the graph)
        # into the fixed-width table the graph reads; columns past a sequence's last
        # block are never read, so stale values there are harmless.
        self.static = torch.zeros(b * (5 + w), dtype=torch.int64, device=dev)
        self.lens32 = torch.zeros(b, dtype=torch.int32, device=dev)
        self.tables32 = torch.zeros(b, w, dtype=torch.int32, device=dev)
        self.cu32 = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(b, dtype=torch.int64, device=dev)
        # keyed by (batch bucket, table-width bucket): the decode kernel's work grows
        # with the table width it is given, so short contexts get narrow graphs
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self._tables_key: list | None = None  # (request id, table length) of each row
        self.mempool: Any = None
        self.disabled = False

    def invalidate_tables(self) -> None:
        """Forget which block tables the graphs' static buffer holds, so the next
        :meth:`run` sends every row (the tables may change on the eager path)."""
        self._tables_key = None

    def _views(self, b: int):
        return torch.split(self.static[: 4 * b], b)  # ids, pos, slots, lens

    def _forward(self, b: int, wb: int) -> torch.Tensor:
        ids, pos, slots, lens = self._views(b)
        self.lens32[:b].copy_(lens)
        r = self.runner
        # The metadata views the static buffers, so a replay reads the step's values;
        # the attention switch is only needed while Python runs (warm-up, capture).
        meta = PagedAttentionMetadata(
            kv=r.cache.pool.kv, slots=slots, block_tables=self.tables32[:b, :wb],
            seq_lens=self.lens32[:b], cu_seqlens_q=self.cu32[: b + 1], max_q_len=1,
            is_decode=True,
        )  # fmt: skip
        out = r.paged(meta, ids[None], position_ids=pos[None], logits_to_keep=self.rows[:b])
        return out.logits[0]

    def _capture(self, b: int, wb: int) -> None:
        self.static.zero_()
        self._views(b)[2].fill_(-1)  # padding slots: nothing is written
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(b, wb)  # warm-up (Triton compiles, cuBLAS picks kernels)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.mempool):
            self.logits[b, wb] = self._forward(b, wb)
        self.graphs[b, wb] = graph

    def run(self, chunks) -> torch.Tensor | None:
        """logits [n, V] of a decode step, or None when it does not fit a graph."""
        n = len(chunks)
        if self.disabled or n > self.max_batch:
            return None
        table_of = self.runner.block_table_of
        tables = [table_of(c.req) for c in chunks]
        w = max(map(len, tables))
        if w > self.width:
            return None
        b = next(x for x in self.buckets if x >= n)
        bs, pad = self.runner.block_size, b - n
        wb = min(self.width, max(8, 1 << (w - 1).bit_length()))
        try:
            if (b, wb) not in self.graphs:
                self._capture(b, wb)
                self._tables_key = None  # resend every row after a capture
            # A row's table changes only when its request gains a block or the batch
            # changes: only rows whose (request, table length) differs from the rows
            # already in tables32 are sent (their row index, then the row at width w).
            prev = self._tables_key or ()
            n_prev = len(prev)
            keys, changed, flat = [], [], []
            ids, pos, slots, lens = [], [], [], []
            for i, (c, t) in enumerate(zip(chunks, tables)):
                req, p = c.req, c.start
                o = p - len(req.prompt)
                ids.append(req.output[o] if o >= 0 else req.prompt[p])
                pos.append(p)
                slots.append(t[p // bs] * bs + p % bs)
                lens.append(p + 1)
                k = (req.request_id, len(t))
                keys.append(k)
                if i >= n_prev or prev[i] != k:
                    changed.append(i)
                    flat += t
                    if len(t) < w:
                        flat += [0] * (w - len(t))
            m = len(changed)
            host = host_int64(
                ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad + lens + [0] * pad
                + changed + flat,
                True,
            )  # fmt: skip
            self.static[: host.numel()].copy_(host, non_blocking=True)
            if m:
                rows = self.static[4 * b : 4 * b + m]
                new = self.static[4 * b + m : 4 * b + m + m * w].view(m, w)
                self.tables32[:, :w].index_copy_(0, rows, new.to(torch.int32))
            self._tables_key = keys
            self.graphs[b, wb].replay()
        except Exception as exc:  # keep serving on the eager path
            warnings.warn(f"CUDA graphs disabled, decode stays eager: {exc!r}", stacklevel=2)
            self.disabled = True
            return None
        return self.logits[b, wb][:n]
