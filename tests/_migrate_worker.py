"""The other process of tests/test_engine_migrate_store.py: an engine that resumes parked
requests (spawned: it imports this module by name)."""

from __future__ import annotations


def resume_all(store: str, names: list[str], other: list[int], out) -> None:
    """Resume every parked request beside one of its own; put {name: tokens} and the
    other request's tokens on ``out`` (or the error's text)."""
    try:
        import torch

        import _models
        from pagedkv.engine import Engine, SamplingParams
        from pagedkv.ops import batch_invariant_mode

        torch.set_num_threads(1)
        with batch_invariant_mode():
            engine = Engine(_models.tiny(seed=0), num_blocks=48, block_size=4)
            mine = engine.add_request(other, SamplingParams(max_new_tokens=6, ignore_eos=True))
            ids = {engine.resume_migrated(n, store=store): n for n in names}
            got: dict = {}
            while engine.has_unfinished():
                for o in engine.step():
                    got["mine" if o.request_id == mine else ids[o.request_id]] = o.token_ids
            engine.cache.check_integrity()
            out.put(("ok", got, engine.stats().blocks_in_use))
    except BaseException as exc:  # the parent shows it
        out.put(("error", f"{type(exc).__name__}: {exc}", None))
