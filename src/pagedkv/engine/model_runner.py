"""Runs one engine step on the model: packs the chunks, forwards, samples.

All requests' new tokens form one packed sequence ``[1, T]`` with explicit
``position_ids``; the attention metadata of the step (slots, block tables, lengths,
cu_seqlens, logit rows) is built in Python lists once per step and moved to the
device in a single copy. The sampled tokens come back in one ``tolist()``: the only
host sync of a step.

With zero-compute repeats on (:mod:`pagedkv.engine.repeats`), the logits row of every
prompt that completes is stored; the chunks of stored prompts (last in the list) are
left out of the forward and sampled from their stored rows.
"""

from __future__ import annotations

import torch

from pagedkv.engine.cuda_graphs import DecodeGraphs
from pagedkv.engine.host import host_int64
from pagedkv.engine.repeats import PromptRepeats
from pagedkv.engine.sampling import sample
from pagedkv.engine.scheduler import Chunk
from pagedkv.integrations.attention import PagedAttention, PagedAttentionMetadata


class ModelRunner:
    """Owns the model forward of the engine (eager; CUDA graphs for decode buckets).

    Every forward goes through :class:`PagedAttention`: the model runs on the paged
    attention for that forward only, with the step's metadata in its kwargs, whatever
    attention implementation the model is set to between steps.
    """

    def __init__(
        self,
        model,
        cache,
        block_table_of,
        *,
        cuda_graphs: bool = True,
        repeats: PromptRepeats | None = None,
    ) -> None:
        self.model = model
        self.repeats = repeats
        self.cache = cache
        self.block_table_of = block_table_of
        self.block_size = cache.block_size
        self.device = cache.pool.kv.device
        self.paged = PagedAttention(model)
        self.pin = self.device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self)

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk]) -> list[int]:
        """Compute the chunks; return the next token of each chunk that samples."""
        if chunks[-1].replay is not None:
            return self._execute_replays(chunks)
        logits = self._logits(chunks)
        if self.repeats is not None:
            self._store_prompts(logits, chunks)
        return self._sample(logits, chunks)

    def _logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """logits [n, V] of the chunks that sample, in order."""
        is_decode = all(c.end - c.start == 1 for c in chunks)
        if is_decode and self.graphs is not None:
            logits = self.graphs.run(chunks)
            if logits is not None:
                return logits
        if self.graphs is not None:  # tables may change (preemption) while eager
            self.graphs.invalidate_tables()
        meta, ids, pos, logit_rows = self.prepare(chunks, is_decode)
        return self.forward(ids, pos, meta, logit_rows)

    def _execute_replays(self, chunks: list[Chunk]) -> list[int]:
        """A step whose last chunks are stored prompts: their partial blocks are written
        back, the others computed, and every row sampled in chunk order."""
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
        logits = stored
        if computed:
            logits = self._logits(computed)
            self._store_prompts(logits, computed)
            logits = torch.cat([logits, stored])
        return self._sample(logits, chunks)

    def _store_prompts(self, logits: torch.Tensor, chunks: list[Chunk]) -> None:
        """Store the logits row of each chunk that completed its prompt."""
        assert self.repeats is not None
        reqs = [c.req for c in chunks if c.sample]
        for j in [j for j, r in enumerate(reqs) if not r.output]:
            req = reqs[j]
            self.repeats.store(req.prompt, req.cache_salt, logits[j], self._tail_block(req))

    def _tail_block(self, req) -> int:
        """The block of the prompt's partial last block (-1: the prompt is aligned)."""
        n, bs = len(req.prompt), self.block_size
        return self.block_table_of(req)[n // bs] if n % bs else -1

    def forward(self, ids, pos, meta: PagedAttentionMetadata, logit_rows) -> torch.Tensor:
        """logits [n, V] of the rows ``logit_rows`` of the packed input."""
        out = self.paged(meta, ids[None], position_ids=pos[None], logits_to_keep=logit_rows)
        return out.logits[0]

    def _sample(self, logits: torch.Tensor, chunks: list[Chunk]) -> list[int]:
        reqs = [c.req for c in chunks if c.sample]
        if not reqs:
            return []
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        return tokens.tolist()  # the step's one host sync

    def prepare(self, chunks: list[Chunk], is_decode: bool, pad_to: int = 0):
        """Pack the step's inputs and metadata; one host-to-device copy."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        cu = [0]
        rows: list[int] = []
        tables = []
        for c in chunks:
            req, start, end = c.req, c.start, c.end
            table = self.block_table_of(req)
            tables.append(table)
            ids += req.token_slice(start, end)
            pos += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            lens.append(end)
            cu.append(cu[-1] + end - start)
            if c.sample:
                rows.append(cu[-1] - 1)
        n_seq, n_tok = len(chunks), len(ids)
        if pad_to > n_seq:  # CUDA-graph bucket: dummy rows write to slot -1, length 0
            extra = pad_to - n_seq
            ids += [0] * extra
            pos += [0] * extra
            slots += [-1] * extra
            lens += [0] * extra
            cu += [cu[-1] + i + 1 for i in range(extra)]
            rows += range(n_tok, n_tok + extra)
            tables += [[]] * extra
            n_seq, n_tok = pad_to, n_tok + extra
        width = max(1, max(len(t) for t in tables))
        flat = [b for t in tables for b in (t + [0] * (width - len(t)))]
        host = host_int64(ids + pos + slots + lens + cu + rows + flat, self.pin)
        dev = host.to(self.device, non_blocking=True)
        o = 0
        parts = []
        for n in (n_tok, n_tok, n_tok, n_seq, n_seq + 1, len(rows), n_seq * width):
            parts.append(dev[o : o + n])
            o += n
        d_ids, d_pos, d_slots, d_lens, d_cu, d_rows, d_tab = parts
        meta = PagedAttentionMetadata(
            kv=self.cache.pool.kv,
            slots=d_slots,
            block_tables=d_tab.view(n_seq, width).to(torch.int32),
            seq_lens=d_lens.to(torch.int32),
            cu_seqlens_q=d_cu.to(torch.int32),
            max_q_len=max(c.end - c.start for c in chunks),
            is_decode=is_decode,
        )
        return meta, d_ids, d_pos, d_rows
