"""Runs through Composer's launcher in separate processes: two ranks, kill and autoresume, real data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.recipes import ROOT, SHRINK, write_mds

DEMO = str(ROOT / 'yamls' / 'resnet56_synthetic_demo.yaml')
COMPOSER = str(Path(sys.executable).with_name('composer'))
CIFAR_JPEG = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
TINY = [*SHRINK, 'model.name=resnet20', 'data.synthetic_train_samples=64', 'eval_interval=1ep']


def launch(args: list[str], cwd: Path, processes: int = 1, **kwargs) -> subprocess.Popen:
    command = [COMPOSER, '-n', str(processes), '--stdout', str(cwd / 'rank{rank}.stdout'), '--stderr',
               str(cwd / 'rank{rank}.stderr'), '-m', 'composer_se.train', *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def fingerprints(text: str) -> list[str]:
    return re.findall(r'final weights fingerprint: ([0-9a-f]{16})', text)


def test_two_processes_apply_se_on_both_ranks_and_agree(tmp_path):
    """Two ranks reading MDS shards: SE on both, the data split between them, identical final weights."""
    root = write_mds(tmp_path / 'mds', per_split=64)
    output = finish(launch([
        DEMO, *TINY, 'max_duration=1ep', 'data.source=streaming', f'data.local={root}', 'model.num_classes=2',
        'data.image_size=16'
    ], tmp_path, processes=2))
    # 64 samples, global batch 8: 8 steps of 4 samples a rank. Unsplit, each rank would take 16.
    assert 'trained 1 epochs, 8 batches' in output
    rank1 = (tmp_path / 'rank1.stdout').read_text()
    assert 'SqueezeExcite: 7 SE blocks (58,240 parameters)' in output
    assert '[rank 1] SqueezeExcite: 7 SE blocks (58,240 parameters)' in rank1
    assert '[rank 1] trained 1 epochs, 8 batches' in rank1
    ours, theirs = fingerprints(output), fingerprints(rank1)
    assert len(ours) == len(theirs) == 1 and ours == theirs


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    recipe = [DEMO, *TINY, 'max_duration=4ep', 'run_name=killed', 'checkpoint.save_folder=ckpt',
              'checkpoint.autoresume=true', 'checkpoint.save_interval=1ep']
    reference = tmp_path / 'reference'
    reference.mkdir()
    expected = fingerprints(finish(launch(recipe, reference)))

    run = tmp_path / 'run'
    run.mkdir()
    process = launch(recipe, run, start_new_session=True)
    deadline = time.time() + 240
    latest = run / 'ckpt' / 'latest-rank0.pt'  # the link autoresume follows, made once a checkpoint is complete
    while not latest.exists():
        assert process.poll() is None and time.time() < deadline, 'the run ended before its first checkpoint'
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (run / 'ckpt' / 'ep4-ba32-rank0.pt').exists()

    resumed = finish(launch(recipe, run))
    assert 'SqueezeExcite: 7 SE blocks' in resumed
    assert fingerprints(resumed) == expected


@pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f'{CIFAR_JPEG} is not on this machine')
def test_real_cifar10_images_beat_chance(tmp_path):
    with tarfile.open(CIFAR_JPEG) as archive:
        archive.extractall(tmp_path, filter='data')
    output = finish(launch([
        str(ROOT / 'yamls' / 'resnet56_cifar10.yaml'), 'model.name=resnet20', 'data.source=imagefolder',
        f'data.root={tmp_path}/cifar10', 'data.max_train_samples=6000', 'data.max_eval_samples=1000',
        'data.num_workers=1', 'data.pin_memory=false', 'global_batch_size=128', 'eval_batch_size=500',
        'optimizer.lr=0.2', 'scheduler.t_warmup=10ba', 'scheduler.milestones=[2ep]', 'max_duration=2ep',
        'loggers.progress_bar=false'
    ], tmp_path), timeout=600)
    accuracy = float(re.search(r'final eval accuracy: ([0-9.]+)%', output).group(1))
    assert 'SqueezeExcite: 7 SE blocks' in output
    assert accuracy > 20.0, output[-2000:]  # chance: 10%; measured 29.9% (resnet20, 2 epochs of 6000 images)
