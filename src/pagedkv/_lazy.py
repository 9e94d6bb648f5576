"""Module attributes imported on first use (PEP 562), so light imports stay light."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from pagedkv._extras import optional_imports


def lazy_getattr(namespace: dict[str, Any], lazy: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``lazy[name]`` (a module path) on first use.

    ``namespace`` is the module's ``globals()``; a loaded name is cached there, so the
    import happens once. When the module needs an optional dependency that is not
    installed, raises :class:`pagedkv._extras.MissingDependencyError` naming the
    attribute and the extra to install (``pagedkv.Engine needs transformers: pip
    install "pagedkv[hf]"``).
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        with optional_imports(f"{package}.{name}"):
            value = getattr(import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
