"""composer_se/recipes/data/loaders.py: the worker-based loaders of each data source and their transforms."""

from __future__ import annotations

import torch

from composer_se.recipes.run import main
from tests.recipes.helpers import DEMO, SHRINK, fit, se_blocks, write_image_tree, write_mds


def test_imagefolder_run_with_randaugment(tmp_path):
    root = write_image_tree(tmp_path / 'images')
    trainer = fit(DEMO, 'model.name=resnet20', 'model.num_classes=2', 'data.source=imagefolder', f'data.root={root}',
                  'data.image_size=16', 'algorithms.randaugment={}', 'max_duration=1ep')
    assert len(se_blocks(trainer)) == 7
    assert int(trainer.state.timestamp.batch) == 2  # 16 training images, batches of 8


def test_imagefolder_missing_split_is_named(tmp_path, capsys):
    root = write_image_tree(tmp_path / 'images', splits=('train',))
    assert main([DEMO, *SHRINK, 'data.source=imagefolder', f'data.root={root}']) == 2
    assert f'data.root {root} has neither a val/ nor a test/ folder' in capsys.readouterr().err


def test_streaming_run_on_local_mds_shards(tmp_path):
    root = write_mds(tmp_path / 'mds')
    trainer = fit(DEMO, 'model.name=resnet20', 'model.num_classes=2', 'data.source=streaming', f'data.local={root}',
                  'data.image_size=16', 'max_duration=1ep')
    assert len(se_blocks(trainer)) == 7
    assert int(trainer.state.timestamp.batch) == 4  # 32 samples in batches of 8


def test_imagefolder_without_class_folders_is_named(tmp_path, capsys):
    (tmp_path / 'flat' / 'train').mkdir(parents=True)
    (tmp_path / 'flat' / 'val').mkdir()
    assert main([DEMO, *SHRINK, 'data.source=imagefolder', f'data.root={tmp_path}/flat']) == 2
    assert f'{tmp_path}/flat/train is not a folder of class folders of images' in capsys.readouterr().err


def test_imagenet_transforms():
    from PIL import Image

    from composer_se.recipes.data.loaders import build_transform
    image = Image.new('RGB', (500, 375))
    assert build_transform('imagenet', 224, train=True)(image).shape == (3, 224, 224)
    evaluation = build_transform('imagenet', 224, train=False)
    assert [type(t).__name__ for t in evaluation.transforms] == ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
    assert evaluation.transforms[0].size == [256] and evaluation(image).shape == (3, 224, 224)
    cifar = build_transform('cifar', 32, train=True)
    assert [type(t).__name__ for t in cifar.transforms] == ['RandomCrop', 'RandomHorizontalFlip', 'ToTensor',
                                                            'Normalize']
    assert cifar.transforms[0].padding == [4, 4, 4, 4]


def test_streaming_shuffles_each_epoch(tmp_path):
    from composer_se.recipes.config import DataConfig
    from composer_se.recipes.data.loaders import build_dataloader
    root = write_mds(tmp_path / 'mds', per_split=64)
    loader = build_dataloader(DataConfig(source='streaming', local=str(root), image_size=16), 2, True, 64, 0).dataloader
    first, second = (torch.cat([x.flatten(1)[:, 0] for x, _ in loader]) for _ in range(2))
    assert first.shape == second.shape == (64,) and not torch.equal(first, second)
