"""Across the package, its shape: the library never imports the recipes, the import graph has no cycle and does not
deepen, Composer's inside is known in one place, the torch-only modules import no Composer, and the tests mirror the
package; tests import no tests."""

from __future__ import annotations

import ast
import subprocess
import sys
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
    assert imported_modules(PACKAGE / 'train.py') == {'sys', 'composer_se.recipes.run'}
    assert len(entry.splitlines()) < 15


def test_no_test_module_imports_another_test_module():
    tests = list((ROOT / 'tests').rglob('*.py'))
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path)
                                                     if name.split('.')[-1].startswith('test_'))
                 for path in tests}
    assert {path: names for path, names in offenders.items() if names} == {}


# --- the import graph of the package and the benchmarks ---------------------------------------------------------

def _module_files() -> dict[str, Path]:
    """Dotted name -> file, for the package's modules and the benchmarks (``benchmarks.accuracy``, ...)."""
    files = {}
    for path in [*PACKAGE.rglob('*.py'), *(ROOT / 'benchmarks').glob('*.py')]:
        parts = path.relative_to(ROOT).with_suffix('').parts
        files['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return files


def _lazy_homes() -> dict[str, str]:
    """``composer_se.__init__``'s public name -> the module that defines it (it loads them on first use)."""
    tree = ast.parse((PACKAGE / '__init__.py').read_text())
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(getattr(target, 'id', None) == '_HOMES' for target in targets):
            return ast.literal_eval(node.value)
    raise AssertionError('composer_se/__init__.py has no _HOMES')


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package and benchmarks it imports, at import time or inside a function."""
    files, homes = _module_files(), _lazy_homes()

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition('.')[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                module = node.module if node.module in files or '.' in node.module else f'benchmarks.{node.module}'
                for alias in node.names:
                    if f'{module}.{alias.name}' in files:
                        targets.add(f'{module}.{alias.name}')
                    elif module == 'composer_se' and alias.name in homes:
                        targets.add(homes[alias.name])
                    else:
                        targets.add(known(module))
        graph[name] = {target for target in targets if target and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a list of modules, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def _depth(graph: dict[str, set[str]]) -> tuple[int, list[str]]:
    """The longest chain of imports (in modules) and one such chain."""
    memo: dict[str, list[str]] = {}

    def longest(node: str) -> list[str]:
        if node not in memo:
            below = max((longest(target) for target in graph.get(node, ())), key=len, default=[])
            memo[node] = [node] + below
        return memo[node]

    chain = max((longest(node) for node in graph), key=len)
    return len(chain), chain


#: The longest import chain of the package and benchmarks, in modules, on 2026-12-03: composer_se.train ->
#: recipes.run -> recipes.builders -> algorithm -> surgery -> batchnorm (its face) -> graph -> fold -> norm_act ->
#: modules -> function -> compiled -> triton_passes -> torch_passes. (In folders: 7 floors, fused passes to train.py.)
MAX_IMPORT_DEPTH = 14


def test_the_import_graph_has_no_cycle_and_is_no_deeper_than_it_was():
    graph = import_graph()
    assert len(graph) > 40 and graph['composer_se.batchnorm.function'] >= {'composer_se.batchnorm.backend'}
    assert _cycle(graph) == []
    depth, chain = _depth(graph)
    assert depth <= MAX_IMPORT_DEPTH, ' -> '.join(chain)


def test_a_cycle_is_found():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert _depth({'a': {'b'}, 'b': {'c'}, 'c': set()}) == (3, ['a', 'b', 'c'])


# --- Composer's inside, in one place -----------------------------------------------------------------------------

PLUMBING = PACKAGE / 'composer_plumbing'
#: What only code that knows Composer's inside writes: its private checkpoint reader and validation hook, the
#: entry under composer.algorithms, and our algorithm's repr prefix as a literal.
COMPOSER_INSIDE = ('_torch_load_with_validation', '_ensure_valid_checkpoint', 'composer.algorithms, ',
                   "'composer_se.'", "'composer_se.SqueezeExcite(", '_already_squeeze_excited')


def test_only_the_composer_plumbing_knows_composers_inside():
    offenders = {str(path.relative_to(ROOT)): [text for text in COMPOSER_INSIDE if text in path.read_text()]
                 for path in PACKAGE.rglob('*.py') if PLUMBING not in path.parents}
    assert {path: found for path, found in offenders.items() if found} == {}
    assert all(any(text in path.read_text() for path in PLUMBING.glob('*.py')) for text in COMPOSER_INSIDE[:2])


def test_the_package_face_only_hands_names_on():
    """composer_se/__init__.py: a docstring, an import of importlib, __all__, __version__, the lazy homes and the
    two functions that load them; nothing runs on import."""
    tree = ast.parse((PACKAGE / '__init__.py').read_text())
    kinds = [type(node).__name__ for node in tree.body]
    assert kinds == ['Expr', 'ImportFrom', 'Import', 'Assign', 'Assign', 'Assign', 'FunctionDef', 'FunctionDef']
    assert imported_modules(PACKAGE / '__init__.py') == {'__future__', 'importlib'}


TORCH_ONLY = ['composer_se', 'composer_se.layers', 'composer_se.batchnorm', 'composer_se.placement',
              'composer_se.settings', 'composer_se.surgery', 'composer_se.plan', 'composer_se.inference',
              'composer_se.gates', 'composer_se.checkpoints', 'composer_se.composer_plumbing.models']


def test_the_torch_only_modules_import_no_composer_and_leave_the_import_system_alone():
    """In a fresh interpreter: importing the layers, BatchNorms, placement, settings, surgery, planner and inference
    modules, then adding SE to a model and planning it, imports nothing of Composer and adds no import hook."""
    code = '\n'.join([
        'import sys',
        'finders = list(sys.meta_path)',
        'import composer_se.layers',
        'assert sys.meta_path == finders, sys.meta_path',
        *[f'import {module}' for module in TORCH_ONLY],
        'import torch',
        'from composer_se import apply_squeeze_excite, plan_squeeze_excite',
        'model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())',
        'assert plan_squeeze_excite(model, (8, 8), 4, 8).num_params == apply_squeeze_excite(model, 4, 8).num_params',
        'assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 6, 6)',
        'print(sorted(name for name in sys.modules if name.split(".")[0] == "composer"), sys.meta_path == finders)',
    ])
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == '[] True'


# --- the tests mirror the package --------------------------------------------------------------------------------

TESTS = ROOT / 'tests'
#: Package modules without a test module of their own, and why.
UNMIRRORED = {'composer_se/train.py': 'the entry point, a hand-over to recipes/run.py checked above'}


def _subject(path: Path) -> str:
    """What a test module's first line says it tests: ``composer_se/...py``, ``composer_se/.../`` or ``Across ...``."""
    first = (ast.get_docstring(ast.parse(path.read_text())) or '').splitlines()[0:1]
    return first[0].split(':')[0] if first and first[0].startswith('composer_se/') else (first[0] if first else '')


def _mirror(subject: str) -> Path:
    """Where the test module of ``composer_se/a/b.py`` (``tests/a/test_b.py``) or ``composer_se/a/b/`` (``tests/a/
    test_b.py``) lives."""
    parts = Path(subject.rstrip('/')).relative_to('composer_se').parts
    return TESTS.joinpath(*parts[:-1], f'test_{Path(parts[-1]).stem}.py')


def test_each_test_module_names_its_module_where_it_mirrors_it_or_says_what_it_covers():
    """First line: ``composer_se/<module or folder>: ...`` for the test module of that module, kept where the package
    keeps it, or ``Across ...`` for a suite over several modules."""
    wrong = {}
    for path in sorted(TESTS.rglob('test_*.py')):
        subject = _subject(path)
        if subject.startswith('Across '):
            continue
        if not subject.startswith('composer_se/') or not (ROOT / subject).exists():
            wrong[str(path.relative_to(ROOT))] = f'first line names no module or folder: {subject!r}'
        elif _mirror(subject) != path:
            wrong[str(path.relative_to(ROOT))] = f'tests {subject}, so belongs at {_mirror(subject).relative_to(ROOT)}'
    assert wrong == {}


def test_every_package_module_has_a_test_module():
    subjects = {_subject(path) for path in TESTS.rglob('test_*.py')}
    missing = []
    for path in sorted(PACKAGE.rglob('*.py')):
        name = str(path.relative_to(ROOT))
        folders = [f'{parent.relative_to(ROOT)}/' for parent in path.parents if PACKAGE in parent.parents]
        if path.name == '__init__.py' or name in UNMIRRORED or name in subjects or set(folders) & subjects:
            continue
        missing.append(name)
    assert missing == []
