"""Next-token selection for a batch of requests: greedy, temperature, top-k, top-p.

A request's token depends only on its own logits row, its params and its
``torch.Generator``, never on the rest of the batch:

- each row is filtered by its own params only; a row that asks for no filter is left
  untouched (filtering it anyway would drop tail tokens whose cumulative mass rounds
  past 1.0, so its distribution would depend on whether a neighbour asked for top-k);
- the sort behind top-k / top-p is stable (ties ordered by token id, whatever the
  sort algorithm the batch size selects);
- the draw is one ``torch.multinomial`` per row from the request's generator;
- in batch-invariant mode (:func:`pagedkv.ops.set_batch_invariant` or
  ``batch_invariant=True``) the softmax and cumulative sums run on
  :mod:`pagedkv.ops.invariant` (a fixed reduction order per row) instead of torch's
  kernels, whose CUDA launch layout follows the number of rows. On CPU torch's own are
  already per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedkv.engine.request import SamplingParams
from pagedkv.ops import invariant, is_batch_invariant
from pagedkv.storage import to_device


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    *,
    batch_invariant: bool | None = None,
) -> torch.Tensor:
    """Tokens [n] (int64, logits' device) for logits [n, V] (any float dtype).

    ``batch_invariant`` None follows :func:`pagedkv.ops.is_batch_invariant`.
    """
    greedy = logits.argmax(dim=-1)  # ties: the first maximal index, on every device
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return greedy
    invariant_rows = is_batch_invariant() if batch_invariant is None else bool(batch_invariant)
    probs = probabilities(logits, rows, params, batch_invariant=invariant_rows)
    drawn = torch.stack(
        [torch.multinomial(probs[j], 1, generator=generators[i])[0] for j, i in enumerate(rows)]
    )
    return greedy.index_copy(0, to_device(rows, logits.device), drawn)


def probabilities(
    logits: torch.Tensor,
    rows: list[int],
    params: Sequence[SamplingParams],
    *,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """The sampling distribution [len(rows), V] float32 of logits rows ``rows``: temperature,
    then each row's own top-k / top-p filter, then softmax."""
    softmax, cumsum = _ops(batch_invariant)
    dev = logits.device
    x = logits.index_select(0, to_device(rows, dev)).float()  # [m, V]
    temps = to_device([params[i].temperature for i in rows], dev)
    x = x / temps[:, None]
    vocab = x.shape[-1]
    picked = [j for j, i in enumerate(rows) if _filters(params[i], vocab)]
    if picked:
        sel = to_device(picked, dev)
        top_k = [params[rows[j]].top_k for j in picked]
        top_p = [params[rows[j]].top_p for j in picked]
        x = x.index_copy(0, sel, _filter(x.index_select(0, sel), top_k, top_p, softmax, cumsum))
    return softmax(x, -1)


def _filters(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0


def _ops(batch_invariant: bool):
    if batch_invariant:
        return invariant.softmax, invariant.cumsum
    return torch.softmax, torch.cumsum


def _filter(x: torch.Tensor, top_k: list[int], top_p: list[float], softmax, cumsum):
    """Set logits outside each row's top-k / top-p nucleus to -inf. x: [m, V] float32."""
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    ks = to_device([k if 0 < k < vocab else vocab for k in top_k], x.device)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    drop = ranks >= ks[:, None]
    # p = 1 drops nothing (a cumulative mass that rounds to >= 1.0 must not cut the tail)
    ps = to_device([p if p < 1.0 else float("inf") for p in top_p], x.device)
    probs = softmax(sorted_x.masked_fill(drop, float("-inf")), -1)
    # keep a token while the mass before it is < p (the top token is always kept)
    before = cumsum(probs, -1) - probs
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
