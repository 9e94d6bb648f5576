"""The 1,000-run part of benchmarks/bench_invariance.py: one prompt and one seed, run many
times in rounds of random composition, and the completions it got.

A round runs on one engine (one per chunk budget, each with a CPU tier and a snapshot
store) and gives the target's prefix one cache state, prepared before the round:
``cold`` (a salt never used: the prefix is computed), ``device`` (a salt whose prefix
an earlier run left in the device cache), ``tier`` (a fresh salt, computed once, then
unrelated traffic that cycles the whole device pool pushes it to the CPU tier) and
``snapshot`` (the target's first tokens were generated once and saved; each copy is
resumed from the store). Copies of the target sit at random places among random other
requests: their prompt lengths, sampling settings and generation lengths vary, some
share the target's system prefix, so the batches, the chunks and the decode steps the
target shares change all along. What each copy really got is measured, not assumed: a
copy's state is what its own counters say (prefix tokens served from the cache, tier
hits during its round). Under a chunk budget shorter than the prompt, only the blocks of
the first chunk come back from the tier (the scheduler allocates chunk by chunk, and
only ``KVCache.allocate`` asks the tiers); the rest is computed.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from pagedkv.engine import Engine, SamplingParams

STATES = ("cold", "device", "tier", "snapshot")


@dataclass
class Setup:
    """What the runs share: the model, the target request and the sizes."""

    model: object
    vocab: int
    system: list[int]  # the target's system prefix, shared by some other requests
    target: list[int]  # system + its own tokens
    new: int  # tokens the target generates
    seed: int
    max_batch: int
    budgets: tuple[int, ...]
    num_blocks: int
    block_size: int
    tier_bytes: int
    snapshot_dir: str
    cuda_graphs: bool = True

    def params(self, n: int | None = None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.new if n is None else n, temperature=1.0, seed=self.seed,
            ignore_eos=True,
        )  # fmt: skip


@dataclass
class Tally:
    """The completions of the target and where each came from."""

    completions: Counter = field(default_factory=Counter)
    runs: list[dict] = field(default_factory=list)  # one per copy: state, budget, batch, ...
    rounds: int = 0
    seconds: float = 0.0

    def add(self, tokens: list[int], **where) -> None:
        self.completions[tuple(tokens)] += 1
        self.runs.append(dict(where, completion=tuple(tokens)))

    def summary(self) -> dict:
        top = self.completions.most_common(1)[0][0] if self.completions else ()
        odd = [dict((k, v) for k, v in r.items() if k != "completion")
               for r in self.runs if r["completion"] != top]  # fmt: skip
        return {
            "runs": len(self.runs), "unique_completions": len(self.completions),
            "rounds": self.rounds, "seconds": round(self.seconds, 1),
            "by_state": dict(Counter(r["state"] for r in self.runs)),
            "by_budget": dict(Counter(r["budget"] for r in self.runs)),
            "batch_sizes": sorted({r["batch"] for r in self.runs}),
            "differing_runs": odd[:20], "num_differing": len(odd),
        }  # fmt: skip


class Rounds:
    """Runs rounds until ``runs`` copies of the target are done (or time is up)."""

    def __init__(self, s: Setup, invariant: bool, rng: random.Random) -> None:
        self.s, self.rng, self.invariant = s, rng, invariant
        self.engines = {b: self._engine(b) for b in s.budgets}
        self.snapshots: dict[int, list[int]] = {}  # budget -> the first tokens saved
        self.hot: set[int] = set()  # budgets whose engine computed the "hot" prefix
        self.tally = Tally()
        self._salts = 0

    def _engine(self, budget: int) -> Engine:
        from pagedkv.tiers import CPUTier

        s = self.s
        return Engine(
            s.model, batch_invariant=self.invariant, max_batch_tokens=budget,
            block_size=s.block_size, num_blocks=s.num_blocks, tiers=[CPUTier(s.tier_bytes)],
            snapshot_store=f"{s.snapshot_dir}/{int(self.invariant)}-{budget}",
            cuda_graphs=s.cuda_graphs,
        )  # fmt: skip

    def salt(self, kind: str) -> str:
        self._salts += 1
        return f"{kind}-{self._salts}"

    def run(self, runs: int, deadline: float) -> Tally:
        t0 = time.perf_counter()
        while len(self.tally.runs) < runs and time.perf_counter() < deadline:
            self.round(runs - len(self.tally.runs))
        self.tally.seconds = time.perf_counter() - t0
        for e in self.engines.values():
            e.close()
        return self.tally

    # -- one round ------------------------------------------------------------------

    def round(self, left: int) -> None:
        s, rng = self.s, self.rng
        budget = rng.choice(s.budgets)
        e = self.engines[budget]
        state = STATES[self.tally.rounds % len(STATES)]  # each state as often
        size = max(1, min(s.max_batch, round(math.exp(rng.uniform(0, math.log(s.max_batch))))))
        reserve = max(0, len(STATES) - 1 - self.tally.rounds)  # every state gets a round
        copies = min(max(1, left - reserve), rng.randint(1, min(size, 64)))
        if state == "snapshot":  # each resumed copy loads its history into its own blocks
            per_copy = -(-(len(s.target) + s.new) // s.block_size)
            copies = max(1, min(copies, s.num_blocks // (2 * per_copy)))
        salt = self.prepare(e, budget, state)
        others = [self.other() for _ in range(size - copies)]
        order = ["t"] * copies + ["o"] * len(others)
        rng.shuffle(order)
        self.tally.rounds += 1
        hits = e.cache.tier_stats()["tier_hit_tokens"]
        targets, pending, it = [], set(), iter(others)
        for kind in order:
            if kind == "o":
                prompt, params = next(it)
                pending.add(e.add_request(prompt, params))
            elif state == "snapshot":
                targets.append(("resumed", e.resume_stream(f"t{budget}", [], self.rest())))
            else:
                targets.append(("id", e.add_request(s.target, s.params(), cache_salt=salt)))
        ids = {v for k, v in targets if k == "id"}
        got: dict[int, object] = {}
        resumed: list = []
        while e.has_unfinished():
            for out in e.step():
                rid = out.request_id
                if out.error is not None:
                    raise RuntimeError(f"request {rid} failed in round {self.tally.rounds}: "
                                       f"{out.error}")  # fmt: skip
                e.core.take(rid)  # the engine forgets it: nothing piles up over the rounds
                if rid in ids:
                    got[rid] = out
                elif rid not in pending:  # not ours: a resumed copy of the target
                    resumed.append(out)
        tier_hit = e.cache.tier_stats()["tier_hit_tokens"] > hits
        where = dict(budget=budget, batch=size, round=self.tally.rounds)
        for out in resumed:
            self.tally.add(self.snapshots[budget] + out.token_ids, state="snapshot", **where)
        for kind, rid in targets:
            if kind == "id":
                out = got[rid]
                real = "tier" if tier_hit else "device"  # the round's hits say which
                real = "cold" if out.num_cached_tokens == 0 else real
                self.tally.add(out.token_ids, state=real, **where)

    def prepare(self, e: Engine, budget: int, state: str) -> str | None:
        """Bring the target's prefix into ``state``; the salt the copies use. Runs made to
        get there are counted too (alone, cold)."""
        s = self.s
        where = dict(budget=budget, batch=1, round=self.tally.rounds + 1)
        if state == "cold":
            return self.salt("cold")
        if state == "device":
            if budget not in self.hot:
                out = e.generate([s.target], s.params(), cache_salt="hot")[0]
                self.tally.add(out.token_ids, state="cold", **where)
                self.hot.add(budget)
            return "hot"
        if state == "tier":
            salt = self.salt("tier")
            out = e.generate([s.target], s.params(), cache_salt=salt)[0]
            self.tally.add(out.token_ids, state="cold", **where)
            self.flood(e)
            return salt
        if budget not in self.snapshots:  # snapshot: the first half once, saved
            half = s.new // 2
            out = e.generate([s.target], s.params(half), retain=True)[0]
            e.snapshot(out, f"t{budget}", overwrite=True)
            self.snapshots[budget] = list(out.token_ids)
        return None

    def flood(self, e: Engine) -> None:
        """Unrelated prompts, one token each, that take every block of the device pool:
        whatever was cached there is evicted (to the CPU tier)."""
        s, rng = self.s, self.rng
        n = s.block_size * min(64, s.num_blocks // 4)  # prompts of a quarter pool at most
        count = -(-s.num_blocks * s.block_size // n) + 1
        prompts = [[rng.randrange(3, s.vocab) for _ in range(n)] for _ in range(count)]
        e.generate(prompts, SamplingParams(max_new_tokens=1), cache_salt=self.salt("flood"))

    def rest(self) -> SamplingParams:
        return self.s.params(self.s.new - self.s.new // 2)

    def other(self) -> tuple[list[int], SamplingParams]:
        """A random request: its own length, seed and sampling; a third share the system
        prefix of the target."""
        s, rng = self.s, self.rng
        n = rng.randint(4, max(8, len(s.target)))
        own = [rng.randrange(3, s.vocab) for _ in range(n)]
        prompt = s.system + own if rng.random() < 1 / 3 else own
        kind = rng.choice(("t1", "topk", "topp", "greedy", "cold"))
        opts = {"t1": dict(temperature=1.0), "topk": dict(temperature=0.8, top_k=20),
                "topp": dict(temperature=1.0, top_p=0.9), "greedy": dict(temperature=0.0),
                "cold": dict(temperature=0.5, top_k=5, top_p=0.8)}[kind]  # fmt: skip
        seed = rng.randrange(1 << 30)
        new = rng.randint(1, max(1, 2 * s.new))
        return prompt, SamplingParams(max_new_tokens=new, seed=seed, ignore_eos=True, **opts)
