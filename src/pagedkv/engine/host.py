"""Host tensors the step's metadata is packed into before its one host-to-device copy
(shared by the eager path in ``model_runner`` and the CUDA graphs in ``cuda_graphs``)."""

from __future__ import annotations

import numpy as np
import torch


def host_int64(values: list[int], pin: bool) -> torch.Tensor:
    """A CPU int64 tensor of ``values`` (pinned if ``pin``). numpy parses a list of
    Python ints several times faster than ``torch.tensor`` does."""
    t = torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))
    return t.pin_memory() if pin else t
