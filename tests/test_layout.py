"""The package's layers stay apart: the library never imports the recipes, and tests import no tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'composer_se'
#: ``python -m composer_se.train`` hands over to the recipe runner and does nothing else.
ENTRY_POINTS = {PACKAGE / 'train.py'}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_nothing_outside_recipes_imports_recipes():
    library = [path for path in PACKAGE.rglob('*.py') if 'recipes' not in path.relative_to(PACKAGE).parts]
    assert len(library) > 15
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                     if name.startswith('composer_se.recipes'))
                 for path in library if path not in ENTRY_POINTS}
    assert {path: names for path, names in offenders.items() if names} == {}
    # ... and the entry point is only a hand-over.
    entry = (PACKAGE / 'train.py').read_text()
    assert imported_modules(PACKAGE / 'train.py') == {'sys', 'composer_se.recipes.train'}
    assert len(entry.splitlines()) < 15


def test_no_test_module_imports_another_test_module():
    tests = list((ROOT / 'tests').rglob('*.py'))
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                     if name.split('.')[-1].startswith('test_'))
                 for path in tests}
    assert {path: names for path, names in offenders.items() if names} == {}
