"""composer_se/recipes/data/on_device.py: images decoded once onto the training device, batches made there."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composer.core import Callback
from torchvision import datasets
from torchvision.transforms.functional import pil_to_tensor

from composer_se.recipes.config import DataConfig, RecipeError, load_recipe
from composer_se.recipes.data.loaders import NORMALIZATION, build_dataloader, read_image
from composer_se.recipes.data.on_device import (DeviceBatches, build_device_dataloader, crop_and_flip, decode,
                                                training_device)
from composer_se.recipes.run import build_trainer
from tests.recipes.helpers import (DEMO, FINAL_LINES, SHRINK, error_line, fingerprints, finish, killed_copy, launch,
                                   run_main, write_image_tree)


@pytest.fixture(scope='module')
def tree(tmp_path_factory) -> Path:
    """32 training and 32 test images of 32x32 in two classes."""
    return write_image_tree(tmp_path_factory.mktemp('data') / 'images', splits=('train', 'test'), per_class=16,
                            size=32)


def on_device(tree: Path) -> list[str]:
    """The demo recipe shrunk to resnet20 on ``tree``'s images held on the device: 4 batches of 8 an epoch."""
    return [*SHRINK, 'model.name=resnet20', 'data.source=imagefolder', f'data.root={tree}', 'data.on_device=true',
            'eval_interval=1ep', 'eval_batch_size=8']


def numbered(count: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random uint8 images and labels ``0 .. count - 1``, so that a label names its image."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.arange(count)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# --- the recipe's option ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('overrides, message', [
    (['data.source=synthetic'], "data.on_device=true needs data.source cifar10 or imagefolder, got 'synthetic'"),
    (['data.source=streaming', 'data.local=/tmp'], "needs data.source cifar10 or imagefolder, got 'streaming'"),
    (['data.augmentation=imagenet'], "data.on_device=true implements data.augmentation cifar only (pad-4 crop and "
     "flip), got 'imagenet'"),
    (['algorithms.randaugment={}'], 'randaugment transform PIL images in a torch dataset, which data.on_device=true '
     'does not have'),
    (['algorithms.colout.batch=false'], 'colout transform PIL images in a torch dataset'),
])
def test_on_device_is_refused_where_it_does_not_apply(overrides, message, tree):
    status, out, err = run_main(*on_device(tree), *overrides)
    assert status == 2 and 'SqueezeExcite:' not in out
    assert message in error_line(err)


def test_training_device_is_the_trainers():
    assert training_device('cpu') == torch.device('cpu')
    assert training_device('gpu') == torch.device('cuda', 0)  # the local rank's GPU, as Composer's DeviceGPU


# --- decoding ---------------------------------------------------------------------------------------------------


def test_evaluation_batches_equal_the_worker_loaders_bit_for_bit(tree):
    config = DataConfig(source='imagefolder', root=str(tree), on_device=True)
    ours = build_device_dataloader(config, 2, False, 8, 0, torch.device('cpu'))
    theirs = build_dataloader(config, 2, False, 8, 0)
    assert ours.num_samples == 32 and len(ours.dataloader) == 4
    for (x, y), (x_ref, y_ref) in zip(ours.dataloader, theirs.dataloader, strict=True):
        assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_max_samples_keep_the_worker_loaders_subset(tree):
    config = DataConfig(source='imagefolder', root=str(tree), on_device=True, max_train_samples=10)
    ours = build_device_dataloader(config, 2, True, 2, 0, torch.device('cpu')).dataloader
    theirs = build_dataloader(config, 2, True, 2, 0).dataloader
    assert len(ours) == 5  # 10 images in batches of 2
    kept = theirs.dataset.samples
    assert len(kept) == 10 and ours.labels.tolist() == [label for _, label in kept]
    assert torch.equal(ours.images, torch.stack([pil_to_tensor(read_image(path)) for path, _ in kept]))


def test_cifar10_files_are_taken_as_they_are():
    dataset = datasets.CIFAR10.__new__(datasets.CIFAR10)  # what torchvision reads from cifar-10-batches-py
    dataset.data = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    dataset.targets = [3, 1, 4, 1, 5]
    images, labels = decode(dataset)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[2], torch.from_numpy(dataset.data[2]).permute(2, 0, 1))
    assert labels.tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize('damage, workers, message', [
    ('cut-short', 1, 'image file {path} cannot be read'),
    ('other-size', 0, 'data.on_device=true stacks the images of a split into one tensor, so they must have one size: '
     '{path} is 16x16'),
])
def test_an_unreadable_or_odd_sized_image_stops_the_run_naming_it(damage, workers, message, tmp_path):
    root = write_image_tree(tmp_path / 'images', splits=('train', 'test'), size=32)
    path = root / 'train' / 'dog' / '3.png'
    if damage == 'cut-short':
        path.write_bytes(path.read_bytes()[:60])
    else:
        write_image_tree(tmp_path / 'small', splits=('train',), size=16)
        shutil.copy(tmp_path / 'small' / 'train' / 'dog' / '0.png', path)
    status, _, err = run_main(*on_device(root), f'data.num_workers={workers}')
    assert status == 1
    assert message.format(path=path) in error_line(err)


# --- the batches ------------------------------------------------------------------------------------------------


def test_crop_and_flip_is_a_padded_window_then_a_mirror():
    images = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    top, left = torch.tensor([0, 8, 3, 8, 0, 5]), torch.tensor([0, 10, 6, 0, 10, 2])
    flip = torch.tensor([False, True, False, True, True, False])
    windows = crop_and_flip(images, top, left, flip, size=5)
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(6):
        expected = padded[i, :, top[i]:top[i] + 5, left[i]:left[i] + 5]
        assert torch.equal(windows[i], expected.flip(-1) if flip[i] else expected)


def test_training_batches_are_cropped_flipped_and_normalised_samples_of_the_plan():
    images, labels = numbered(20)
    loader = DeviceBatches(images, labels, 4, train=True, seed=3)
    indices, top, left, flip = loader.plan(0)
    mean, std = (torch.tensor(v)[:, None, None] for v in NORMALIZATION['cifar'])
    for step, (x, y) in enumerate(loader):
        assert x.dtype == torch.float32 and x.shape == (4, 3, 8, 8) and torch.equal(y, indices[step])
        for i, image in enumerate(y):
            window = crop_and_flip(images[image][None], top[step, i, None], left[step, i, None], flip[step, i, None], 8)
            torch.testing.assert_close(x[i], (window[0].float() / 255 - mean) / std)
    assert step == 4


def test_the_draws_cover_every_offset_and_both_flips():
    loader = DeviceBatches(*numbered(400, size=32), 100, train=True, seed=0)
    _, top, left, flip = loader.plan(0)
    assert sorted(set(top.flatten().tolist())) == sorted(set(left.flatten().tolist())) == list(range(9))
    assert 0.4 < flip.float().mean() < 0.6


def test_the_seed_and_the_epoch_decide_the_batches():
    images, labels = numbered(40)
    first = batches(DeviceBatches(images, labels, 8, train=True, seed=5))
    again = batches(DeviceBatches(images, labels, 8, train=True, seed=5))
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(first, again, strict=True))
    other_seed = batches(DeviceBatches(images, labels, 8, train=True, seed=6))
    loader = DeviceBatches(images, labels, 8, train=True, seed=5)
    loader.set_epoch(1)
    next_epoch = batches(loader)
    for other in (other_seed, next_epoch):
        assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other]))
    assert sorted(torch.cat([y for _, y in next_epoch]).tolist()) == list(range(40))  # 5 full batches of 8


@pytest.mark.parametrize('world_size', [2, 3])
def test_processes_take_disjoint_equal_shares_that_make_up_the_one_process_batches(world_size):
    images, labels = numbered(50)
    single = DeviceBatches(images, labels, 4 * world_size, train=True, seed=7, rank=0, world_size=1)
    single.set_epoch(2)
    shares = []
    for rank in range(world_size):
        loader = DeviceBatches(images, labels, 4, train=True, seed=7, rank=rank, world_size=world_size)
        loader.set_epoch(2)
        shares.append(batches(loader))
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) == 50 // (4 * world_size)
    seen = torch.cat([y for share in shares for _, y in share])
    assert len(set(seen.tolist())) == len(seen)  # no image on two processes, nor twice on one
    for step, (x, y) in enumerate(batches(single)):
        assert torch.equal(torch.cat([share[step][0] for share in shares]), x)
        assert torch.equal(torch.cat([share[step][1] for share in shares]), y)


def test_evaluation_takes_every_image_once_in_the_same_number_of_batches_on_each_process():
    images, labels = numbered(23)
    shares = [batches(DeviceBatches(images, labels, 2, train=False, rank=rank, world_size=3)) for rank in range(3)]
    assert [len(share) for share in shares] == [4, 4, 4]  # parts of 8, 8 and 7 images
    assert torch.cat([y for share in shares for _, y in share]).tolist() == list(range(23))
    with pytest.raises(RecipeError, match='cannot be cut into the same number of batches'):
        DeviceBatches(images[:5], labels[:5], 1, train=False, rank=0, world_size=2)  # 3 and 2 images, batches of 1


# --- in the Trainer ---------------------------------------------------------------------------------------------


class _Inputs(Callback):
    """Records every training batch the model receives."""

    def __init__(self):
        self.seen = []

    def after_dataloader(self, state, logger):
        self.seen.append(state.batch[0].clone())


def test_the_trainer_draws_each_epochs_own_batches(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_recipe(DEMO, [*on_device(tree), 'max_duration=2ep']))
    inputs = _Inputs()
    trainer.state.callbacks.append(inputs)
    trainer.fit()
    loader = trainer.state.train_dataloader
    expected = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        expected += [x for x, _ in loader]
    assert len(inputs.seen) == len(expected) == 8
    assert all(torch.equal(seen, x) for seen, x in zip(inputs.seen, expected))


def test_a_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(tree, tmp_path):
    common = [*on_device(tree), 'max_duration=2ep', 'run_name=tiny', 'checkpoint.autoresume=true',
              'checkpoint.save_interval=2ba']
    reference = tmp_path / 'reference'
    status, out, err = run_main(*common, f'checkpoint.save_folder={reference}')
    assert status == 0, err[-3000:]
    expected = FINAL_LINES.findall(out)
    assert len(expected) == 3 and expected[0] == 'trained 2 epochs, 8 batches'

    # as a run killed after saving batch 6 (batch 2 of epoch 1) leaves its folder
    killed = killed_copy(reference, tmp_path / 'killed', 6, link=True, per_epoch=4)
    status, out, err = run_main(*common, f'checkpoint.save_folder={killed}')
    assert status == 0, err[-3000:]
    assert f'loaded checkpoint {killed}/latest-rank0.pt: continuing at epoch 1, batch 6' in out
    assert FINAL_LINES.findall(out) == expected


def test_two_processes_share_the_images_under_the_launcher(tree, tmp_path):
    output = finish(launch([DEMO, *on_device(tree), 'max_duration=1ep'], tmp_path, processes=2))
    rank1 = (tmp_path / 'rank1.stdout').read_text()
    # 32 images in global batches of 8: 4 steps, each of 4 images a process.
    assert 'trained 1 epochs, 4 batches' in output and '[rank 1] trained 1 epochs, 4 batches' in rank1
    ours, theirs = fingerprints(output), fingerprints(rank1)
    assert len(ours) == len(theirs) == 1 and ours == theirs
