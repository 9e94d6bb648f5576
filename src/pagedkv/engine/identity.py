"""What identifies a model for the KV cache: its fingerprint and its end-of-sequence ids.

KV computed by one set of weights must never be served to another (a fine-tune, a
new weight version): the fingerprint is folded into every block hash, every tier key
and every snapshot manifest.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

#: Elements read from each parameter for the weights digest (a strided sample).
_SAMPLE = 4096


def model_fingerprint(model: Any, version: str | None = None) -> str:
    """``<model_type>-<digest>``: config, dtype and a sample of every weight tensor.

    The digest covers the full config, each parameter's name, shape and dtype, and a
    strided sample of its values (up to 4,096 elements per tensor, read on its device
    and moved to the host once), so a fine-tune or a weight update changes it while
    fingerprinting a billion-parameter model stays cheap. ``version`` (e.g. a weights
    revision) replaces the sampled weights when the caller knows the identity better.
    """
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    if version is not None:
        h.update(b"version:" + str(version).encode())
    else:
        samples = []
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            samples.append(flat[::step][:_SAMPLE].float())
        if samples:
            values = torch.cat(samples).cpu()
            h.update(values.numpy().tobytes())
    return f"{model.config.model_type}-{h.hexdigest()[:24]}"


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)
