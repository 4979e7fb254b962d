"""Layers import one way. Read as text (ast): nothing is imported to check it.

loader < serving.config, serving.logsetup < serving.codecs < serving.runtime < serving.http
< serving.app < serving.cli. A module may import its own layer and the ones below; no cycles
anywhere; ``loader`` never imports aiohttp or serving; ``codecs`` knows no aiohttp at all and
``runtime`` no ``aiohttp.web``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("loader",),
    ("serving.config", "serving.logsetup"),
    ("serving.codecs",),
    ("serving.runtime",),
    ("serving.http", "serving.grpc"),
    ("serving.app",),
    ("serving.cli", "serving.__main__"),
]
#: Third-party imports a layer must not make (prefix match on the module name).
BANNED = {
    "loader": ("aiohttp", "serving"),
    "serving.codecs": ("aiohttp",),
    "serving.runtime": ("aiohttp",),
    "serving.codecs.grpc": ("grpc",),
    "serving.grpc": ("aiohttp",),
}


def modules() -> dict[str, Path]:
    found = {}
    for package in ("loader", "serving"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports, resolved (relative imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        for target in imports(name, path):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    if module == "serving":
        return 1  # the package's own (empty) __init__
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(internal_graph()) == []


def test_every_import_runs_down_the_layers():
    upward = [
        f"{module} -> {target}"
        for module, targets in internal_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_nothing_imports_the_composition_root_but_the_command_line():
    importers = [m for m, targets in internal_graph().items() if "serving.app" in targets]
    assert all(m.startswith("serving.cli") for m in importers), importers


@pytest.mark.parametrize("layer", sorted(BANNED))
def test_banned_imports(layer):
    found = [
        f"{name} imports {target}"
        for name, path in modules().items()
        if name == layer or name.startswith(layer + ".")
        for target in imports(name, path)
        if any(target == b or target.startswith(b + ".") for b in BANNED[layer])
    ]
    assert found == []


def test_the_checks_catch_what_they_forbid():
    """The checks above can fail: a cycle and an upward edge are seen."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer_of("serving.http.mlflow") > layer_of("serving.runtime.dataplane")
    assert layer_of("serving.codecs.oip") < layer_of("serving.runtime.batching")


def test_loader_imports_neither_aiohttp_nor_serving():
    code = (
        "import sys, loader; loader.load_model; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'serving')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_loader_leaves_the_environment_alone():
    """The library never reads or writes os.environ (the daemon owns its environment)."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "loader").rglob("*.py")
        if "os.environ" in path.read_text(encoding="utf-8")
        or "os.getenv" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


@pytest.mark.slow
def test_scipy_special_is_imported_ahead_of_mlflow(tmp_path):
    """skops scans sys.modules in import order for each ufunc: scipy.special must come before
    MLflow's modules (loader.pyfunc.import_ahead_of_mlflow), else a first skops load pays
    ~0.5 s more."""
    code = (
        "import sys; from loader.api import make_source; "
        f"make_source(cache_dir={str(tmp_path)!r}, tracking_uri='sqlite:///:memory:'); "
        "order = list(sys.modules); "
        "print(*(order.index(m) if m in order else -1 for m in ('scipy.special', 'mlflow')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    special, mlflow = map(int, proc.stdout.split())
    assert 0 <= special < mlflow


def test_readme_names_every_module_in_the_tree():
    """README's 'Where each layer lives' lists every module of loader/ and serving/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Where each layer lives", 1)[1].split("```")[1]
    missing = [
        name
        for name, path in modules().items()
        if path.name != "__init__.py"
        and name not in ("serving.__main__",)
        and path.stem not in block
    ]
    assert missing == []
