"""Following one request as it is served: the generator behind :meth:`Engine.stream`
and :meth:`Engine.resume_stream`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pagedkv.engine.core import EngineCore
from pagedkv.engine.detokenize import Detokenizer
from pagedkv.engine.request import Request, StreamDelta


def follow(
    core: EngineCore, step: Callable[[], object], abort: Callable[[int], None], req: Request
) -> Iterator[StreamDelta]:
    """Run ``step()`` until queued ``req`` finishes, yielding its new tokens (and text,
    whole characters only, when the core has a tokenizer) after each step that gave it
    some; closing the iterator early aborts the request (``abort(request_id)``)."""
    rid = req.request_id
    detok = None if core.tokenizer is None else Detokenizer(core.tokenizer)
    try:
        while True:
            step()
            done = req.finish_reason is not None
            if len(req.output) > req.streamed or done:
                new = req.output[req.streamed :]
                req.streamed = len(req.output)
                text = None
                if detok is not None:
                    text = detok.push(new)
                    if done:
                        final = core.text(req.output)
                        assert final is not None  # a Detokenizer implies a tokenizer
                        text += detok.finish(final)
                yield StreamDelta(rid, new, text, req.finish_reason)
            if done:
                core.requests.pop(rid, None)
                return
    finally:
        if req.finish_reason is None:  # the caller stopped iterating: stop serving it
            abort(rid)
