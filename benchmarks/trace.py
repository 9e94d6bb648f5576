# A verbatim copy of the standard trace generator (shared/bench/trace.py); do not edit it here.
"""Deterministic KV-cache block-manager trace ("anchor trace").

One trace is replayed through several block managers (vLLM, SGLang,
transformers, pagedkv) so their CPU cost can be compared on identical work.

Shape of the workload (all defaults below, all derived from ``seed``):

* 16 "system prompts" of 1,024-2,048 tokens; token ids uniform in [0, 32000).
* 2,000 requests.  Request i = one system prompt, picked Zipf-like
  (P(rank k) ~ 1 / k**1.1), + a unique suffix of 32-512 random tokens.
* At most 64 requests are live at once; requests are admitted in order (FIFO),
  at most ``admit_per_step`` (default 1) per decode step, so lifetimes are
  staggered instead of arriving in synchronized waves of 64.
* Every decode step, each live request (in admission order) appends one token
  (random id); after its 128th token it finishes and is freed.
* Block size 16.  Pool size = blocks for 64 live requests of the maximum
  possible length (2048 + 512 + 128 tokens = 168 blocks), plus 50 %:
  ceil(64 * 168 * 1.5) = 16,128 blocks.

Order of events inside one step: admissions, then one append per live request,
then the frees of requests that have appended their 128th token.

Events (a plain list, in order):

    ("admit",  req_id, token_ids)   # token_ids: list[int], the full prompt
    ("append", req_id, token_id)    # one decode token
    ("free",   req_id)              # request finished; release its blocks

``Trace.step_starts`` lists the event index at which each decode step begins,
for managers whose real scheduler does per-step work (e.g. transformers'
eviction check); replayers that work per event can ignore it.

Run ``python trace.py`` to print the trace statistics, including a small
reference simulation (ref-counted blocks, chained block hashes, LRU eviction of
unreferenced cached blocks, vLLM-like free order) giving the expected prefix
hit rate and eviction counts for this pool size.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["TraceParams", "Trace", "generate_trace", "pool_blocks", "main"]


@dataclass(frozen=True)
class TraceParams:
    seed: int = 0
    num_requests: int = 2000
    num_system_prompts: int = 16
    system_prompt_min: int = 1024
    system_prompt_max: int = 2048
    suffix_min: int = 32
    suffix_max: int = 512
    zipf_s: float = 1.1
    vocab_size: int = 32000
    block_size: int = 16
    max_live: int = 64
    decode_tokens: int = 128
    admit_per_step: int = 1
    pool_headroom: float = 0.5  # pool = max_live * max-length blocks * (1 + headroom)


def max_request_tokens(p: TraceParams) -> int:
    """Largest possible request length (prompt + decode), from the parameters."""
    return p.system_prompt_max + p.suffix_max + p.decode_tokens


def pool_blocks(p: TraceParams) -> int:
    """Usable KV blocks in the pool: max_live requests of maximum length, + headroom."""
    blocks_per_req = math.ceil(max_request_tokens(p) / p.block_size)
    return math.ceil(p.max_live * blocks_per_req * (1.0 + p.pool_headroom))


@dataclass
class Trace:
    params: TraceParams
    events: list  # list of ("admit", rid, tokens) / ("append", rid, tok) / ("free", rid)
    step_starts: list  # event index where each decode step begins
    system_prompts: list  # list[list[int]]
    request_system_prompt: list  # rid -> system prompt index (0 = most popular)
    request_suffix_len: list  # rid -> suffix length
    num_pool_blocks: int = 0
    meta: dict = field(default_factory=dict)

    def digest(self) -> str:
        """sha256 over a canonical serialization of the event list (checks determinism)."""
        h = hashlib.sha256()
        for ev in self.events:
            kind = ev[0]
            if kind == "admit":
                h.update(b"A%d:" % ev[1])
                h.update(",".join(map(str, ev[2])).encode())
            elif kind == "append":
                h.update(b"P%d:%d" % (ev[1], ev[2]))
            else:
                h.update(b"F%d" % ev[1])
            h.update(b";")
        return h.hexdigest()


class _Rng:
    """Mersenne Twister through ``getrandbits`` only, so the stream does not depend
    on how a Python version implements randrange/choices."""

    def __init__(self, seed: int):
        import random

        self._r = random.Random(seed)
        self._bits = self._r.getrandbits

    def below(self, n: int) -> int:
        k = n.bit_length()
        bits = self._bits
        while True:
            x = bits(k)
            if x < n:
                return x

    def between(self, lo: int, hi: int) -> int:  # inclusive
        return lo + self.below(hi - lo + 1)

    def uniform01(self) -> float:
        return self._bits(53) / 9007199254740992.0

    def tokens(self, n: int, vocab: int) -> list:
        k = vocab.bit_length()
        bits = self._bits
        out = []
        append = out.append
        while len(out) < n:
            x = bits(k)
            if x < vocab:
                append(x)
        return out


def generate_trace(seed: int = 0, **overrides) -> Trace:
    """Build the trace for ``seed`` (other TraceParams fields may be overridden)."""
    p = TraceParams(seed=seed, **overrides)
    rng = _Rng(p.seed)

    system_prompts = [
        rng.tokens(rng.between(p.system_prompt_min, p.system_prompt_max), p.vocab_size)
        for _ in range(p.num_system_prompts)
    ]
    weights = [1.0 / (k**p.zipf_s) for k in range(1, p.num_system_prompts + 1)]
    total = sum(weights)
    cum, acc = [], 0.0
    for w in weights:
        acc += w / total
        cum.append(acc)
    cum[-1] = 1.0

    req_sys, req_suf = [], []
    prompts = []
    for _ in range(p.num_requests):
        s = min(bisect_right(cum, rng.uniform01()), p.num_system_prompts - 1)
        n_suf = rng.between(p.suffix_min, p.suffix_max)
        req_sys.append(s)
        req_suf.append(n_suf)
        prompts.append(system_prompts[s] + rng.tokens(n_suf, p.vocab_size))

    events: list = []
    step_starts: list = []
    live: list = []  # [rid, tokens_appended], admission order
    next_rid = 0
    while next_rid < p.num_requests or live:
        step_starts.append(len(events))
        admitted = 0
        while next_rid < p.num_requests and len(live) < p.max_live and admitted < p.admit_per_step:
            events.append(("admit", next_rid, prompts[next_rid]))
            live.append([next_rid, 0])
            next_rid += 1
            admitted += 1
        for entry in live:
            events.append(("append", entry[0], rng.below(p.vocab_size)))
            entry[1] += 1
        still = []
        for entry in live:
            if entry[1] >= p.decode_tokens:
                events.append(("free", entry[0]))
            else:
                still.append(entry)
        live = still

    return Trace(
        params=p,
        events=events,
        step_starts=step_starts,
        system_prompts=system_prompts,
        request_system_prompt=req_sys,
        request_suffix_len=req_suf,
        num_pool_blocks=pool_blocks(p),
    )


# --------------------------------------------------------------------------- #
# Reference simulation (plain Python, for the statistics printed by main).
# --------------------------------------------------------------------------- #


def simulate_reference(trace: Trace) -> dict:
    """Replay the trace through a minimal ref-counted block pool with chained
    block identities and LRU eviction of unreferenced cached blocks.

    Semantics follow vLLM's v1 block pool: a full block becomes cacheable as
    soon as it is written (prompt blocks at admission, decode blocks when their
    16th token is appended); lookups stop one token before the end of the prompt;
    a finished request's blocks go to the tail of the free queue in reverse
    order (tail block first), unfilled blocks to the head; allocation pops the
    head and evicts whatever cached content the popped block held.
    """
    p = trace.params
    bs = p.block_size
    n_blocks = trace.num_pool_blocks
    content_ids: dict = {}  # (parent_cid, tokens tuple) -> cid
    sys_cids = set()
    for sp in trace.system_prompts:
        parent = -1
        for b in range(len(sp) // bs):
            key = (parent, tuple(sp[b * bs : (b + 1) * bs]))
            parent = content_ids.setdefault(key, len(content_ids))
            sys_cids.add(parent)

    cached: dict = {}  # cid -> block
    block_cid = [None] * n_blocks
    ref = [0] * n_blocks
    free_q: OrderedDict = OrderedDict((b, None) for b in range(n_blocks))
    reqs: dict = {}  # rid -> [tokens, blocks, cids]
    hits = prompt_tokens = evictions = sys_evictions = 0
    peak_used = 0

    def alloc():
        nonlocal evictions, sys_evictions
        b, _ = free_q.popitem(last=False)
        cid = block_cid[b]
        if cid is not None:
            del cached[cid]
            block_cid[b] = None
            evictions += 1
            if cid in sys_cids:
                sys_evictions += 1
        ref[b] = 1
        return b

    def commit_full_blocks(state):
        tokens, blocks, cids = state
        while len(cids) < len(tokens) // bs:
            i = len(cids)
            parent = cids[-1] if cids else -1
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            cid = content_ids.setdefault(key, len(content_ids))
            cids.append(cid)
            b = blocks[i]
            if block_cid[b] is None and cid not in cached:
                cached[cid] = b
                block_cid[b] = cid

    for ev in trace.events:
        kind = ev[0]
        if kind == "admit":
            rid, toks = ev[1], ev[2]
            prompt_tokens += len(toks)
            blocks, parent = [], -1
            for i in range((len(toks) - 1) // bs):
                cid = content_ids.get((parent, tuple(toks[i * bs : (i + 1) * bs])))
                b = cached.get(cid) if cid is not None else None
                if b is None:
                    break
                if ref[b] == 0:
                    del free_q[b]
                ref[b] += 1
                blocks.append(b)
                parent = cid
            hits += len(blocks) * bs
            for _ in range(math.ceil(len(toks) / bs) - len(blocks)):
                blocks.append(alloc())
            state = [list(toks), blocks, []]
            reqs[rid] = state
            commit_full_blocks(state)
        elif kind == "append":
            state = reqs[ev[1]]
            state[0].append(ev[2])
            if len(state[0]) > len(state[1]) * bs:
                state[1].append(alloc())
            commit_full_blocks(state)
        else:
            _, blocks, _ = reqs.pop(ev[1])
            head = []
            for b in reversed(blocks):
                ref[b] -= 1
                if ref[b] == 0:
                    if block_cid[b] is None:
                        head.append(b)
                    else:
                        free_q[b] = None
            for b in head:  # uncached blocks are reused first
                free_q[b] = None
                free_q.move_to_end(b, last=False)
        used = n_blocks - len(free_q)
        if used > peak_used:
            peak_used = used
    return {
        "hit_tokens": hits,
        "prompt_tokens": prompt_tokens,
        "hit_rate": hits / prompt_tokens,
        "evicted_blocks": evictions,
        "evicted_system_prompt_blocks": sys_evictions,
        "peak_referenced_blocks": peak_used,
    }


def trace_stats(trace: Trace) -> dict:
    p = trace.params
    bs = p.block_size
    counts = {"admit": 0, "append": 0, "free": 0}
    prompt_tokens = prompt_blocks = 0
    live_blocks = peak_live_blocks = peak_live = 0
    cur = {}
    for ev in trace.events:
        counts[ev[0]] += 1
        if ev[0] == "admit":
            n = len(ev[2])
            prompt_tokens += n
            prompt_blocks += math.ceil(n / bs)
            cur[ev[1]] = n
            live_blocks += math.ceil(n / bs)
        elif ev[0] == "append":
            n = cur[ev[1]] = cur[ev[1]] + 1
            if n % bs == 1:
                live_blocks += 1
        else:
            live_blocks -= math.ceil(cur.pop(ev[1]) / bs)
        peak_live = max(peak_live, len(cur))
        peak_live_blocks = max(peak_live_blocks, live_blocks)
    # Upper bound on prefix hits with an infinite cache: every request after the
    # first user of its system prompt reuses the prompt's full blocks.
    seen = set()
    ideal_hits = 0
    for s in trace.request_system_prompt:
        if s in seen:
            ideal_hits += len(trace.system_prompts[s]) // bs * bs
        seen.add(s)
    usage = [0] * p.num_system_prompts
    for s in trace.request_system_prompt:
        usage[s] += 1
    return {
        "events": len(trace.events),
        "admits": counts["admit"],
        "appends": counts["append"],
        "frees": counts["free"],
        "steps": len(trace.step_starts),
        "prompt_tokens": prompt_tokens,
        "prompt_blocks": prompt_blocks,
        "mean_prompt_tokens": prompt_tokens / max(1, counts["admit"]),
        "system_prompt_lengths": [len(sp) for sp in trace.system_prompts],
        "system_prompt_usage": usage,
        "suffix_tokens_mean": sum(trace.request_suffix_len) / len(trace.request_suffix_len),
        "peak_live_requests": peak_live,
        "peak_live_blocks_unshared": peak_live_blocks,
        "ideal_hit_tokens": ideal_hits,
        "ideal_hit_rate": ideal_hits / prompt_tokens,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--no-sim", action="store_true", help="skip the reference simulation")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tr = generate_trace(args.seed, num_requests=args.requests)
    t_gen = time.perf_counter() - t0
    p = tr.params
    st = trace_stats(tr)
    max_tok = max_request_tokens(p)
    print(f"trace seed={p.seed}  generated in {t_gen:.2f} s  digest={tr.digest()[:16]}")
    print(
        f"params: {p.num_requests} requests, {p.num_system_prompts} system prompts "
        f"[{p.system_prompt_min}, {p.system_prompt_max}] tok, suffix [{p.suffix_min}, {p.suffix_max}] tok, "
        f"Zipf s={p.zipf_s}, vocab {p.vocab_size}, block {p.block_size}, max live {p.max_live}, "
        f"{p.decode_tokens} decode tokens, <= {p.admit_per_step} admission(s)/step"
    )
    print(
        f"pool: max request = {max_tok} tok = {math.ceil(max_tok / p.block_size)} blocks; "
        f"{p.max_live} x {math.ceil(max_tok / p.block_size)} x {1 + p.pool_headroom:g} "
        f"= {tr.num_pool_blocks} blocks ({tr.num_pool_blocks * p.block_size} token slots)"
    )
    print(
        f"events: {st['events']} ({st['admits']} admit, {st['appends']} append, {st['frees']} free) "
        f"in {st['steps']} decode steps"
    )
    print(
        f"prompts: {st['prompt_tokens']} tokens, {st['prompt_blocks']} blocks (ceil per request), "
        f"mean {st['mean_prompt_tokens']:.0f} tok; mean suffix {st['suffix_tokens_mean']:.0f} tok"
    )
    print(f"system prompt lengths: {st['system_prompt_lengths']}")
    print(f"system prompt usage (rank 1..16): {st['system_prompt_usage']}")
    print(
        f"peak live requests {st['peak_live_requests']}, peak live blocks without sharing "
        f"{st['peak_live_blocks_unshared']} ({st['peak_live_blocks_unshared'] / tr.num_pool_blocks:.0%} of pool)"
    )
    print(
        f"prefix-hit upper bound (infinite cache, full blocks): {st['ideal_hit_tokens']} tokens "
        f"= {st['ideal_hit_rate']:.1%} of prompt tokens"
    )
    if not args.no_sim:
        t0 = time.perf_counter()
        sim = simulate_reference(tr)
        print(
            f"reference LRU simulation ({time.perf_counter() - t0:.1f} s): hit {sim['hit_tokens']} tokens "
            f"= {sim['hit_rate']:.1%}; evicted {sim['evicted_blocks']} cached blocks, of which "
            f"{sim['evicted_system_prompt_blocks']} system-prompt blocks; peak referenced blocks "
            f"{sim['peak_referenced_blocks']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
