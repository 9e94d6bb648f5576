"""Incremental detokenization: the text of a growing token list, delta by delta.

A character can span several tokens (byte-level BPE splits "é" or "日" into byte
tokens), so decoding each new token alone, or cutting the decoding of the whole
output at the length already shown, emits U+FFFD halves. A :class:`Detokenizer`
emits text only once it is complete and looks back over a few tokens only, so a step
costs O(new tokens), not O(output):

- a tokenizer with a Rust backend (every transformers fast tokenizer) is decoded by
  ``tokenizers``' own ``DecodeStream``;
- any other tokenizer by the classic prefix/read-offset window over its ``decode``:
  the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]``, held back
  while it ends in U+FFFD (an incomplete character);
- a tokenizer whose ``decode`` also cleans up spaces (``" ."`` -> ``"."``, old
  WordPiece / Unigram configs) gets that clean-up applied to the stream, holding
  back a trailing space and the 3 characters after it until the next text shows
  whether a clean-up pattern (at most 4 characters, each starting with a space)
  straddles the cut.

:meth:`Detokenizer.finish` takes the final text (``tokenizer.decode(all ids,
skip_special_tokens=True)``, which ``RequestOutput.text`` holds) and returns what
was not emitted yet, so ``"".join(deltas) == final text`` for any token sequence,
held-back incomplete bytes included. Special tokens are skipped, as in that text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("pagedkv.engine")

_INCOMPLETE = "\ufffd"
#: longest space clean-up pattern of transformers' ``clean_up_tokenization`` (" n't")
_CLEANUP_SPAN = 4


class Detokenizer:
    """Text deltas for one request's output tokens.

    ``push(ids)`` takes the tokens generated since the last call and returns the text
    they complete (``""`` while a character is incomplete); ``finish(final_text)``
    returns the rest, so that the deltas joined equal ``final_text``.
    ``decode_stream=False`` uses the window over ``tokenizer.decode`` even for a
    tokenizer ``DecodeStream`` could decode.
    """

    def __init__(self, tokenizer: Any, *, decode_stream: bool = True) -> None:
        self._source = _source(tokenizer) if decode_stream else _WindowSource(tokenizer)
        self._cleanup: Callable[[str], str] | None = (
            tokenizer.clean_up_tokenization if _cleans_up(tokenizer) else None
        )
        self._pending = ""  # raw text held back by the clean-up filter
        self._pieces: list[str] = []

    @property
    def kind(self) -> str:
        """``"decode_stream"`` or ``"window"``, plus ``"+cleanup"`` where it applies."""
        return self._source.kind + ("+cleanup" if self._cleanup is not None else "")

    def push(self, token_ids: list[int]) -> str:
        text = self._source.push(token_ids)
        if self._cleanup is not None:
            text = self._clean(text, self._cleanup)
        if text:
            self._pieces.append(text)
        return text

    def finish(self, final_text: str) -> str:
        """The text of ``final_text`` not emitted yet (``""`` if nothing is left)."""
        emitted = "".join(self._pieces)
        if final_text.startswith(emitted):
            rest = final_text[len(emitted) :]
        else:  # a decode() that is not prefix-stable: keep the deltas as close as we can
            common = _common_prefix(emitted, final_text)
            logger.warning(
                "streamed text diverged from the final decoding at character %d "
                "(a tokenizer whose decode() is not prefix-stable: %s)",
                common, type(self._source.tokenizer).__name__,
            )  # fmt: skip
            rest = final_text[common:]
        self._pieces = [final_text]
        return rest

    def _clean(self, raw: str, cleanup: Callable[[str], str]) -> str:
        # Cut where no clean-up pattern can straddle: no space among the last
        # _CLEANUP_SPAN - 1 characters before the cut. The clean-up of the text
        # before such a cut is then final (patterns only delete characters).
        text = self._pending + raw
        cut = len(text)
        while True:
            window = text[max(0, cut - (_CLEANUP_SPAN - 1)) : cut]
            space = window.find(" ")
            if space < 0:
                break
            cut = max(0, cut - len(window)) + space
        self._pending = text[cut:]
        return cleanup(text[:cut]) if cut else ""


class _StreamSource:
    """Raw text deltas from ``tokenizers.decoders.DecodeStream`` (Rust, a small window)."""

    kind = "decode_stream"

    def __init__(self, tokenizer: Any, stream_cls: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._stream = stream_cls(skip_special_tokens=True)
        self._failed = False

    def push(self, token_ids: list[int]) -> str:
        if self._failed or not token_ids:
            return ""
        pieces = []
        try:
            for t in token_ids:  # one id per call: older tokenizers take no lists
                piece = self._stream.step(self._backend, int(t))
                if piece:
                    pieces.append(piece)
        except Exception as exc:  # DecodeStream's own prefix check refused: hold the rest
            logger.debug("DecodeStream gave up (%s); the rest of the text comes at the end", exc)
            self._failed = True
        return "".join(pieces)


class _WindowSource:
    """Raw text deltas by the prefix/read-offset window over ``tokenizer.decode``.

    ``ids[prefix:read]`` is the context already emitted (a few tokens, so that a
    decoder that drops a leading space or merges across tokens sees the same
    neighbourhood both times); the text of ``ids[read:]`` is emitted once the window's
    decoding extends the context's and does not end in an incomplete character.
    """

    kind = "window"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self._kwargs: dict[str, Any] = {"skip_special_tokens": True}
        try:  # the clean-up (if any) is applied by Detokenizer over the joined stream
            tokenizer.decode([], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            self._kwargs["clean_up_tokenization_spaces"] = False
        except TypeError:
            pass

    def push(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        decode = self.tokenizer.decode
        context = decode(self._ids[self._prefix : self._read], **self._kwargs)
        window = decode(self._ids[self._prefix :], **self._kwargs)
        if len(window) <= len(context) or window.endswith(_INCOMPLETE):
            return ""
        if not window.startswith(context):
            return ""  # the context decodes differently in this window: wait for more
        # drop ids before the new context: what is emitted never needs them again
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return window[len(context) :]


def _source(tokenizer: Any) -> _StreamSource | _WindowSource:
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21 has no DecodeStream
        return _WindowSource(tokenizer)
    if isinstance(getattr(tokenizer, "backend_tokenizer", None), Tokenizer):
        return _StreamSource(tokenizer, DecodeStream)
    return _WindowSource(tokenizer)


def _cleans_up(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` applies transformers' space clean-up.

    Read from what decode does, not from the flag: transformers ignores the flag for
    BPE tokenizers unless told otherwise, and that rule may change.
    """
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    if not callable(getattr(tokenizer, "clean_up_tokenization", None)):
        return False
    try:
        ids = tokenizer.encode("a . b , c", add_special_tokens=False)
        kw = {"skip_special_tokens": True}
        plain = tokenizer.decode(ids, clean_up_tokenization_spaces=False, **kw)
        return tokenizer.decode(ids, **kw) != plain
    except Exception:  # a tokenizer without these options: trust the flag
        return True


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
