"""The ops settings (backend, batch invariance) belong to the current thread or task."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from pagedkv import ops


def _in_thread(fn):
    """``fn()``'s result, run in a new thread (exceptions re-raised here)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


SETTINGS = [
    (ops.set_backend, ops.get_backend, None, "reference"),
    (ops.set_batch_invariant, ops.is_batch_invariant, False, True),
]


@pytest.mark.parametrize(
    ("set_", "get", "default", "value"), SETTINGS, ids=["backend", "invariant"]
)
def test_a_setting_made_in_a_thread_stays_in_that_thread(set_, get, default, value):
    assert get() == default

    def worker():
        set_(value)
        return get(), _in_thread(get)

    # a thread it starts begins from the defaults, or from a copy of its context where
    # Python copies contexts into new threads (sys.flags.thread_inherit_context)
    inherited = value if getattr(sys.flags, "thread_inherit_context", 0) else default
    assert _in_thread(worker) == (value, inherited)
    assert get() == default  # not leaked to the caller
    assert _in_thread(get) == default  # nor to the next thread


@pytest.mark.parametrize(
    ("set_", "get", "default", "value"), SETTINGS, ids=["backend", "invariant"]
)
def test_set_returns_the_previous_value_to_restore(set_, get, default, value):
    started, release, seen = threading.Event(), threading.Event(), []

    def other():  # started before the change: it never sees it
        started.set()
        release.wait(5)
        seen.append(get())

    t = threading.Thread(target=other)
    t.start()
    started.wait(5)
    previous = set_(value)
    try:
        assert previous == default and get() == value
        assert set_(value) == value  # the value for the rest of this thread, until changed
        release.set()
        t.join()
        assert seen == [default]
    finally:
        assert set_(previous) == value
    assert get() == default


def test_asyncio_tasks_keep_their_own_setting():
    async def task(name, value):
        ops.set_backend(value)
        await asyncio.sleep(0)  # the other task runs and sets its own value meanwhile
        return name, ops.get_backend()

    async def main():
        results = await asyncio.gather(task("a", "reference"), task("b", None))
        return results, ops.get_backend()

    results, after = asyncio.run(main())
    assert results == [("a", "reference"), ("b", None)] and after is None
    assert ops.get_backend() is None


def test_the_scoped_forms_restore_on_exit_and_on_error():
    with ops.use_backend("reference"):
        with pytest.raises(RuntimeError), ops.use_backend(None):
            assert ops.get_backend() is None
            raise RuntimeError("boom")
        assert ops.get_backend() == "reference"
    assert ops.get_backend() is None
    with pytest.raises(RuntimeError), ops.batch_invariant_mode():
        assert ops.is_batch_invariant()
        raise RuntimeError("boom")
    assert not ops.is_batch_invariant()


def test_a_bad_backend_changes_nothing():
    with pytest.raises(ValueError, match="unknown ops backend 'cuda'"):
        ops.set_backend("cuda")
    assert ops.get_backend() is None
