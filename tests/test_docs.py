"""Across the docs: the README's and the method card's code runs, and their commands are the ones CI uses."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ['README.md', 'docs/method_card.md']


def python_blocks(path: str) -> list[str]:
    return re.findall(r'```python\n(.*?)```', (ROOT / path).read_text(), flags=re.S)


def setup_commands() -> list[str]:
    return [line.strip() for line in (ROOT / 'README.md').read_text().splitlines() if line.startswith('    python3 -m venv')]


@pytest.mark.parametrize('path, index', [(path, i) for path in DOCS for i in range(len(python_blocks(path)))])
def test_code_block_runs(path, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = python_blocks(path)[index]
    exec(compile(code, f'{path}[block {index}]', 'exec'), {'__name__': '__docs__'})  # a NoEffectWarning fails


def test_readme_zoo_table_is_what_the_code_gives_today():
    pytest.importorskip('timm')  # its rows are in the table
    spec = importlib.util.spec_from_file_location('zoo_table', ROOT / 'benchmarks' / 'zoo_table.py')
    zoo_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo_table)
    text = (ROOT / 'README.md').read_text()
    header = '| family | model | min_channels | SE blocks | folded | skipped |'
    assert text.count(header) == 1
    start = text.index(header)
    table = text[start:text.index('\n\n', start)]
    assert table == zoo_table.table(with_timm=True)


def test_method_card_has_composers_sections_and_both_interfaces():
    text = (ROOT / 'docs/method_card.md').read_text()
    headings = re.findall(r'^##+ (.+)$', text, flags=re.M)
    for section in ['How to Use', 'Functional Interface', 'Composer Trainer', 'Implementation Details',
                    'Suggested Hyperparameters', 'Technical Details', 'Attribution']:
        assert section in headings
    assert len(python_blocks('docs/method_card.md')) >= 2


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith('composer -n 1 -m composer_se.train yamls/resnet56_synthetic_demo.yaml')
    assert commands[1].endswith('python -m pytest -q')
    assert commands[1] in (ROOT / '.ci/run').read_text().splitlines()


def _dotted_names(text: str) -> set[str]:
    """Every ``composer_se.<name>...`` the text writes in backticks (``composer_se.CheckpointError``, ...)."""
    return {match.rstrip('.') for match in re.findall(r'`(composer_se(?:\.[A-Za-z_]\w*)+)', text)}


@pytest.mark.parametrize('path', DOCS)
def test_every_name_the_docs_give_in_the_package_exists(path):
    """A module, class or function the docs name as ``composer_se.x.y`` can be imported as written."""
    missing = []
    for name in sorted(_dotted_names((ROOT / path).read_text())):
        parts = name.split('.')
        for split in range(len(parts), 0, -1):  # the longest module prefix, then attributes
            try:
                value = importlib.import_module('.'.join(parts[:split]))
            except ModuleNotFoundError:
                continue
            try:
                for attribute in parts[split:]:
                    value = getattr(value, attribute)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert len(_dotted_names((ROOT / path).read_text())) >= 3 and missing == []


def test_what_the_docs_say_of_imports_holds():
    """The docs do not say the package never imports timm (it does where timm is in use: test_timm.py), nor that
    importing composer_se registers anything (tests/test_layout.py: importing it changes nothing)."""
    for path in DOCS:
        text = ' '.join((ROOT / path).read_text().split())
        assert not re.search(r'never imports? timm|timm is never imported', text), path
        assert not re.search(r'registered when `composer_se` is imported', text), path
