"""Package layering: the recipes sit below the orchestration (api, schedule, cli), so they never import it."""

import ast
from pathlib import Path

import graphprune

ABOVE_RECIPES = ("graphprune.api", "graphprune.schedule", "graphprune.cli", "graphprune.bench", "graphprune.exporters")


def _module_level_imports(path: Path) -> list[str]:
    """Modules imported outside functions (an import inside a function runs only when it is called)."""
    found, todo = [], list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
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
