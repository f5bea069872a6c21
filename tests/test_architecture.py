"""The package's shape holds: one-way imports, no cycles, declared dependencies, no dead code,
and a README that tells the truth about what is built (issue 11)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prestaged"

# Lower layers never import upper ones: the vocabulary and the parts below the engine do not
# know about the callers (cli, service) nor the campaign queue built on them.
LOWER = ("prestaged.model", "prestaged.errors", "prestaged.net", "prestaged.storage",
         "prestaged.catalog", "prestaged.state", "prestaged.config", "prestaged.retry",
         "prestaged.credentials", "prestaged.metrics", "prestaged.warm", "prestaged.runner",
         "prestaged.gate", "prestaged.runtime", "prestaged.pins", "prestaged.pacing",
         "prestaged.files")
UPPER = ("prestaged.cli", "prestaged.service", "prestaged.campaign", "prestaged.context",
         "prestaged.demo")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str) -> Iterator[tuple[str, int]]:
    """Every module of ``prestaged`` that ``path`` imports (TYPE_CHECKING and function-local
    imports included), with the line; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    known = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("prestaged"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if not base.startswith("prestaged"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {dep for dep, _ in _imports(path, name) if dep in mods and dep != name}
        # A package's __init__ is imported before any of its modules.
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (empty when there is none), by depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_import_graph_has_no_cycle() -> None:
    """No module of prestaged imports itself back through others, counting TYPE_CHECKING and
    function-local imports (a design circle even when Python would tolerate it)."""
    cycle = _cycle(_graph())
    assert not cycle, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle() -> None:
    """The cycle search itself works: a three-module circle is reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_do_not_import_callers(lower: str) -> None:
    """model, storage, catalog, state and the engine never import cli, service, campaign or
    context: data flows one way."""
    bad = []
    for name, path in _modules().items():
        if name != lower and not name.startswith(lower + "."):
            continue
        for dep, line in _imports(path, name):
            if dep.startswith(UPPER):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {dep}")
    assert not bad, "\n".join(bad)


def test_model_imports_nothing_of_prestaged() -> None:
    """The shared vocabulary stands alone."""
    assert not list(_imports(PACKAGE / "model.py", "prestaged.model"))


def _lazy_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes of ``tree`` that do not run at import time: inside a function,
    or under ``if TYPE_CHECKING:``."""
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scopes: list[ast.AST] = [node]
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            scopes = list(node.body)
        else:
            continue
        lazy |= {id(n) for scope in scopes for n in ast.walk(scope)
                 if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lazy


def _third_party_imports() -> dict[str, tuple[str, bool]]:
    """Top-level third-party module -> (a file that imports it, whether any import of it runs
    at import time), over the whole package."""
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, tuple[str, bool]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "testing" in path.parts:
            continue  # the test kit runs with the test extra
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = _lazy_imports(tree)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and not node.level else [])
            for n in names:
                top = n.split(".")[0]
                if top not in stdlib and top != "prestaged":
                    where, eager = found.get(top, (str(path.relative_to(ROOT)), False))
                    found[top] = (where, eager or id(node) not in lazy)
    return found


def _requirement_names(lines: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", line.strip())[0].lower().replace("_", "-")
            for line in lines}


_STATIC_NEEDS_310 = pytest.mark.skipif(
    sys.version_info < (3, 10),
    reason="reads the source with sys.stdlib_module_names and packages_distributions (3.10+); "
           "it checks the tree, which no interpreter changes")


@_STATIC_NEEDS_310
def test_every_imported_library_is_declared() -> None:
    """Each third-party module the package imports belongs to a distribution listed in
    pyproject.toml's dependencies (yarl was imported but not declared); one imported only
    lazily (in a function, or for type checking) may instead come from an optional extra
    other than ``test`` (psycopg: ``postgresql``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = _requirement_names(project["dependencies"])
    extras = _requirement_names([req for extra, reqs in project["optional-dependencies"].items()
                                 if extra != "test" for req in reqs])
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, (where, eager) in sorted(_third_party_imports().items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & (declared if eager else declared | extras):
            missing.append(f"{module} (imported in {where}; distribution {sorted(names)})")
    assert not missing, "undeclared: " + ", ".join(missing)


@_STATIC_NEEDS_310
def test_optional_driver_is_imported_only_lazily() -> None:
    """psycopg, from the optional ``postgresql`` extra, is imported only where it is used, never
    when a module of the package is imported (the check above would otherwise demand it as a
    dependency of every install)."""
    found = _third_party_imports()
    assert "psycopg" in found
    assert not found["psycopg"][1], found["psycopg"]


def test_no_dead_code() -> None:
    """vulture finds nothing defined and never used in the package (tests and benchmarks count
    as users; tests/vulture_whitelist.py names what frameworks call)."""
    res = subprocess.run([sys.executable, "-m", "vulture", "prestaged", "tests", "bench",
                          "tests/vulture_whitelist.py", "--min-confidence", "60"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    ours = [ln for ln in res.stdout.splitlines() if ln.startswith("prestaged/")]
    assert not ours, "\n".join(ours)


def test_readme_documents_every_command_and_promises_nothing_built() -> None:
    """Every subcommand appears in README as `prestaged NAME`, and README does not announce as
    future work a command that exists (it said submit/wait "comes next" after they were built)."""
    from prestaged.cli import build_parser

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = sorted(sub.choices)  # type: ignore[arg-type]
    assert not [c for c in commands if f"prestaged {c}" not in readme]
    for sentence in re.split(r"(?<=[.!?])\s+", readme.replace("\n", " ")):
        if re.search(r"comes next|tracked as an issue|not yet built|coming soon", sentence):
            named = [c for c in commands if f"prestaged {c}" in sentence]
            assert not named, f"README promises built commands {named}: {sentence!r}"


# The wiring and its callers: types here say what flows (defect 7: `_run(coro: Any) -> int`
# returned other types, `GateFn = Callable[..., Any]`, `open_catalog(...) -> Any`).
TYPED = ("prestaged/cli", "prestaged/context.py", "prestaged/runtime.py", "prestaged/gate.py",
         "prestaged/runner.py", "prestaged/campaign", "prestaged/service")


def _bare_any(path: Path) -> list[str]:
    """Parameters and return values annotated plainly ``Any`` (not inside ``dict[str, Any]``
    or another subscript: JSON documents are Any by nature)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        annotated = [(a.arg, a.annotation) for a in args] + [("return", node.returns)]
        for name, ann in annotated:
            bare = (ann.id if isinstance(ann, ast.Name) else
                    ann.value if isinstance(ann, ast.Constant) else None)
            if bare == "Any":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {name}")
    return found


def test_no_bare_any_on_the_wiring_paths() -> None:
    """Command handlers, the context, the gate and the service take and return real types
    (Catalog, GateResult, RunReport...), never a bare Any."""
    paths = [p for t in TYPED for p in ((ROOT / t).rglob("*.py") if (ROOT / t).is_dir()
                                         else [ROOT / t])]
    found = [hit for p in paths for hit in _bare_any(p)]
    assert not found, "\n".join(found)
