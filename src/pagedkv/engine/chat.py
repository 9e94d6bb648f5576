"""Chat prompts: conversations checked, then rendered by the tokenizer's chat template.

An instruct model answers a question only when it sees it in its chat format (role
markers, a generation prompt); given the raw text it often continues it or stops at
once. :meth:`Engine.chat` and ``generate(..., chat=True)`` render conversations here;
raw prompts stay right for base models and for text you formatted yourself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Roles a message may have (the standard chat-template roles).
ROLES = ("system", "user", "assistant", "tool")

Message = Mapping[str, Any]
Conversation = Sequence[Message]


def validate_conversation(messages: object) -> list[dict[str, Any]]:
    """A conversation as a list of message dicts; ``TypeError``/``ValueError`` naming the
    message index otherwise.

    Each message is a dict with ``"role"`` (one of :data:`ROLES`) and ``"content"`` (a
    str); other keys (``"name"``, ``"tool_call_id"``...) are passed to the template.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(
            'a conversation must be a list of {"role": ..., "content": ...} dicts, got '
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ValueError("empty conversation: give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(
                f'message {i} must be a dict {{"role": ..., "content": ...}}, got '
                f"{type(m).__name__}"
            )
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise TypeError(f"message {i}: role must be a str, one of {ROLES}, got {role!r}")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise TypeError(
                f"message {i} ({role}): content must be a str, got {type(content).__name__}"
            )
        out.append(dict(m))
    return out


def as_conversations(messages: object) -> tuple[list[Conversation], bool]:
    """``(conversations, single)``: one conversation (a list of dicts) or a list of them."""
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        if messages and all(
            isinstance(c, Sequence) and not isinstance(c, (str, bytes, Mapping)) for c in messages
        ):
            return list(messages), False
        return [messages], True
    raise TypeError(
        'messages must be a conversation (a list of {"role": ..., "content": ...} dicts) '
        f"or a list of conversations, got {type(messages).__name__}"
    )


def chat_prompt_ids(tokenizer: Any, messages: object) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template, ending with
    the assistant's generation prompt. A bare string is one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    conversation = validate_conversation(messages)
    if tokenizer is None:
        raise ValueError("chat prompts need a tokenizer with a chat template: Engine(model, tok)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so chat "
            "prompts cannot be rendered: pass raw prompts (text or token ids) to generate() "
            "without chat=True, or set tokenizer.chat_template"
        )
    try:
        out = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # a template's raise_exception(): the conversation is refused
        raise ValueError(f"the chat template refused the conversation: {exc}") from exc
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]
