"""What users hand the engine, checked and turned into requests before anything is queued.

Every check runs before a request is queued or a block allocated, so bad input raises
(``TypeError`` for a wrong type, ``ValueError`` for a wrong value, naming the prompt
index and the argument) and leaves the engine exactly as it was.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pagedkv.engine.chat import chat_prompt_ids
from pagedkv.engine.request import Request, SamplingParams
from pagedkv.engine.sampling import make_generator


@dataclass(frozen=True)
class RequestFactory:
    """Turns what users hand an engine into checked requests (not queued, no id yet:
    the engine gives one when it queues them).

    Holds what the checks need of the engine: its ``tokenizer`` (``None``: token-id
    prompts only), the model's ``vocab_size``, the pool's ``block_size`` and
    ``num_blocks`` (a request that could never fit is refused), the ``device`` of the
    sampling generators and the model's ``eos_token_ids``.
    """

    tokenizer: Any
    vocab_size: int
    block_size: int
    num_blocks: int
    device: torch.device
    eos_token_ids: frozenset[int]

    def make_request(
        self, prompt: Any, params: Any, *, retain: bool = False, cache_salt: Any = None,
        chat: bool = False, priority: Any = 0,
    ) -> Request:  # fmt: skip
        """One checked request."""
        params = check_params(params)
        salt = validate_salt(cache_salt)
        priority = validate_priority(priority)
        tokenizer = self.tokenizer
        if chat:
            prompt = chat_prompt_ids(tokenizer, prompt)
        elif isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer: Engine(model, tokenizer)")
            prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = validate_prompt(prompt, self.vocab_size)
        need = -(-(len(ids) + params.max_new_tokens) // self.block_size)
        if need > self.num_blocks:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} needs "
                f"{need} KV blocks but the pool has only {self.num_blocks}; shorten the "
                "prompt, lower max_new_tokens or raise num_blocks"
            )
        gen = None if params.greedy else make_generator(params.seed, self.device)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        return Request(
            -1, ids, params, gen, eos, retain=bool(retain), cache_salt=salt, priority=priority
        )

    def make_requests(
        self, prompts: Any, params: Any, cache_salt: Any, *, retain: bool, chat: bool,
        priority: Any = 0,
    ) -> list[Request]:  # fmt: skip
        """One checked request per prompt (``params``, ``cache_salt``, ``priority``: one
        for all or one each); the first bad one raises, naming its index."""
        prompts = prompt_list(prompts, chat)
        n = len(prompts)
        param_list = per_prompt(params, n, "params", (SamplingParams,))
        salts = per_prompt(cache_salt, n, "cache_salt", (str, bytes))
        if isinstance(priority, (list, tuple)):
            priorities = per_prompt(priority, n, "priority", ())
        else:
            priorities = [validate_priority(priority)] * n
        what = "conversation" if chat else "prompt"
        reqs = []
        for i, (p, sp, salt, prio) in enumerate(zip(prompts, param_list, salts, priorities)):
            try:
                reqs.append(
                    self.make_request(
                        p, sp, retain=retain, cache_salt=salt, chat=chat, priority=prio
                    )
                )
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{what} {i}: {exc}") from None
        return reqs


def prompt_list(prompts: Any, chat: bool) -> list:
    """``prompts`` as a list, refusing one prompt (or one conversation) passed bare."""
    if chat:
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], Mapping)
        ):
            raise TypeError(
                "with chat=True, prompts is a list of conversations (each a list of message "
                "dicts, or a str as one user message); for one conversation use "
                "engine.chat(messages) or generate([messages], chat=True)"
            )
    elif isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists)")
    if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    return list(prompts)


def check_params(params: object, where: str = "params") -> SamplingParams:
    """``params`` itself when it is a SamplingParams (``None``: the defaults)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    hint = "; use SamplingParams(**d)" if isinstance(params, Mapping) else ""
    raise TypeError(f"{where} must be SamplingParams, got {type(params).__name__}{hint}")


def per_prompt(value: object, n: int, name: str, single: tuple[type, ...]) -> list:
    """``value`` for each of ``n`` prompts: one of ``single`` (or None) for all, or a list
    or tuple of ``n`` values (checked later, one by one)."""
    if value is None or isinstance(value, single):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{len(value)} {name} values for {n} prompts: give one or one each")
        return list(value)
    what = " or ".join(t.__name__ for t in single)
    hint = "; use SamplingParams(**d)" if isinstance(value, Mapping) and name == "params" else ""
    raise TypeError(
        f"{name} must be {what} (or a list of them, one per prompt), got "
        f"{type(value).__name__}{hint}"
    )


def validate_prompt(prompt: object, vocab_size: int) -> list[int]:
    """A prompt (token ids: a list, tuple, 1-D integer tensor or array) as a list of ints.

    ``TypeError`` for anything that is not integer token ids, ``ValueError`` if empty
    or outside ``[0, vocab_size)``.
    """
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex:
            raise TypeError(
                f"a tensor prompt must be 1-D integer token ids, got shape "
                f"{tuple(prompt.shape)} {prompt.dtype}"
            )
        if prompt.dtype == torch.bool:
            raise TypeError("a tensor prompt must hold integer token ids, got torch.bool")
        ids = prompt.tolist()
    elif isinstance(prompt, Iterable) and not isinstance(prompt, (bytes, dict)):
        ids = list(prompt)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(
                    f"prompt token {i} must be an int token id, got {type(t).__name__} {t!r}"
                )
        ids = [int(t) for t in ids]
    else:
        raise TypeError(
            f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        )
    if not ids:
        raise ValueError("empty prompt: a request needs at least one prompt token")
    bad = [t for t in ids if t < 0 or t >= vocab_size]
    if bad:
        raise ValueError(
            f"prompt has {len(bad)} token id(s) outside the vocabulary [0, {vocab_size}), "
            f"e.g. {bad[:3]}"
        )
    return ids


def validate_priority(priority: object) -> int:
    """A request's ``priority``: any int (``bool`` refused), higher is more important.

    Waiting requests are admitted highest priority first (FIFO within a level), and the
    ``"priority"`` preemption policy preempts the lowest first; the default is 0.
    """
    if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
        raise TypeError(
            f"priority must be an int (higher is admitted first; default 0), got "
            f"{type(priority).__name__} {priority!r}"
        )
    return int(priority)


def validate_salt(salt: object) -> str | bytes | None:
    """A request's ``cache_salt``: ``None`` (the shared namespace) or a non-empty str/bytes.

    Requests share KV blocks (on the device, in tiers, through snapshots) only when
    their salts are equal; use one salt per tenant or per user to isolate them.
    """
    if salt is None:
        return None
    if not isinstance(salt, (str, bytes)):
        raise TypeError(
            f"cache_salt must be None, a str or bytes (e.g. a tenant id), got {type(salt).__name__}"
        )
    if not salt:
        raise ValueError("cache_salt must not be empty; pass None for the shared namespace")
    return salt
