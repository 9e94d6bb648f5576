"""What a Python user expects of an installed package: a version, ``python -m pagedkv``,
the type-checker marker in the wheel, and a missing optional dependency named with the
extra that installs it (not a traceback through the import machinery)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pagedkv
from pagedkv._extras import OPTIONAL, MissingDependencyError, optional_imports, require

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "pagedkv"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


# -- version, python -m, py.typed ------------------------------------------------------


def test_version_is_the_installed_distribution_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", pagedkv.__version__)
    assert importlib.metadata.version("pagedkv") == pagedkv.__version__


def test_python_m_pagedkv_runs_the_cli():
    helped = run_python("", "-m", "pagedkv", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: python -m pagedkv" in helped.stdout
    for command in ("demo", "generate", "manager-demo", "snapshot"):
        assert command in helped.stdout
    version = run_python("", "-m", "pagedkv", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"pagedkv {pagedkv.__version__}"


def test_the_wheel_ships_py_typed_and_the_version(tmp_path):
    """Build the wheel offline from a copy of the sources (the checkout stays untouched)."""
    assert (SRC / "py.typed").is_file()
    proj = tmp_path / "proj"
    shutil.copytree(SRC, proj / "src" / "pagedkv", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, proj / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--no-index", "-q", str(proj), "-w", str(tmp_path / "dist")]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("pagedkv-*.whl")
    assert wheel.name.startswith(f"pagedkv-{pagedkv.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pagedkv/py.typed" in names  # PEP 561: mypy reads pagedkv's own annotations
    assert "pagedkv/__main__.py" in names and "pagedkv/_extras.py" in names


# -- missing optional dependencies -----------------------------------------------------

# Each way a test can make a package missing, in one interpreter (an import that failed
# leaves nothing behind, so the cases do not see each other): None in sys.modules, and a
# meta-path finder that finds nothing, as after `pip uninstall`. The last import is not
# caught: its traceback is what a user sees.
MISSING = """
import json, sys
from pagedkv._extras import MissingDependencyError

class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "transformers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

def message(statement):
    try:
        exec(statement, {})
    except MissingDependencyError as e:
        return str(e)
    return "no error"

seen = {}
sys.modules["triton"] = None
seen["triton"] = message("import pagedkv.ops.triton_decode")
sys.modules["transformers"] = None
seen["PagedCache"] = message("import pagedkv; pagedkv.PagedCache")
del sys.modules["transformers"]
sys.meta_path.insert(0, Uninstalled())
seen["engine"] = message("from pagedkv.engine import Engine")  # needs no transformers to import
seen["load"] = message("from pagedkv.engine.model_loader import load_model; load_model('.')")
print(json.dumps(seen))
from pagedkv import PagedCache
"""


def test_a_missing_extra_is_one_clear_line():
    done = run_python(MISSING)
    assert json.loads(done.stdout) == {
        "triton": 'pagedkv.ops.triton_decode needs triton: pip install "pagedkv[triton]"',
        "PagedCache": 'pagedkv.PagedCache needs transformers: pip install "pagedkv[hf]"',
        "engine": "no error",
        "load": 'loading a model needs transformers: pip install "pagedkv[hf]"',
    }
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (
        "pagedkv._extras.MissingDependencyError: "
        'pagedkv.PagedCache needs transformers: pip install "pagedkv[hf]"'
    )
    # the user's frame and ours, not the import machinery's chain of frames
    assert "During handling" not in done.stderr and "direct cause" not in done.stderr
    assert len(lines) < 10, done.stderr


def test_the_cli_prints_the_missing_extra_in_one_line():
    code = "import sys\nsys.modules['transformers'] = None\nsys.argv = ['pagedkv', 'demo']\n"
    code += "from pagedkv.cli import main\nmain()"
    done = run_python(code)
    assert done.returncode == 1
    out = " ".join((done.stdout + done.stderr).split())
    assert out == 'error: loading a model needs transformers: pip install "pagedkv[hf]"'


def test_the_light_imports_need_no_extra():
    blocked = "import sys\n" + "".join(f"sys.modules[{top!r}] = None\n" for top in OPTIONAL)
    done = run_python(blocked + "import pagedkv\nfrom pagedkv import BlockManager, KVCache\n"
                      "KVCache\nimport pagedkv.cli\nprint('ok')")  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_require_names_the_feature_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError) as exc:
        require("matplotlib", feature="benchmark plotting")
    err = exc.value
    assert str(err) == 'benchmark plotting needs matplotlib: pip install "pagedkv[bench]"'
    assert isinstance(err, ModuleNotFoundError) and isinstance(err, ImportError)
    assert (err.name, err.distribution, err.extra, err.too_old) == (
        "matplotlib", "matplotlib", "bench", False)  # fmt: skip
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries intact
    assert type(again) is MissingDependencyError and str(again) == str(err)


def test_distribution_names_differ_from_module_names(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(
        MissingDependencyError, match=r'needs prometheus-client: pip install "pagedkv\[metrics\]"'
    ):  # noqa: E501
        require("prometheus_client", feature="metrics")


def test_an_installed_but_too_old_package_is_told_apart():
    with pytest.raises(MissingDependencyError) as exc:
        require("transformers.no_such_module", feature="pagedkv.PagedCache")
    assert exc.value.too_old
    assert str(exc.value) == (
        "pagedkv.PagedCache needs a newer transformers (the installed one has no module "
        "'transformers.no_such_module'): pip install -U \"pagedkv[hf]\""
    )


def test_other_import_errors_pass_unchanged():
    # a missing dependency *of* an installed package, or a bug, is not ours to rename
    with pytest.raises(ModuleNotFoundError) as exc, optional_imports("feature"):
        raise ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers")
    assert type(exc.value) is ModuleNotFoundError and exc.value.name == "tokenizers"
    with pytest.raises(ImportError) as exc, optional_imports("feature"):
        raise ImportError("cannot import name 'X' from 'transformers'", name="transformers")
    assert type(exc.value) is ImportError
    with pytest.raises(ValueError, match="not an optional dependency"):
        require("numpy", feature="x")


def test_the_extras_table_matches_the_package_metadata():
    declared: dict[str, set[str]] = {}
    for req in importlib.metadata.requires("pagedkv") or []:
        m = re.search(r'extra == "([\w-]+)"', req)
        if m:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
            declared.setdefault(m.group(1), set()).add(re.sub(r"[-_.]+", "-", name).lower())
    table: dict[str, set[str]] = {}
    for dist, extra in OPTIONAL.values():
        table.setdefault(extra, set()).add(dist)
    for extra, dists in table.items():
        assert declared.get(extra) == dists, f"extra {extra!r}: pyproject {declared.get(extra)}"


def _unguarded_optional_imports(tree: ast.Module) -> list[int]:
    """Line numbers of module-level imports of optional packages outside
    ``with optional_imports(...)`` (imports inside functions run on use, and are fine)."""
    bad = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            tops = [a.name.partition(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = [node.module.partition(".")[0]]
        else:
            continue
        if any(t in OPTIONAL for t in tops):
            bad.append(node.lineno)
    return bad


def test_every_module_level_optional_import_is_guarded():
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        lines = _unguarded_optional_imports(ast.parse(path.read_text(), str(path)))
        if lines:
            offenders[str(path.relative_to(ROOT))] = lines
    assert not offenders, f"wrap these in `with optional_imports(__name__):` {offenders}"
    # the checker itself fires on the case it guards against
    assert _unguarded_optional_imports(ast.parse("import os\nimport redis\n")) == [2]
    assert _unguarded_optional_imports(ast.parse("from triton import jit\n")) == [1]
