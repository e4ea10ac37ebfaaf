"""The package's structure: the dependency arrows of DESIGN.md, process groups only from
the runtime, test support outside the library, private names kept private, no import
cycles between modules or packages, and small modules.

Every import in ``phoenix/`` is read from the source (top-level and inside functions),
so a lazy import cannot sneak past the rules.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "phoenix"

# Which phoenix packages each package may import (DESIGN.md, "Dependencies"). ``io`` is a
# small shared utility (atomic writes) allowed everywhere but in config.
ALLOWED = {
    "config": set(),
    "runtime": {"config", "io"},
    "tokenizer": {"config", "io"},
    "model": {"config", "runtime", "io"},
    "data": {"config", "tokenizer", "runtime", "io"},
    "optim": {"config", "runtime", "model", "io"},
    "monitor": {"config", "runtime", "io"},
    "eval": {"config", "runtime", "data", "tokenizer", "model", "checkpoint", "monitor", "io"},
    "checkpoint": {"config", "runtime", "model", "optim", "tokenizer", "io"},
    "train": {"config", "runtime", "tokenizer", "model", "data", "optim", "monitor", "eval",
              "checkpoint", "io"},
    "convert": {"config", "runtime", "model", "checkpoint", "tokenizer", "io"},
}
# The command line and the test support may import anything but each other's
# direction: nothing imports testing, the command line included.
UNRESTRICTED = {"cli", "testing"}
MAX_LINES = 500


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield path, (rel.parts[0] if len(rel.parts) > 1 else rel.stem)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, absolute names only."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _violations():
    found = []
    for path, package in _modules():
        where = path.relative_to(PACKAGE.parent)
        for line, name in _imports(path):
            if name.startswith("megatron.core.parallel_state") and package != "runtime":
                found.append(f"{where}:{line}: imports megatron's parallel_state (only "
                             f"phoenix/runtime may; take the groups from ParallelLayout)")
            parts = name.split(".")
            if parts[0] != "phoenix" or len(parts) < 2:
                continue
            target = parts[1]
            if target == "testing" and package != "testing":
                found.append(f"{where}:{line}: imports phoenix.testing (test support)")
                continue
            if package in UNRESTRICTED or target == package:
                continue
            if package not in ALLOWED:
                found.append(f"{where}:{line}: module '{package}' has no place in DESIGN.md")
            elif target not in ALLOWED[package] and target in set(ALLOWED) | {"cli", "io"}:
                found.append(f"{where}:{line}: {package} may not import phoenix.{target}")
    return sorted(set(found))


def test_imports_follow_the_dependency_table():
    assert not _violations(), "\n".join(_violations())


# A private name (one leading underscore) belongs to the module that defines it, a private
# module (``_plan_cpp``) to its package: no other module imports it. The imports still to
# fix, as (file, imported name); an entry that is no longer needed fails the test too.
PRIVATE_IMPORT_EXEMPTIONS: set[tuple[str, str]] = set()


def _is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _private_imports() -> list[tuple[str, int, str]]:
    """(file, line, dotted name) of every private name a module imports from outside its
    owner: the module or package the name's first private part belongs to."""
    found = []
    for path, _ in _modules():
        where = path.relative_to(PACKAGE.parent)
        importer = ".".join(where.with_suffix("").parts).removesuffix(".__init__")
        for line, name in _imports(path):
            parts = name.split(".")
            first = next((i for i, part in enumerate(parts) if _is_private(part)), None)
            if parts[0] != "phoenix" or first is None:
                continue
            owner = ".".join(parts[:first])
            if importer != owner and not importer.startswith(owner + "."):
                found.append((where.as_posix(), line, name))
    return found


def test_no_private_name_is_imported_from_another_module():
    found = _private_imports()
    new = [f"{f}:{line}: imports {name}, private to {name.rsplit('.', 1)[0]} (make it public "
           f"or move the code that needs it)" for f, line, name in found
           if (f, name) not in PRIVATE_IMPORT_EXEMPTIONS]
    stale = PRIVATE_IMPORT_EXEMPTIONS - {(f, name) for f, _, name in found}
    assert not new, "\n".join(new)
    assert not stale, f"no longer imported, remove from PRIVATE_IMPORT_EXEMPTIONS: {sorted(stale)}"


@pytest.mark.parametrize("package,source,flagged", [
    ("data", "from phoenix.data.plan_checks import _check_dataset\n", True),
    ("data", "from phoenix.data import _plan_cpp\n", False),
    ("monitor", "import phoenix.data._plan_cpp\n", True),
    ("data", "from phoenix.data.planted import _mine\n", False),
    ("data", "from phoenix.data.plan import __all__\n", False),
])
def test_the_walker_catches_a_private_import(tmp_path, monkeypatch, package, source, flagged):
    """A private name planted in a copy of a module is found; a module's own private
    names, its package's private modules and dunder names are not flagged."""
    fake = tmp_path / "phoenix"
    (fake / package).mkdir(parents=True)
    (fake / package / "planted.py").write_text("def f():\n    " + source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert bool(_private_imports()) == flagged, _private_imports()


def test_no_module_over_the_size_limit():
    big = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p, _ in _modules()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, big


@pytest.mark.parametrize("source,expected", [
    ("from phoenix.train.trainer import Trainer\n", "monitor may not import phoenix.train"),
    ("from megatron.core import parallel_state as ps\n", "parallel_state"),
    ("import phoenix.testing.tiny\n", "imports phoenix.testing"),
])
def test_the_walker_catches_a_forbidden_import(tmp_path, monkeypatch, source, expected):
    """The rules can fail: a forbidden import planted in a copy of a monitor module is found."""
    fake = tmp_path / "phoenix"
    (fake / "monitor").mkdir(parents=True)
    (fake / "monitor" / "planted.py").write_text("def f():\n    " + source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert any(expected in v for v in _violations()), _violations()


# -- import cycles ----------------------------------------------------------------------------
def _runtime_imports(path: Path) -> list[str]:
    """Dotted names imported by ``path`` when it runs (``if TYPE_CHECKING:`` blocks, which
    only type checkers read, left out)."""
    out = []

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out.extend(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def _module_graph() -> dict[str, set[str]]:
    """phoenix module -> the phoenix modules it imports (a package's ``__init__`` is the
    package's name)."""
    names = {}
    for path, _ in _modules():
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        names[name] = path
    graph = {name: set() for name in names}
    for name, path in names.items():
        for imported in _runtime_imports(path):
            parts = imported.split(".")
            for k in range(len(parts), 1, -1):  # the longest prefix that is a module
                target = ".".join(parts[:k])
                if target in names:
                    if target != name and not name.startswith(target + "."):
                        graph[name].add(target)
                    break
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    package = lambda name: name.split(".")[1] if name.count(".") else name  # noqa: E731
    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        for target in targets:
            if package(target) != package(name):
                out.setdefault(package(name), set()).add(package(target))
    return out


def test_no_import_cycles_between_modules_or_packages():
    graph = _module_graph()
    assert not _cycles(graph), _cycles(graph)
    assert not _cycles(_package_graph(graph)), _cycles(_package_graph(graph))


def test_the_cycle_finder_finds_a_planted_loop(tmp_path, monkeypatch):
    fake = tmp_path / "phoenix"
    (fake / "cli").mkdir(parents=True)
    (fake / "testing").mkdir()
    (fake / "cli" / "a.py").write_text("def f():\n    from phoenix.testing.b import g\n")
    (fake / "testing" / "b.py").write_text("from phoenix.cli.a import f\n")
    (fake / "testing" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from phoenix.cli.a import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = _module_graph()
    assert _cycles(graph) == [["phoenix.cli.a", "phoenix.testing.b"]]
    assert _cycles(_package_graph(graph)) == [["cli", "testing"]]
