"""Across recipes/: runs through Composer's launcher in separate processes: two ranks, SIGKILL and autoresume, data."""

from __future__ import annotations

import os
import re
import signal
import tarfile
import time
from pathlib import Path

import pytest

from composer_se.recipes.run import main
from tests.recipes.helpers import DEMO, ROOT, SHRINK, fingerprints, finish, launch, write_mds

CIFAR_JPEG = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
TINY = [*SHRINK, 'model.name=resnet20', 'data.synthetic_train_samples=64', 'eval_interval=1ep']


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


#: 128 samples in global batches of 8: 16 batches an epoch (on 1 or 2 processes), a checkpoint every 2 batches.
KILLABLE = [*SHRINK, 'model.name=resnet20', 'data.synthetic_train_samples=128', 'data.synthetic_eval_samples=64',
            'eval_interval=1ep', 'max_duration=2ep', 'run_name=killed', 'checkpoint.save_folder=ckpt',
            'checkpoint.autoresume=true', 'checkpoint.save_interval=2ba']
FINAL_LINES = re.compile(r'^(?:\[rank \d\] )?(trained .*|final eval accuracy: .*|final weights fingerprint: .*)$', re.M)


def kill_mid_epoch(run: Path, processes: int) -> int:
    """Launches the run, SIGKILLs every process once the first checkpoint is linked; returns the linked batch.

    It also leaves, deterministically, what a kill between Composer writing a checkpoint
    file and moving latest-rank0.pt to it leaves: a newer checkpoint file, here cut short.
    """
    process = launch([DEMO, *KILLABLE], run, processes, start_new_session=True)
    latest = run / 'ckpt' / 'latest-rank0.pt'
    deadline = time.time() + 240
    while not latest.is_symlink():
        assert process.poll() is None and time.time() < deadline, 'the run ended before its first checkpoint'
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    epoch, batch = map(int, re.match(r'ep(\d+)-ba(\d+)-rank0\.pt', os.readlink(latest)).groups())
    assert 0 < batch < 16 and epoch == 0, f'killed at batch {batch}, not in the middle of the first epoch'
    newer = run / 'ckpt' / f'ep0-ba{batch + 2}-rank0.pt'
    if not newer.exists():  # the kill may have left one already
        newer.write_bytes((run / 'ckpt' / os.readlink(latest)).read_bytes()[:100_000])
    return batch


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_and_accuracy(tmp_path, monkeypatch, capsys):
    reference = tmp_path / 'reference'
    reference.mkdir()
    monkeypatch.chdir(reference)  # the uninterrupted run, in this process: the same numbers as a launched one
    assert main([DEMO, *KILLABLE]) == 0
    expected = FINAL_LINES.findall(capsys.readouterr().out)
    assert len(expected) == 3

    run = tmp_path / 'run'
    run.mkdir()
    batch = kill_mid_epoch(run, processes=1)

    resumed = finish(launch([DEMO, *KILLABLE], run))
    assert 'SqueezeExcite: 7 SE blocks' in resumed
    assert re.search(rf'loaded checkpoint \S+latest-rank0.pt: continuing at epoch 0, batch {batch}\n', resumed)
    assert f'ep0-ba{batch + 2}-rank0.pt' in os.listdir(run / 'ckpt' / 'orphaned-checkpoints')
    assert FINAL_LINES.findall(resumed) == expected  # weights fingerprint and eval accuracy


def test_a_two_process_run_killed_mid_epoch_resumes_to_the_same_weights_and_accuracy(tmp_path):
    reference = tmp_path / 'reference'
    reference.mkdir()
    expected = FINAL_LINES.findall(finish(launch([DEMO, *KILLABLE], reference, processes=2)))
    expected_rank1 = FINAL_LINES.findall((reference / 'rank1.stdout').read_text())
    assert len(expected) == len(expected_rank1) == 3 and expected[2] == expected_rank1[2]  # the same weights

    run = tmp_path / 'run'
    run.mkdir()
    batch = kill_mid_epoch(run, processes=2)

    resumed = finish(launch([DEMO, *KILLABLE], run, processes=2))
    rank1 = (run / 'rank1.stdout').read_text()  # appended to by both launches
    assert re.search(rf'loaded checkpoint \S+latest-rank0.pt: continuing at epoch 0, batch {batch}\n', resumed)
    assert '[rank 1] loaded checkpoint' in rank1.split('[rank 1] SqueezeExcite: 7 SE blocks')[-1]
    assert FINAL_LINES.findall(resumed) == expected
    assert FINAL_LINES.findall(rank1)[-3:] == expected_rank1


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
