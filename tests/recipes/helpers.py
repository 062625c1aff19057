"""Helpers for the recipe tests: shrinking overrides, tiny on-disk datasets, runs through the launcher."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted((ROOT / 'yamls').glob('*.yaml'))
COMPOSER = str(Path(sys.executable).with_name('composer'))
DEMO = str(ROOT / 'yamls' / 'resnet56_synthetic_demo.yaml')
#: The lines a finished run prints last.
FINAL_LINES = re.compile(r'^(trained .*|final eval accuracy: .*|final weights fingerprint: .*)$', re.M)

#: Overrides that shrink any recipe to a few CPU batches of synthetic data.
SHRINK = [
    'data.source=synthetic',
    'data.synthetic_train_samples=32',
    'data.synthetic_eval_samples=16',
    'data.num_workers=0',
    'data.pin_memory=false',
    'global_batch_size=8',
    'eval_batch_size=16',
    'max_duration=2ba',
    'eval_interval=2ba',
    'loggers.progress_bar=false',
    'scheduler.t_warmup=1ba',
]


def se_blocks(trainer) -> list[str]:
    """The names of the modules that carry an SE block (convs, or BatchNorms for placement='block')."""
    from composer_se.batchnorm import SqueezeExciteBatchNorm2d
    from composer_se.layers import SqueezeExciteConv2d
    return [name for name, m in trainer.state.model.named_modules()
            if isinstance(m, (SqueezeExciteConv2d, SqueezeExciteBatchNorm2d))]


def fit(recipe: str, *overrides: str):
    """A Trainer for ``recipe`` shrunk by :data:`SHRINK` (and ``overrides``), after ``fit()``."""
    from composer_se.recipes.config import load_recipe
    from composer_se.recipes.run import build_trainer
    trainer = build_trainer(load_recipe(recipe, [*SHRINK, *overrides]))
    trainer.fit()
    return trainer


def run_main(*args: str) -> tuple[int, str, str]:
    """``composer_se.train.main`` on the demo recipe with ``args``, in this process: exit status, stdout and stderr."""
    from composer_se.recipes.run import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([DEMO, *args])
    return status, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The one line a refused run prints."""
    lines = [line for line in err.splitlines() if line.startswith('composer_se.train: error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    return lines[0]


def killed_copy(reference_folder: Path, folder: Path, last: int, link: bool, per_epoch: int = 8) -> Path:
    """``folder`` as a run killed after saving batch ``last`` would leave it, from the checkpoints a run saved every
    2 batches (``per_epoch`` an epoch) in ``reference_folder`` (``link``: latest-rank0.pt made)."""
    folder.mkdir(parents=True)
    for batch in range(2, last + 1, 2):
        name = f'ep{(batch - 1) // per_epoch}-ba{batch}-rank0.pt'
        shutil.copy(reference_folder / name, folder / name)
    if link:
        os.symlink(f'ep{(last - 1) // per_epoch}-ba{last}-rank0.pt', folder / 'latest-rank0.pt')
    return folder


def write_image_tree(root: Path, splits=('train', 'val'), classes=('cat', 'dog'), per_class=8, size=16) -> Path:
    """``root/<split>/<class>/<n>.png``: class 0 images are dark, class 1 images bright."""
    rng = np.random.default_rng(0)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 100, (size, size, 3)) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{index}.png')
    return root


def write_mds(root: Path, splits=('train', 'val'), per_split=32, size=16, num_labels=2) -> Path:
    """MDS shards ``root/<split>/`` with columns ``x`` (a JPEG image) and ``y`` (its class, ``index % num_labels``)."""
    from streaming import MDSWriter
    rng = np.random.default_rng(0)
    for split in splits:
        with MDSWriter(out=str(root / split), columns={'x': 'jpeg', 'y': 'int'}) as writer:
            for index in range(per_split):
                label = index % num_labels
                pixels = rng.integers(0, 100, (size, size, 3)) + 150 * label
                writer.write({'x': Image.fromarray(pixels.astype(np.uint8)), 'y': label})
    return root


def launch(args: list[str], cwd: Path, processes: int = 1, **kwargs) -> subprocess.Popen:
    command = [COMPOSER, '-n', str(processes), '--stdout', str(cwd / 'rank{rank}.stdout'), '--stderr',
               str(cwd / 'rank{rank}.stderr'), '-m', 'composer_se.train', *args]
    env = dict(os.environ)
    if processes > 1:  # each process would start a thread per core: oversubscribed, several times slower
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // processes))
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            **kwargs)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def fingerprints(text: str) -> list[str]:
    return re.findall(r'final weights fingerprint: ([0-9a-f]{16})', text)
