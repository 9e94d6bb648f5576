"""Shared test set-up.

Without CUDA, Triton kernels run through the Triton interpreter; the variable must
be set before triton is first imported, hence here at collection time.
"""

from __future__ import annotations

import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the manager tests run without torch
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _redis import (  # noqa: E402,F401  (real redis-server fixtures)
    redis_cluster,
    redis_cluster_nodes,
    redis_server,
    redis_url,
)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models on one thread (faster, and no fight with other tests)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def invariant_one_thread():
    """One test on one thread in batch-invariant mode (engines that must give the same
    tokens whatever shares their batch: migration, snapshots)."""
    import torch

    from pagedkv.ops import batch_invariant_mode

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with batch_invariant_mode():
        yield
    torch.set_num_threads(old)
