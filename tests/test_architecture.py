"""The import rules of docs/architecture.md hold, the package has no import cycle, no library code imports
tests, benchmarks or the demo, and functions stay short enough to read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jointnet_jax"
DOC = ROOT / "docs" / "architecture.md"


def _unit(module: str) -> str:
    """The layer unit of a module: its first component under ``jointnet_jax`` (a package or a module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "jointnet_jax"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module this file imports (at module level or inside functions), absolute names."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from jointnet_jax import io_utils`` imports the submodule jointnet_jax.io_utils
            submodules = {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module (or package) itself
                found.add(node.module)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if m.split(".")[0] in ("jointnet_jax", "tests", "benchmarks")}
    return graph


def _rules() -> dict[str, set[str]]:
    """The table of docs/architecture.md: ``| unit | may import |`` rows."""
    rules = {}
    for line in DOC.read_text().splitlines():
        m = re.fullmatch(r"\|\s*`(\w+)`\s*\|\s*([^|]*)\|.*", line.strip())
        if m:
            rules[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return rules


def test_every_unit_is_in_the_table_and_imports_only_what_it_may():
    rules, graph = _rules(), _graph()
    units = {_unit(name) for name in graph if name != "jointnet_jax"}
    assert units <= set(rules), f"units missing from docs/architecture.md: {sorted(units - set(rules))}"
    broken = []
    for name, imported in graph.items():
        unit = _unit(name)
        for target in imported:
            if target.split(".")[0] != "jointnet_jax":
                broken.append(f"{name} imports {target} (tests and benchmarks are never imported)")
                continue
            other = _unit(target)
            if other != unit and other not in rules.get(unit, set()):
                broken.append(f"{name} ({unit}) imports {target} ({other})")
    assert not broken, "\n".join(sorted(broken))


def test_the_rules_themselves_have_no_cycle():
    rules = _rules()
    seen, done = set(), set()

    def visit(unit, path):
        assert unit not in seen - done, f"cycle in docs/architecture.md: {' -> '.join([*path, unit])}"
        if unit in done:
            return
        seen.add(unit)
        for dep in rules.get(unit, ()):
            visit(dep, [*path, unit])
        done.add(unit)

    for unit in rules:
        visit(unit, [])


def test_no_import_cycle_between_modules():
    """Module-level imports only (imports inside functions run after loading and cannot deadlock it)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jointnet_jax"):
                submodules = {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
                deps |= submodules if len(submodules) == len(node.names) else submodules | {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("jointnet_jax")}
        graph[_module_name(path)] = deps
    state = {}

    def visit(name, path):
        if state.get(name) == "active":
            raise AssertionError(f"import cycle: {' -> '.join([*path, name])}")
        if state.get(name) == "done":
            return
        state[name] = "active"
        for dep in graph.get(name, ()):
            if dep != name and not name.startswith(dep + "."):  # a package's __init__ is loaded first anyway
                visit(dep, [*path, name])
        state[name] = "done"

    for name in graph:
        visit(name, [])


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        yield path, f"{node.name}.{item.name}", item
            elif isinstance(node, ast.FunctionDef):
                yield path, node.name, node


def test_functions_are_short():
    """No function over 80 lines, and the two that once held everything, ``Pipeline.run`` and
    ``Trainer.__init__``, under 60."""
    lengths = {(p.relative_to(ROOT), name): f.end_lineno - f.lineno + 1 for p, name, f in _functions()}
    long = {k: n for k, n in lengths.items() if n > 80}
    assert not long, long
    by_name = {name: n for (_, name), n in lengths.items()}
    assert by_name["Pipeline.run"] < 60 and by_name["Trainer.__init__"] < 60, (
        by_name["Pipeline.run"],
        by_name["Trainer.__init__"],
    )
