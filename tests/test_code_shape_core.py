"""The shape of the core packages (manager, storage, the cache facade and shared helpers).

Checked from the source, so a regression shows here before review: no import cycle
(function-level imports count), no file over 400 lines, no private attribute of
another object read or written, no private module of another package imported.
The other packages are held to the same rules as they are reworked (issue 12).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
CORE = [
    "pagedkv/manager",
    "pagedkv/storage",
    "pagedkv/cache.py",
    "pagedkv/_cache_checks.py",
    "pagedkv/_cache_compress.py",
    "pagedkv/_kv_formats.py",
    "pagedkv/_cache_reads.py",
    "pagedkv/_cache_limits.py",
    "pagedkv/_resources.py",
    "pagedkv/_validate.py",
    "pagedkv/_tensor_checks.py",
    "pagedkv/errors.py",
    "pagedkv/__init__.py",
]
MAX_LINES = 400


def _files() -> list[Path]:
    out: list[Path] = []
    for entry in CORE:
        path = SRC / entry
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """pagedkv modules ``path`` imports anywhere (module level or inside functions)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # "from pagedkv.ops import _checks" names a module
                sub = f"{base}.{alias.name}"
                is_module = (SRC / sub.replace(".", "/")).with_suffix(".py").exists()
                found.add(sub if is_module else base)
    return {m for m in found if m == "pagedkv" or m.startswith("pagedkv.")}


def find_cycle(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, trail = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*trail, start]
            if nxt not in seen and nxt in graph:
                seen.add(nxt)
                stack.append((nxt, [*trail, nxt]))
    return None


def test_the_cycle_check_can_fail():
    graph = {"a": {"b"}, "b": {"c", "x"}, "c": {"a"}, "x": set()}
    assert find_cycle(graph, "a") == ["a", "b", "c", "a"] and find_cycle(graph, "x") is None


def test_no_import_cycle_through_a_core_module():
    # An import of a submodule counts as an import of that module only (what it itself
    # imports), not of every package __init__ above it.
    graph = {_module(path): _imports(path) for path in sorted(SRC.rglob("*.py"))}
    core = {_module(p) for p in _files()}
    cycles = [c for m in sorted(core) if (c := find_cycle(graph, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_core_file_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in _files() if (n := len(p.read_text().splitlines()))}
    assert not {p: n for p, n in long.items() if n > MAX_LINES}


_PRIVATE = re.compile(r"\._[a-z]\w*")
_OWNER = re.compile(r"([A-Za-z_][\w.]*|\))$")


def private_reads(code: str) -> list[str]:
    """``x._y`` in a line of code where ``x`` is not ``self`` / ``cls`` (nor the
    ``pagedkv`` package, whose ``_``-modules are its shared helpers)."""
    out = []
    for m in _PRIVATE.finditer(code.split("#", 1)[0]):
        owner = _OWNER.search(code[: m.start()])
        if owner is None or owner.group(1) not in ("self", "cls", "pagedkv"):
            out.append((owner.group(1) if owner else "") + m.group(0))
    return out


def test_the_private_attribute_check_can_fail():
    assert private_reads("n = len(cache._swapped)") == ["cache._swapped"]
    assert private_reads("self._alloc._free.pop()") == ["self._alloc._free"]
    assert private_reads("f()._x") == [")._x"]
    assert private_reads("self._alloc.free.pop()  # m._x") == []
    assert private_reads("from pagedkv._validate import check_int; pagedkv._lazy") == []


def test_no_private_attribute_of_another_object():
    hits = []
    for path in _files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith(("from ", "import ")):
                continue
            hits += [f"{path.relative_to(SRC)}:{n}: {hit}" for hit in private_reads(line)]
    assert not hits, "\n".join(hits)


def test_no_private_module_of_another_package():
    bad = []
    for path in _files():
        own = _module(path).split(".")[1] if "." in _module(path) else ""
        for mod in _imports(path):
            parts = mod.split(".")
            # pagedkv._x are the package-wide shared helpers; pagedkv.<pkg>._x are not.
            if len(parts) >= 3 and parts[2].startswith("_") and parts[1] != own:
                bad.append(f"{path.relative_to(SRC)} imports {mod}")
    assert not bad, "\n".join(bad)
