"""EngineConfig: every option of the engine, with its default, help and limits, in one place.

:class:`~pagedkv.Engine` takes an ``EngineConfig`` plus keyword overrides of its fields
(:func:`resolve_config`), and the command line builds one flag per field from the same
metadata (``pagedkv.cli``), so a default, a limit or a help text exists once. Each field
declares its limits in its metadata (:func:`option`); :meth:`EngineConfig.__post_init__`
checks every field against them (:func:`check_option`; the CLI checks a flag by
building a config of its value), so a config that exists is valid.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from pagedkv.engine.preemption import POLICIES, PolicySpec, PreemptionPolicy, make_preemption_policy

if TYPE_CHECKING:
    import torch


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    none: str | None = None,
    choices: tuple[str, ...] = (),
    cli: bool = True,
) -> Any:
    """A config field: its default, its ``help`` (the CLI's too), its limits (``low`` /
    ``high``, ``low_open`` for an open lower bound), what ``None`` means when it is
    allowed (``none``), the accepted strings (``choices``), and whether the CLI offers
    it (``cli``)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "none": none}
    return field(default=default, metadata={**meta, "choices": choices, "cli": cli})


@dataclass(frozen=True)
class EngineConfig:
    """Options of :class:`~pagedkv.Engine` (see each field's help, or ``pagedkv demo
    --help``). Frozen and validated when built: a wrong type raises ``TypeError``, a
    value out of range ``ValueError``, both naming the field and what it accepts.
    ``policy`` is ``preemption_policy`` made a policy object (not an argument)."""

    num_blocks: int | None = option(
        None, "KV blocks in the pool; None sizes it from free device memory x "
        "gpu_memory_fraction on CUDA, and from cpu_kv_bytes on CPU.", low=1, none="to size it",
    )  # fmt: skip
    gpu_memory_fraction: float = option(
        0.8, "Share of free CUDA memory the KV pool takes when num_blocks is None.",
        low=0, high=1, low_open=True,
    )  # fmt: skip
    block_size: int = option(16, "Tokens per KV block.", low=1)
    max_batch_tokens: int = option(
        8192, "Tokens computed per step (the chunked-prefill budget).", low=1
    )
    max_num_seqs: int = option(256, "Requests running at once.", low=1)
    prefix_caching: bool = option(True, "Reuse the KV of prompt prefixes seen before.")
    # not on the command line: "swap" needs tiers=, which the CLI cannot build
    preemption: str = option(
        "recompute", "What a preempted request's KV becomes: 'recompute' (freed; its full "
        "blocks stay in the prefix cache) or 'swap' (moved to the cache's tiers; needs "
        "tiers=).", choices=("recompute", "swap"), cli=False,
    )  # fmt: skip
    preemption_policy: PolicySpec = option(
        "newest", "Which running requests give up their blocks when a request needs more "
        f"than are free: one of {', '.join(POLICIES)}, or (in Python) a function "
        "select_victims(running, blocks_needed); see pagedkv.engine.preemption.",
    )  # fmt: skip
    cuda_graphs: bool = option(
        True, "Capture decode steps as CUDA graphs for fixed batch-size buckets (CUDA only)."
    )
    cpu_kv_bytes: int = option(
        512 * 2**20, "Bytes of KV pool on CPU when num_blocks is None.", low=1
    )
    repeat_cache_bytes: int = option(
        64 * 2**20, "Device bytes kept for zero-compute repeats: the last-position logits "
        "(and partial last block's KV) of recent prompts, so a prompt whose KV is all still "
        "cached is answered without a forward; 0 disables it (so does prefix_caching=False).",
        low=0,
    )  # fmt: skip
    batch_invariant: bool = option(
        False, "Batch-invariant mode: a request's tokens do not depend on what else is in "
        "its batch, on how its prompt is chunked, or on whether its prefix was computed, "
        "cached, loaded from a tier or from a snapshot (every op of the forward and the "
        "sampler in a fixed reduction order; slower). Off: the mode follows "
        "pagedkv.ops.batch_invariant_mode() in the calling thread.",
    )  # fmt: skip
    kv_dtype: str | None = option(
        None, "Store the KV pool compressed: 'fp8' (e4m3), 'fp8_e5m2' or 'int8', one byte per "
        "element plus a float32 scale per block and KV head (about half the bytes of bf16: "
        "a pool sized from memory holds ~2x the tokens).",
        choices=("fp8", "fp8_e5m2", "int8"), none="for the model's dtype",
    )  # fmt: skip
    overlap: bool | None = option(
        None, "Schedule and launch step n+1 while step n runs on the device; step n's "
        "tokens are read after that (one copy per step). None: on for CUDA, off on CPU "
        "(True runs the same pipeline on CPU, for tests).", none="to decide by device",
    )  # fmt: skip
    cascade: bool = option(
        True, "Decode rows sharing cached prefix blocks read them once per group (cascade "
        "attention); off in batch-invariant mode.",
    )  # fmt: skip
    torch_compile: bool = option(
        False, "Compile the decode forward with torch.compile as one graph (norms, RoPE, "
        "MLP fused around the paged attention op; at most 3 graphs, replayed in the CUDA "
        "graphs); prefill stays eager. Compiles in warmup() (else at the first decode "
        "steps): seconds to minutes. A failed compile warns and runs eagerly.",
    )  # fmt: skip
    warmup: bool = option(
        False, "Call Engine.warmup() when the engine is built: compile every kernel and "
        "capture every CUDA graph bucket up front (seconds on CUDA), so no request pays "
        "for them.",
    )  # fmt: skip
    policy: PreemptionPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.init and f.name != "preemption_policy":  # (a name or a function: below)
                object.__setattr__(self, f.name, check_option(f, getattr(self, f.name)))
        # raises for an unknown name or type; the scheduler uses the policy built here
        object.__setattr__(self, "policy", make_preemption_policy(self.preemption_policy))

    def resolve_num_blocks(self, bytes_per_block: int, device: torch.device) -> int:
        """Blocks to allocate: ``num_blocks`` or what the device memory allows."""
        if self.num_blocks is not None:
            return self.num_blocks
        if device.type == "cuda":
            import torch  # here: the CLI reads this module and should not load torch

            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * self.gpu_memory_fraction)
        else:
            budget = self.cpu_kv_bytes
        n = budget // bytes_per_block
        if n < 2:
            raise ValueError(
                f"only {budget} bytes available for KV blocks of {bytes_per_block} bytes; "
                "pass num_blocks= or raise gpu_memory_fraction"
            )
        return int(n)


def option_fields() -> list[Field[Any]]:
    """The config's options (``policy``, derived, excluded), in declaration order."""
    return [f for f in fields(EngineConfig) if f.init]


def option_type(f: Field[Any]) -> tuple[type, bool]:
    """``(type, None allowed)`` of an option; a preemption policy is a ``str`` here (a
    function cannot come from the command line)."""
    if f.name == "preemption_policy":
        return str, False
    hint = _HINTS[f.name]
    args = typing.get_args(hint)
    if type(None) in args:
        (base,) = (a for a in args if a is not type(None))
        return base, True
    return hint, False


def limits_text(f: Field[Any]) -> str:
    """The accepted values of an option as text, e.g. ``>= 1`` or ``in (0, 1]``."""
    m = f.metadata
    if m["choices"]:
        return " or ".join(map(repr, m["choices"]))
    low, high = m["low"], m["high"]
    if low is not None and high is not None:
        return f"in {'(' if m['low_open'] else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if m['low_open'] else '>='} {low:g}"
    return ""


def check_option(f: Field[Any], value: Any) -> Any:
    """``value`` for option ``f``, normalised (a numpy int becomes an int); ``TypeError``
    or ``ValueError`` saying what the option accepts."""
    kind, optional = option_type(f)
    if value is None and optional:
        return None
    name, m = f.name, f.metadata
    accepted = limits_text(f)
    if m["none"]:
        accepted += f" (or None {m['none']})"
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
        if m["choices"] and value not in m["choices"]:
            raise ValueError(f"{name} must be {accepted}, got {value!r}")
        return value
    abstract = numbers.Integral if kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, abstract):
        what = "an int" if kind is int else "a number"
        raise TypeError(f"{name} must be {what} {accepted}, got {type(value).__name__} {value!r}")
    value = kind(value)
    low, high = m["low"], m["high"]
    below = low is not None and (value <= low if m["low_open"] else value < low)
    if below or (high is not None and value > high):
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


def resolve_config(config: EngineConfig | None, overrides: Mapping[str, Any]) -> EngineConfig:
    """``config`` (default: ``EngineConfig()``) with ``overrides`` (field names) applied;
    ``TypeError`` for a config that is not an ``EngineConfig`` or an unknown name."""
    if config is not None and not isinstance(config, EngineConfig):
        raise TypeError(
            f"config must be an EngineConfig (or None), got {type(config).__name__} "
            f"{config!r}; options are keywords: Engine(model, tokenizer, num_blocks=64)"
        )
    known = [f.name for f in option_fields()]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(
            f"unknown engine option(s) {unknown}; the options are EngineConfig's fields: "
            f"{known} (and the keywords tiers, snapshot_store, model_version)"
        )
    if config is None:
        return EngineConfig(**overrides)
    return replace(config, **overrides) if overrides else config


_HINTS = typing.get_type_hints(EngineConfig)
