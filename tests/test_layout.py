"""Package layering: the recipes sit below the orchestration (api, schedule, cli), so they never import it."""

import ast
from pathlib import Path

import graphprune

ABOVE_RECIPES = ("graphprune.api", "graphprune.schedule", "graphprune.cli", "graphprune.bench", "graphprune.exporters")


def _module_level_imports(path: Path) -> list[str]:
    """Modules imported outside functions and ``if TYPE_CHECKING`` blocks (those run only when called, or never)."""
    found, todo = [], list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":  # not run
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [f"{node.module}.{a.name}" for a in node.names]
        todo += list(ast.iter_child_nodes(node))
    return found


def test_recipes_do_not_import_the_layers_above_them():
    recipes = Path(graphprune.__file__).parent / "recipes"
    bad = [f"{p.name}: {name}" for p in sorted(recipes.glob("*.py")) for name in _module_level_imports(p)
           if name.startswith(ABOVE_RECIPES)]
    assert not bad, bad


def _import_graph(folders_only: bool) -> dict[str, set[str]]:
    """Module-level imports inside graphprune: between its folders (subpackages), or between its modules."""
    root = Path(graphprune.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        for imported in _module_level_imports(path):
            target = next((m for m in (imported, imported.rsplit(".", 1)[0]) if m in modules), None)
            if target is None:
                continue
            src, dst = name, target
            if folders_only:
                if "." not in name or "." not in target:
                    continue
                src, dst = name.split(".")[1], target.split(".")[1]
                if src == dst or not (root / src).is_dir() or not (root / dst).is_dir():
                    continue
            if src != dst:
                edges.setdefault(src, set()).add(dst)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    done, stack = set(), []

    def visit(node):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            found = visit(nxt)
            if found:
                return found
        stack.pop()
        done.add(node)
        return None

    return next((c for c in (visit(n) for n in sorted(edges)) if c), None)


def test_no_import_cycles_between_folders_or_modules():
    """Module-level imports form no cycle, neither between graphprune's folders (kv sits below the exporters, the
    recipe registry below kv) nor between its modules."""
    folders = _import_graph(folders_only=True)
    assert _cycle(folders) is None, " -> ".join(_cycle(folders))
    modules = _import_graph(folders_only=False)
    assert _cycle(modules) is None, " -> ".join(_cycle(modules))
    assert "kv" in folders["exporters"] and "recipes" in folders["kv"]
    assert "kv" not in folders.get("recipes", set()) and "exporters" not in folders.get("kv", set())
