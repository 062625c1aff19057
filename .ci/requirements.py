"""Print what a venv with torch and mosaicml (installed --no-deps) still needs for the test suite.

Composer's own requirements (read from the installed mosaicml's metadata) and this
package's dependencies and ``dev`` extra (read from pyproject.toml), without torch,
torchvision and mosaicml themselves, one requirement a line for ``pip install -r``.
"""

import importlib.metadata
import re
import tomllib
from pathlib import Path

PINNED = {'torch', 'torchvision', 'mosaicml'}


def name(requirement: str) -> str:
    return re.split(r'[\s<>=!~\[;]', requirement, maxsplit=1)[0].lower().replace('_', '-')


project = tomllib.loads((Path(__file__).resolve().parents[1] / 'pyproject.toml').read_text())['project']
wanted = [r for r in importlib.metadata.requires('mosaicml') or [] if 'extra ==' not in r]
wanted += project['dependencies'] + project['optional-dependencies']['dev']
seen = set()
for requirement in wanted:
    key = name(requirement)
    if key not in PINNED and requirement not in seen:
        seen.add(requirement)
        print(requirement.split(';')[0].strip())
