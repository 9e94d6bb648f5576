"""The `pagedkv demo` workload: multi-turn chats sharing one system prompt.

Each conversation's next turn is submitted the moment its previous answer finishes,
so requests join and leave the running batch every step; every turn's prompt is the
whole conversation so far (chat template), which the prefix cache mostly serves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedkv.engine.chat import chat_prompt_ids
from pagedkv.engine.engine import Engine
from pagedkv.engine.request import SamplingParams

SYSTEM_PROMPT = (
    "You are a friendly and knowledgeable assistant for a public library. You answer "
    "questions from visitors of all ages clearly and briefly, in plain English, with one "
    "or two short sentences. If you are not sure about a fact, you say so. You never "
    "make up book titles, and you suggest asking a librarian for anything about loans, "
    "membership cards or opening hours. Be warm, precise and concise."
)

TOPICS = [
    "the water cycle",
    "photosynthesis",
    "volcanoes",
    "the moon",
    "honey bees",
    "rainbows",
    "gravity",
    "the human heart",
    "dinosaurs",
    "electricity",
    "the ocean tides",
    "clouds",
    "earthquakes",
    "the solar system",
    "penguins",
    "recycling",
    "magnets",
    "the Roman Empire",
    "pyramids",
    "wind energy",
    "snowflakes",
    "coral reefs",
    "bats",
    "the Internet",
    "bread baking",
    "chess",
    "the Olympic Games",
    "trees",
    "sound",
    "light",
    "maps",
    "music",
]
FOLLOW_UPS = ["Can you give me one example?", "Why is that important?"]


@dataclass
class DemoReport:
    """What the demo measured (printed as a table by the CLI)."""

    requests: int
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    generated_tokens: int
    seconds: float
    tokens_per_s: float
    blocks_peak: int
    dense_blocks_peak: int
    block_size: int
    bytes_per_block: int
    preemptions: int
    samples: list[tuple[str, str]] = field(default_factory=list)


def run_chat_demo(
    engine: Engine,
    *,
    conversations: int = 32,
    turns: int = 3,
    max_new_tokens: int = 32,
    progress: Any = None,
) -> DemoReport:
    """Run the chat workload on ``engine`` (which needs a tokenizer with a chat
    template). ``progress(done, total)`` is called as requests finish."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("the chat demo needs an engine with a tokenizer")
    params = SamplingParams(max_new_tokens=max_new_tokens)
    chats = [
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."},
        ]
        for i in range(conversations)
    ]
    total = conversations * turns
    turn_of: dict[int, tuple[int, int]] = {}  # request id -> (conversation, turn)
    running_dense: dict[int, int] = {}  # request id -> tokens a dense cache reserves
    dense_peak = 0
    bs = engine.cache.block_size

    def submit(conv: int, turn: int) -> None:
        ids = chat_prompt_ids(tok, chats[conv])
        rid = engine.add_request(ids, params)
        turn_of[rid] = (conv, turn)
        running_dense[rid] = -(-(len(ids) + max_new_tokens) // bs)

    start = engine.stats()
    t0 = time.perf_counter()
    for c in range(conversations):
        submit(c, 0)
    done = 0
    samples: list[tuple[str, str]] = []
    while engine.has_unfinished():
        # a dense cache holds prompt + max_new_tokens for every request in flight
        dense_peak = max(dense_peak, sum(running_dense.values()))
        for out in engine.step():
            conv, turn = turn_of.pop(out.request_id)
            running_dense.pop(out.request_id, None)
            chats[conv].append({"role": "assistant", "content": out.text or ""})
            done += 1
            if progress is not None:
                progress(done, total)
            if turn == 0 and len(samples) < 3:
                samples.append((chats[conv][1]["content"], out.text or ""))
            if turn + 1 < turns:
                chats[conv].append({"role": "user", "content": FOLLOW_UPS[turn % 2]})
                submit(conv, turn + 1)
    seconds = time.perf_counter() - t0
    end = engine.stats()
    gen = end.generated_tokens - start.generated_tokens
    return DemoReport(
        requests=total,
        prompt_tokens=end.prompt_tokens - start.prompt_tokens,
        cached_tokens=end.cached_tokens - start.cached_tokens,
        prefill_tokens=end.prefill_tokens - start.prefill_tokens,
        generated_tokens=gen,
        seconds=seconds,
        tokens_per_s=gen / seconds if seconds else 0.0,
        blocks_peak=end.blocks_peak,
        dense_blocks_peak=dense_peak,
        block_size=bs,
        bytes_per_block=engine.cache.layout.bytes_per_block,
        preemptions=end.preemptions - start.preemptions,
        samples=samples,
    )
