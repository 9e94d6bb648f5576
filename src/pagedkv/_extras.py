"""Optional dependencies: a missing one is named with the extra that installs it.

pagedkv's core needs torch, numpy, xxhash, rich and typer; everything else comes with an
extra (``pip install "pagedkv[hf]"``). Where an optional package is imported, a missing
one raises :class:`MissingDependencyError` (an ``ImportError``) whose one-line message
names the feature, the package and the ``pip install`` command, instead of the chain of
``ModuleNotFoundError`` frames the import machinery would print::

    mpl = require("matplotlib", feature="benchmark plotting")  # the module, or raises

    with optional_imports(__name__):  # around import statements
        from transformers.cache_utils import Cache
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import import_module
from types import ModuleType
from typing import NamedTuple


class Install(NamedTuple):
    """How an optional module is installed: its distribution and pagedkv's extra."""

    distribution: str
    extra: str


# Top-level module -> how to install it. Kept equal to [project.optional-dependencies]
# in pyproject.toml (tests/test_conventions.py compares them).
OPTIONAL: dict[str, Install] = {
    "transformers": Install("transformers", "hf"),
    "gguf": Install("gguf", "hf"),
    "accelerate": Install("accelerate", "hf"),
    "safetensors": Install("safetensors", "hf"),
    "triton": Install("triton", "triton"),
    "redis": Install("redis", "redis"),
    "matplotlib": Install("matplotlib", "bench"),
    "prometheus_client": Install("prometheus-client", "metrics"),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency of pagedkv is not installed (or too old to have a module).

    A ``ModuleNotFoundError`` (so ``except ImportError`` still catches it) whose ``name``
    is the missing module, with ``feature`` (what needed it), ``distribution`` and
    ``extra`` (``pip install "pagedkv[<extra>]"`` installs it).
    """

    def __init__(self, feature: str, module: str, too_old: bool = False) -> None:
        top = module.partition(".")[0]
        dist, extra = OPTIONAL[top]
        if too_old:
            message = (
                f"{feature} needs a newer {dist} (the installed one has no module {module!r}): "
                f'pip install -U "pagedkv[{extra}]"'
            )
        else:
            message = f'{feature} needs {dist}: pip install "pagedkv[{extra}]"'
        super().__init__(message, name=module)
        self.feature, self.distribution, self.extra, self.too_old = feature, dist, extra, too_old

    def __reduce__(self):  # pickles (multiprocessing) with the constructor's arguments
        return type(self), (self.feature, self.name, self.too_old)


def _installed(top: str) -> bool:
    """Whether the top-level module ``top`` can be imported (without importing it)."""
    if top in sys.modules:
        return sys.modules[top] is not None  # None: import blocked (python -X, tests)
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _missing(error: ImportError, feature: str) -> MissingDependencyError | None:
    """The :class:`MissingDependencyError` that ``error`` means for ``feature``, if any.

    ``None`` when ``error`` is not about one of pagedkv's optional dependencies (a missing
    dependency *of* an installed package, a bug in pagedkv): re-raise it unchanged.
    """
    if isinstance(error, MissingDependencyError):
        return MissingDependencyError(feature, error.name or "", too_old=error.too_old)
    name = error.name or ""
    top = name.partition(".")[0]
    if not isinstance(error, ModuleNotFoundError) or top not in OPTIONAL:
        return None
    if not _installed(top):
        return MissingDependencyError(feature, top)
    if name != top:  # the package is there but lacks this module: an old version
        return MissingDependencyError(feature, name, too_old=True)
    return None


def require(module: str, *, feature: str) -> ModuleType:
    """Import and return ``module`` (one of pagedkv's optional dependencies or a submodule).

    Raises :class:`MissingDependencyError` naming ``feature`` and the extra to install
    when it is missing; other import errors propagate unchanged.
    """
    if module.partition(".")[0] not in OPTIONAL:
        raise ValueError(f"{module!r} is not an optional dependency of pagedkv: {sorted(OPTIONAL)}")
    with optional_imports(feature):
        return import_module(module)


class optional_imports:  # lower case: used like a function, as contextlib's are
    """Around import statements of optional packages: a missing one raises
    :class:`MissingDependencyError` for ``feature``; other errors pass unchanged."""

    def __init__(self, feature: str) -> None:
        self.feature = feature

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        if isinstance(error, ModuleNotFoundError):
            err = _missing(error, self.feature)
            if err is not None:
                raise err from None  # one line for the user, not the import machinery's
