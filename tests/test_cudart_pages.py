"""PageLock registers only pages that belong to the tensor (CPU: a recording runtime).

A tensor malloc put on the heap shares its first and last pages with other allocations;
registering them made an unrelated small tensor's host->device copy fail with "invalid
argument" on the H200 (found by tests/test_group_gpu.py). KVPool's CPU memory is its own
mapping, so a group can lock it.
"""

from __future__ import annotations

import mmap

import pytest
import torch

from pagedkv import KVLayout
from pagedkv.storage import KVPool, cudart


class Recorder:
    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def host_register(self, ptr: int, size: int) -> None:
        self.registered.append((ptr, size))

    def host_unregister(self, ptr: int) -> None:
        self.unregistered.append(ptr)


def test_own_pages_is_zeroed_page_aligned_and_whole_pages():
    t = cudart.own_pages((3, 5, 7), torch.bfloat16)
    assert t.shape == (3, 5, 7) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert not t.any() and t.data_ptr() % mmap.PAGESIZE == 0
    assert t.untyped_storage().nbytes() == mmap.PAGESIZE
    t[1] = 2
    assert int(t.float().sum()) == 70


def test_page_lock_registers_the_pages_of_its_own_mapping_and_releases_them():
    rt = Recorder()
    t = cudart.own_pages((3 * mmap.PAGESIZE + 10,), torch.uint8)
    lock = cudart.PageLock(t[5:], rt)
    assert lock.owned and lock.locked
    assert rt.registered == [(t.data_ptr(), 4 * mmap.PAGESIZE)]
    lock.release()
    lock.release()
    assert rt.unregistered == [t.data_ptr()] and not lock.locked


def test_page_lock_refuses_pages_shared_with_other_allocations():
    rt = Recorder()
    mapping = mmap.mmap(-1, 5 * mmap.PAGESIZE)
    # a storage 100 bytes into a page, as malloc places a heap tensor: its first and last
    # pages hold other bytes
    t = torch.frombuffer(memoryview(mapping)[100 : 100 + 3 * mmap.PAGESIZE], dtype=torch.uint8)
    with pytest.raises(cudart.CudaRuntimeError, match="shares memory pages"):
        cudart.PageLock(t, rt)
    assert rt.registered == []


def test_cpu_pools_live_on_their_own_pages():
    pool = KVPool(KVLayout(2, 2, 8, 4), 8)
    storage = pool.kv.untyped_storage()
    assert pool.kv.data_ptr() == storage.data_ptr() and storage.data_ptr() % mmap.PAGESIZE == 0
    assert storage.nbytes() % mmap.PAGESIZE == 0 and storage.nbytes() >= pool.nbytes
    assert not pool.kv.any()
