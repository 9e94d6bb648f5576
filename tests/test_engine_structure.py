"""The shape of the engine's code: imports go one way, files hold one concept, and no
module reads or writes another module's private attributes.

Scoped to the packages of the engine side (``pagedkv.engine``, ``pagedkv.cli``,
``pagedkv.ops._config``): imports are read from the source (function-level and
``TYPE_CHECKING`` imports count, as they mean the split is in the wrong place).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pagedkv

SRC = Path(pagedkv.__file__).parent
OWN = ("pagedkv.engine", "pagedkv.cli", "pagedkv.ops._config")
ACYCLIC = OWN
MAX_LINES = 400

# Private names reached across a module boundary, each with the reason it is allowed.
# (module, "imported.module" or "object._attribute"): reason
ALLOWED = {
    ("pagedkv.engine", "pagedkv._lazy"): "the package's PEP 562 loader, shared by every "
    "package __init__ of pagedkv (private to pagedkv, not to one module)",
    ("pagedkv.engine.model_loader", "pagedkv._extras"): "optional-dependency guards "
    "(`optional_imports`), pagedkv's one mechanism for missing extras",
    ("pagedkv.engine.model_loader", "pagedkv._resources"): "device resolution with the "
    "library's ResourceError, shared with KVCache",
    ("pagedkv.cli", "pagedkv._extras"): "the CLI prints MissingDependencyError as one line",
    ("pagedkv.engine.repeats", "pagedkv.stores._lru"): "ByteLRU, the library's one "
    "least-recently-used index under a byte cap (one mechanism, one place)",
    ("pagedkv.engine.engine", "pagedkv._closing"): "Closing, the one `with` (close on exit) "
    "of every pagedkv object that holds resources",
    ("pagedkv.engine.migration", "pagedkv._closing"): "Closing, as for the Engine",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[str]:
    """pagedkv modules ``name`` imports anywhere in its source (``from a import b``
    counts as ``a.b`` when that is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append(sub if sub in MODULES else base)
    return [m for m in found if m in MODULES and m != name]


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: _imports(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def _own(name: str, packages: tuple[str, ...] = OWN) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_no_import_cycle_through_the_engine():
    cycles = [c for c in _cycles() if any(_own(m, ACYCLIC) for m in c)]
    assert cycles == [], f"import cycles (function-level and TYPE_CHECKING imports count): {cycles}"


def test_the_cycle_finder_sees_function_level_and_type_checking_imports(monkeypatch):
    real = _imports
    extra = {"pagedkv.engine.host": ["pagedkv.engine.model_runner"]}
    monkeypatch.setitem(globals(), "_imports", lambda m: real(m) + extra.get(m, []))
    assert any("pagedkv.engine.host" in c for c in _cycles())
    # what the parser reads: an import inside a function and under TYPE_CHECKING
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pagedkv.cache\n"
    src += "def f():\n    from pagedkv.engine import sessions\n"
    path = MODULES["pagedkv.engine.host"]
    monkeypatch.setattr(Path, "read_text", lambda self: src if self == path else "")
    assert sorted(real("pagedkv.engine.host")) == ["pagedkv.cache", "pagedkv.engine.sessions"]


def test_engine_files_hold_one_concept_each():
    long = {
        m: n
        for m, p in MODULES.items()
        if _own(m) and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"files over {MAX_LINES} lines: {long}"


def _private_uses(name: str) -> list[tuple[int, str]]:
    """Private names of other modules that ``name`` uses: imports of ``_private``
    modules or names, and ``x._attr`` where ``x`` is not ``self``/``cls`` (or is
    ``self`` but ``_attr`` is defined nowhere in this module: a base class elsewhere)."""
    tree = ast.parse(MODULES[name].read_text())
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    private = lambda s: s.startswith("_") and not s.startswith("__")  # noqa: E731
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if any(private(p) for p in node.module.split(".")):
                uses.append((node.lineno, node.module))
            else:
                uses += [
                    (node.lineno, f"{node.module}.{a.name}") for a in node.names if private(a.name)
                ]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if any(private(p) for p in a.name.split(".")):
                    uses.append((node.lineno, a.name))
        elif isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value
            is_self = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
            if not is_self or node.attr not in defined:
                uses.append((node.lineno, f"{ast.unparse(owner)}.{node.attr}"))
    return uses


def test_no_private_attribute_of_another_module_is_used():
    found = {}
    for m in MODULES:
        if _own(m):
            for line, what in _private_uses(m):
                if (m, what) not in ALLOWED:
                    found[f"{MODULES[m].relative_to(SRC.parent)}:{line}"] = what
    assert found == {}, (
        f"private names used across modules (or add to ALLOWED with a reason): {found}"
    )


def test_the_private_use_finder_fires(monkeypatch):
    src = "from pagedkv.ops._config import resolve\nclass A:\n    def f(self, g):\n"
    src += "        self._mine = 1\n        g._tables_key = None\n        return self._theirs\n"
    path = MODULES["pagedkv.engine.host"]
    monkeypatch.setattr(Path, "read_text", lambda self: src if self == path else "")
    assert [w for _, w in _private_uses("pagedkv.engine.host")] == [
        "pagedkv.ops._config",
        "g._tables_key",
        "self._theirs",
    ]
