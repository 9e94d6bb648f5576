"""The shape of all of ``src/pagedkv`` (issue 12), checked from the source.

tests/test_code_shape_core.py holds the core packages to these rules and carries the
checkers (with tests that they can fail); this file applies them to every module: no
import cycle (function-level and type-only imports count), no file over 400 lines, and
no private attribute of another object read or written, except the entries of
``ALLOWED`` — each says why it is not a reach into another module's state.
"""

from __future__ import annotations

from test_code_shape_core import MAX_LINES, SRC, _imports, _module, find_cycle, private_reads

FILES = sorted(SRC.rglob("*.py"))

#: (file, private name) -> why it is allowed
ALLOWED = {
    ("pagedkv/integrations/attention_switch.py", "cfg._attn_implementation_internal"): (
        "transformers' config field; its public setter also rewrites sub-configs, which are "
        "switched as configs of their own"
    ),
    ("pagedkv/integrations/cache.py", "twin._setup"): (
        "PagedCache.__deepcopy__ setting up a new instance of its own class"
    ),
    ("pagedkv/ops/_launch.py", "torch._C._cuda_getCurrentRawStream"): (
        "the raw stream handle of the eager hot path; the public call builds a Stream object"
    ),
    ("pagedkv/stores/redis.py", "parts._replace"): "NamedTuple's public _replace",
}
_FRIEND = "PagedKVCollector's registry, used by Registration / register() in the same module"
_DOC_LINK = "a Sphinx link to a private module in a docstring, not an attribute read"
ALLOWED |= {
    ("pagedkv/metrics/collector.py", hit): _FRIEND
    for hit in ("self._collector._remove", "self._collector._live", "collector._add",
                "collector._live", "._live")
}  # fmt: skip
ALLOWED |= {
    ("pagedkv/stores/disk.py", "pagedkv.stores._lru"): _DOC_LINK,
    ("pagedkv/stores/disk_layout.py", "pagedkv.stores._files"): _DOC_LINK,
    ("pagedkv/stores/memory.py", "pagedkv.stores._lru"): _DOC_LINK,
}


def test_no_import_cycle_anywhere():
    graph = {_module(p): _imports(p) for p in FILES}
    cycles = [c for m in sorted(graph) if (c := find_cycle(graph, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_file_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in FILES if (n := len(p.read_text().splitlines()))}
    assert not {p: n for p, n in long.items() if n > MAX_LINES}


def test_no_private_attribute_of_another_object_outside_the_allow_list():
    hits, used = [], set()
    for path in FILES:
        rel = str(path.relative_to(SRC))
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith(("from ", "import ")):
                continue
            for hit in private_reads(line):
                if (rel, hit) in ALLOWED:
                    used.add((rel, hit))
                else:
                    hits.append(f"{rel}:{n}: {hit}")
    assert not hits, "\n".join(hits)
    assert used == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - used}"
