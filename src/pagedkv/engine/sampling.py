"""Next-token selection for a batch of requests: greedy, temperature, top-k, top-p.

All rows are filtered together on the device; only the random draw is per request, from
the request's own ``torch.Generator``, so a seeded request gets the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedkv.engine.request import SamplingParams


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Tokens [n] (int64, logits' device) for logits [n, V] (any float dtype)."""
    greedy = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return greedy
    idx = torch.tensor(rows, device=logits.device)
    x = logits.index_select(0, idx).float()  # [m, V]
    temps = torch.tensor([params[i].temperature for i in rows], device=x.device)
    x = x / temps[:, None]
    top_k = [params[i].top_k for i in rows]
    top_p = [params[i].top_p for i in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        x = _filter(x, top_k, top_p)
    probs = torch.softmax(x, dim=-1)
    drawn = torch.stack(
        [torch.multinomial(probs[j], 1, generator=generators[i])[0] for j, i in enumerate(rows)]
    )
    return greedy.index_copy(0, idx, drawn)


def _filter(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p nucleus to -inf. x: [m, V] float32."""
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=x.device)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    drop = ranks >= ks[:, None]
    ps = torch.tensor(top_p, device=x.device)
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    # keep a token while the mass before it is < p (the top token is always kept)
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= ps[:, None]
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed if None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
