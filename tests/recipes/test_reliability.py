"""Across recipes/: what happens when something goes wrong: checkpoints, resuming, data, recipes, security.

Each test backs a row of the README's "What happens when..." table. Runs are in-process
(``composer_se.train.main``) on tiny synthetic data; the launcher tests kill real runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from composer_se.recipes.config import DataConfig
from composer_se.recipes.data.loaders import DataError, build_dataloader
from composer_se.recipes.resume import ORPHANS_FOLDER
from composer_se.recipes.run import main
from composer_se.recipes.safe_load import read_checkpoint
from tests.recipes.helpers import (DEMO, FINAL_LINES, ROOT, SHRINK, error_line, killed_copy, run_main, write_image_tree,
                                   write_mds)

#: resnet20 with SE (latent_channels=64, min_channels=64: 7 blocks), 8 batches an epoch, 2 epochs.
TINY = [*SHRINK, 'model.name=resnet20', 'data.synthetic_train_samples=64', 'data.synthetic_eval_samples=64',
        'eval_interval=1ep', 'max_duration=2ep', 'checkpoint.save_interval=2ba']


def run(*overrides: str) -> tuple[int, str, str]:
    """``main`` on the tiny recipe: exit status, stdout and stderr."""
    return run_main(*TINY, *overrides)


def autoresume(folder: Path) -> list[str]:
    return ['run_name=tiny', f'checkpoint.save_folder={folder}', 'checkpoint.autoresume=true']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted run: its save folder (checkpoints every 2 batches) and its final lines."""
    folder = tmp_path_factory.mktemp('reference') / 'ckpt'
    status, out, err = run(*autoresume(folder))
    assert status == 0, err[-3000:]
    assert [name for name in sorted(os.listdir(folder)) if name.startswith('ep1')] == [
        'ep1-ba10-rank0.pt', 'ep1-ba12-rank0.pt', 'ep1-ba14-rank0.pt', 'ep1-ba16-rank0.pt'
    ]
    return folder, FINAL_LINES.findall(out)


@pytest.fixture(scope='module')
def plain_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the same model trained without SE."""
    folder = tmp_path_factory.mktemp('plain') / 'ckpt'
    status, _, err = run('algorithms.squeeze_excite=null', 'max_duration=2ba', f'checkpoint.save_folder={folder}')
    assert status == 0, err[-3000:]
    return folder / 'ep0-ba2-rank0.pt'


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# --- 1. killed runs: the relaunch survives the race between a checkpoint file and the latest link -----------------


@pytest.mark.parametrize('situation', ['newer-file', 'newer-file-cut-short', 'no-link'])
def test_autoresume_sets_aside_checkpoints_the_latest_link_does_not_cover(situation, reference, tmp_path):
    """A run killed while Composer saved ba12: the relaunch continues mid-epoch from ba10, to the same end.

    newer-file: killed after ep1-ba12 was written, before the link moved to it;
    newer-file-cut-short: killed while writing ep1-ba12;
    no-link: killed after Composer removed the link and before it re-created it, with ba12 cut short.
    """
    ref_folder, ref_lines = reference
    folder = killed_copy(ref_folder, tmp_path / 'ckpt', 10, link=situation != 'no-link')
    shutil.copy(ref_folder / 'ep1-ba12-rank0.pt', folder / 'ep1-ba12-rank0.pt')
    if situation != 'newer-file':
        truncate(folder / 'ep1-ba12-rank0.pt')

    status, out, err = run(*autoresume(folder))

    assert status == 0, err[-3000:]
    assert f'loaded checkpoint {folder}/latest-rank0.pt: continuing at epoch 1, batch 10' in out
    assert f'into {folder / ORPHANS_FOLDER}: ep1-ba12-rank0.pt' in err
    assert ('latest-rank0.pt was missing; it now points to ep1-ba10-rank0.pt' in err) == (situation == 'no-link')
    assert (folder / ORPHANS_FOLDER / 'ep1-ba12-rank0.pt').is_file()
    assert FINAL_LINES.findall(out) == ref_lines  # the same weights and accuracy as the uninterrupted run


def test_a_latest_link_to_a_missing_file_is_an_error(reference, tmp_path):
    folder = killed_copy(reference[0], tmp_path / 'ckpt', 4, link=True)
    os.remove(folder / 'ep0-ba4-rank0.pt')
    status, _, err = run(*autoresume(folder))
    assert status == 2
    assert f'{folder}/latest-rank0.pt points to {folder}/ep0-ba4-rank0.pt, which does not exist' in error_line(err)


def test_relaunching_a_finished_run_trains_nothing_and_reports_the_same_result(tmp_path):
    """Its last checkpoint is at max_duration (saved at the end of its last epoch): Composer's fit() would fail."""
    folder = tmp_path / 'ckpt'
    finished = run(*autoresume(folder), 'max_duration=1ep', 'checkpoint.save_interval=1ep')
    assert finished[0] == 0 and os.readlink(folder / 'latest-rank0.pt') == 'ep1-ba8-rank0.pt', finished[2][-3000:]
    status, out, err = run(*autoresume(folder), 'max_duration=1ep', 'checkpoint.save_interval=1ep')
    assert status == 0, err[-3000:]
    assert 'the run already reached max_duration=1ep; nothing to train, evaluating its final checkpoint' in out
    assert FINAL_LINES.findall(out) == FINAL_LINES.findall(finished[1])


def test_a_new_run_into_a_folder_of_checkpoints_is_refused(reference, tmp_path):
    folder = killed_copy(reference[0], tmp_path / 'ckpt', 4, link=True)
    status, _, err = run(f'checkpoint.save_folder={folder}')
    assert status == 2
    assert (f'checkpoint.save_folder {folder} already holds checkpoints (ep0-ba2-rank0.pt, ep0-ba4-rank0.pt): set '
            f'checkpoint.autoresume=true') in error_line(err)


# --- 2. checkpoint mismatches -------------------------------------------------------------------------------------

#: The first difference between the tiny run's ResNet-20 checkpoint and a ResNet-32: a layer of its own, not SE.
DEEPER = 'at layer module.layer1.3.conv1, module.layer1.3.conv1.weight (16, 16, 3, 3) is missing from the checkpoint'

@pytest.mark.parametrize('overrides, message', [
    pytest.param(['algorithms.squeeze_excite.latent_channels=32'],
     'at layer module.layer3.0.conv1, module.layer3.0.conv1.se.fc1.weight is (64, 64) in the checkpoint and (32, 64) '
     'in the model (21 entries differ). The checkpoint was saved with SqueezeExcite(latent_channels=64, '
     'min_channels=64', id='other-latent_channels'),
    pytest.param(['algorithms.squeeze_excite.min_channels=32'],
     'at layer module.layer2.0.conv1, the model has an SE block there (module.layer2.0.conv1.se.fc1.weight (64, 32)) '
     'and the checkpoint has none', id='other-min_channels'),
    pytest.param(['algorithms.squeeze_excite.placement=block', 'algorithms.squeeze_excite.min_channels=16'],
     'at layer module.layer1.0.bn2, the model has an SE block there (module.layer1.0.bn2.se.fc1.weight (64, 16)) and '
     'the checkpoint has none', id='other-placement'),
    pytest.param(['algorithms.squeeze_excite=null'],
     'at layer module.layer3.0.conv1, the checkpoint has an SE block there (module.layer3.0.conv1.se.fc1.weight '
     '(64, 64)) and the model has none (35 entries differ). The checkpoint was saved with SqueezeExcite('
     'latent_channels=64, min_channels=64', id='without-the-algorithm'),
    pytest.param(['model.name=resnet32'], DEEPER, id='other-depth'),
    pytest.param(['model.name=resnet32', 'algorithms.squeeze_excite=null'], DEEPER,
                 id='other-depth-without-the-algorithm'),
    pytest.param(['model.num_classes=5'],
                 'at layer module.fc, module.fc.weight is (10, 64) in the checkpoint and (5, 64) in the model',
                 id='other-num_classes'),
])
def test_a_checkpoint_for_another_model_is_refused_before_anything_is_loaded(overrides, message, reference, tmp_path):
    save = tmp_path / 'new'
    status, _, err = run(f'checkpoint.load_path={reference[0]}/ep1-ba10-rank0.pt', f'checkpoint.save_folder={save}',
                         *overrides)
    assert status == 2
    line = error_line(err)
    assert f'checkpoint.load_path {reference[0]}/ep1-ba10-rank0.pt does not fit the model: {message}' in line, line
    assert not save.exists() or not os.listdir(save)  # nothing written
    if overrides == ['algorithms.squeeze_excite=null']:
        assert 'add algorithms.squeeze_excite with the arguments of SqueezeExcite(' in line
    if 'model.name=resnet32' in overrides:  # another architecture: SE is not blamed
        assert ('The checkpoint was saved from a different model; use the model settings (model.name, '
                'model.num_classes) of the run that saved it') in line
        assert 'SqueezeExcite(' not in line


def test_a_plain_checkpoint_is_refused_as_load_path_and_starts_se_as_model_weights(plain_checkpoint, tmp_path):
    status, _, err = run(f'checkpoint.load_path={plain_checkpoint}')
    assert status == 2
    line = error_line(err)
    assert ('the model has an SE block there (module.layer3.0.conv1.se.fc1.weight (64, 64)) and the checkpoint has '
            'none') in line
    assert 'saved without SqueezeExcite' in line
    assert 'pass the file as model.weights instead of checkpoint.load_path' in line

    status, out, err = run(f'model.weights={plain_checkpoint}', 'max_duration=1ba')  # the fine-tuning start
    assert status == 0 and 'SqueezeExcite: 7 SE blocks' in out, err[-3000:]


def test_model_weights_take_a_composer_checkpoint_before_se_is_added(plain_checkpoint):
    from composer_se.recipes.config import ModelConfig
    from composer_se.recipes.models import build_module
    module = build_module(ModelConfig(name='resnet20', weights=str(plain_checkpoint)))
    saved = read_checkpoint(plain_checkpoint)['state']['model']
    assert all(torch.equal(value, saved[f'module.{key}']) for key, value in module.state_dict().items())


@pytest.mark.parametrize('damage', ['cut-short', 'bytes-changed', 'not-a-checkpoint'])
def test_a_damaged_checkpoint_is_named(damage, reference, tmp_path):
    path = tmp_path / 'damaged.pt'
    data = (reference[0] / 'ep0-ba2-rank0.pt').read_bytes()
    if damage == 'cut-short':
        data = data[:len(data) // 2]
    elif damage == 'bytes-changed':  # inside a weight tensor: torch.load alone would not notice
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]
    else:
        data = b'not a checkpoint\n' * 10
    path.write_bytes(data)
    status, _, err = run(f'checkpoint.load_path={path}')
    assert status == 2
    line = error_line(err)
    assert f'checkpoint.load_path {path} is damaged or not a PyTorch checkpoint (' in line
    assert 'load an earlier checkpoint of the run instead, or delete this one' in line
    if damage == 'bytes-changed':
        assert 'checksum mismatch in ' in line


# --- 3. bad data --------------------------------------------------------------------------------------------------


def imagefolder(root: Path, *overrides: str) -> list[str]:
    return ['data.source=imagefolder', f'data.root={root}', 'model.num_classes=2', 'data.image_size=16', *overrides]


def test_an_empty_data_folder_is_named(tmp_path):
    (tmp_path / 'empty').mkdir()
    status, _, err = run(*imagefolder(tmp_path / 'empty'))
    assert status == 2
    assert (f'split folder {tmp_path}/empty/train does not exist; data.root must hold train/<class>/<image>'
            in error_line(err))


def test_a_class_folder_without_images_is_named(tmp_path):
    root = write_image_tree(tmp_path / 'images')
    for image in (root / 'train' / 'dog').iterdir():
        image.unlink()
    (root / 'train' / 'dog' / 'notes.txt').write_text('no images here')
    status, _, err = run(*imagefolder(root))
    assert status == 2
    assert (f'{root}/train is not a folder of class folders of images: Found no valid file for the classes dog'
            in error_line(err))


def test_more_class_folders_than_classes_is_refused(tmp_path):
    root = write_image_tree(tmp_path / 'images', classes=('cat', 'dog', 'fox'))
    status, _, err = run(*imagefolder(root))
    assert status == 2
    assert (f'{root}/train has 3 class folders but model.num_classes is 2, so the labels of fox would be out of '
            f'range: set model.num_classes=3') in error_line(err)


def test_evaluation_classes_that_differ_from_training_classes_are_refused(tmp_path):
    root = write_image_tree(tmp_path / 'images')
    (root / 'val' / 'dog').rename(root / 'val' / 'wolf')
    status, _, err = run(*imagefolder(root))
    assert status == 2
    assert 'differ (not in both: dog, wolf), so a label would name different classes' in error_line(err)


def test_cifar10_with_fewer_than_ten_classes_is_refused():
    status, _, err = run('data.source=cifar10', 'data.root=/nonexistent', 'model.num_classes=5')
    assert status == 2
    assert 'CIFAR-10 has 10 classes but model.num_classes is 5: set model.num_classes=10' in error_line(err)


@pytest.mark.parametrize('damage', ['not-an-image', 'cut-short'])
def test_an_unreadable_image_stops_the_run_naming_the_file(damage, tmp_path):
    """Policy: stop. The error names the file, also from a dataloader worker process."""
    root = write_image_tree(tmp_path / 'images')
    bad = root / 'train' / 'dog' / '3.png'
    if damage == 'not-an-image':
        bad.write_text('this is not an image')
    else:
        truncate(bad)
    (root / 'train' / 'cat' / 'notes.txt').write_text('not an image extension: not a sample')
    config = DataConfig(source='imagefolder', root=str(root), image_size=16, num_workers=1)
    loader = build_dataloader(config, 2, True, 16, 0).dataloader
    assert len(loader.dataset) == 16  # notes.txt is not a sample
    with pytest.raises(DataError, match=f'image file {re.escape(str(bad))} cannot be read'):
        list(loader)

    status, _, err = run(*imagefolder(root, 'data.num_workers=1'))
    assert status == 1
    assert f'composer_se.train: error: image file {bad} cannot be read (' in error_line(err)
    assert 'delete or replace it, then relaunch' in err


def test_a_streaming_label_outside_the_classes_stops_the_run_naming_the_sample(tmp_path):
    root = write_mds(tmp_path / 'mds', per_split=8, num_labels=3)
    config = DataConfig(source='streaming', local=str(root), image_size=16)
    loader = build_dataloader(config, 2, True, 8, 0).dataloader
    with pytest.raises(DataError, match=r"sample \d+ of the streaming split 'train' has label 2, outside 0 \.\. 1 "
                       r'\(model.num_classes=2\)'):
        list(loader)


# --- 4. nonsense values: refused before training ------------------------------------------------------------------


@pytest.mark.parametrize('override, message', [
    ('max_duration=-1ep', "max_duration must be positive (such as 4ep or 500ba), got '-1ep'"),
    ('max_duration=0ba', "max_duration must be positive (such as 4ep or 500ba), got '0ba'"),
    ('max_duration=3', "max_duration must be counted in ep, ba, sp, tok (such as 4ep or 500ba), got '3'"),
    ('max_duration=1.5ep', "max_duration must be a duration such as 4ep or 500ba, got '1.5ep'"),
    ('eval_interval=0ep', "eval_interval must be positive (such as 4ep or 500ba), got '0ep'"),
    ('checkpoint.save_interval=-2ba', "checkpoint.save_interval must be positive (such as 4ep or 500ba), got '-2ba'"),
    ('global_batch_size=0', 'global_batch_size must be at least 1, got 0'),
    ('eval_batch_size=-4', 'eval_batch_size must be at least 1, got -4'),
    ('device_train_microbatch_size=0', 'device_train_microbatch_size must be at least 1 (or null for the whole batch)'),
    ('seed=-1', 'seed must be between 0 and 2**32 - 1, got -1'),
    ('checkpoint.save_num_checkpoints_to_keep=-5', 'checkpoint.save_num_checkpoints_to_keep must be -1 (keep all), 0 '
     'or more, got -5'),
    ('data.synthetic_train_samples=0', 'data.synthetic_train_samples must be at least 1, got 0'),
    ('data.augmentation=autoaugment', "unknown data.augmentation 'autoaugment'; choose one of cifar, imagenet"),
    ('optimizer.momentum=1.5', 'optimizer.momentum must be in [0, 1), got 1.5'),
    ('scheduler.t_warmup=-1ep', "scheduler.t_warmup must be 0 or more (such as 5ep or 500ba), got '-1ep'"),
    ('scheduler.alpha_f=2', 'scheduler.alpha_f must be in [0, 1] (the final lr as a fraction of the peak), got 2.0'),
    ('checkpoint.load_path=/nonexistent/ep1.pt', 'checkpoint.load_path /nonexistent/ep1.pt does not exist'),
    ('algorithms.fancy_se={}', "unknown algorithm 'fancy_se'. Choose one of: augmix, blurpool"),
    ('model.name=resnet1000', "unknown model.name 'resnet1000'"),
    ('data.source=folder', "unknown data.source 'folder'; choose one of cifar10, imagefolder, streaming, synthetic"),
])
def test_nonsense_values_are_refused_before_training(override, message):
    status, out, err = run(override)
    assert status == 2
    assert message in error_line(err)
    assert 'SqueezeExcite:' not in out  # no Trainer was built


# --- 6. security --------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling it with torch.load(weights_only=False) creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), 'w'))


def test_a_checkpoint_that_would_run_code_is_not_loaded(tmp_path):
    marker = tmp_path / 'code-ran'
    evil = tmp_path / 'evil.pt'
    torch.save({'state': {'model': {}}, 'payload': _RunsCode(marker)}, evil)
    status, _, err = run(f'checkpoint.load_path={evil}')
    assert status == 2
    assert (f'checkpoint.load_path {evil} holds a reference to io.open; loading it could run code from the '
            f'file, so it is not loaded' in error_line(err))
    status, _, err = run(f'model.weights={evil}')
    assert status == 2 and f'model.weights file {evil} holds a reference to io.open' in error_line(err)
    assert not marker.exists()


def test_composer_reads_the_checkpoint_with_weights_only(reference, tmp_path, monkeypatch):
    calls = []
    original = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **k: calls.append(k.get('weights_only')) or original(*a, **k))
    status, out, err = run(f'checkpoint.load_path={reference[0]}/ep1-ba16-rank0.pt',
                           'checkpoint.load_weights_only=true', 'max_duration=1ba')
    assert status == 0 and f'loaded checkpoint {reference[0]}/ep1-ba16-rank0.pt' in out, err[-3000:]
    assert calls and all(calls), calls


def test_a_recipe_cannot_build_python_objects(tmp_path):
    marker = tmp_path / 'code-ran'
    recipe = tmp_path / 'evil.yaml'
    recipe.write_text(f'base: {DEMO}\nrun_name: !!python/object/apply:pathlib.Path.touch [{marker}]\n')
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(recipe)])
    assert status == 2 and f'recipe {recipe} is not valid YAML' in error_line(err.getvalue())
    assert not marker.exists()


@pytest.mark.parametrize('override, message', [
    ('optimizer.name=torch.optim.SGD', "unknown optimizer.name 'torch.optim.SGD'"),
    ('algorithms.os.system={}', "unknown algorithm 'os'"),
    ('model.name=os.system', "unknown model.name 'os.system'"),
    ('run_name=../../elsewhere', "run_name must be a plain name of letters, digits, \".\", \"_\" and \"-\" (it becomes "
     "part of file names), got '../../elsewhere'"),
    ('data.train_split=../../etc', 'data.train_split must be the name of a folder inside the data root'),
])
def test_names_in_a_recipe_are_looked_up_never_imported_or_used_as_paths(override, message):
    status, _, err = run(override)
    assert status == 2 and message in error_line(err)


def test_a_run_writes_only_inside_its_save_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run('run_name=contained', 'checkpoint.save_folder=runs/{run_name}', 'max_duration=4ba')
    assert status == 0, err[-3000:]
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob('*') if not path.is_dir())
    assert written == ['runs/contained/ep0-ba2-rank0.pt', 'runs/contained/ep0-ba4-rank0.pt',
                       'runs/contained/latest-rank0.pt']


def test_every_row_of_the_readme_table_names_tests_that_exist():
    text = (ROOT / 'README.md').read_text()
    table = text.split('## What happens when')[1].split('\n## ')[0]
    rows = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| situation')]
    assert len(rows) >= 15
    for row in rows:
        tests = re.findall(r'`([\w./]+\.py)(?:::(\w+))?(?:\[[^\]]+\])?`|`::(\w+)(?:\[[^\]]+\])?`', row.split(' | ')[-1])
        assert tests, row
        current = None
        for file, name, same_file_name in tests:
            current = file or current
            source = (ROOT / 'tests' / current).read_text()
            for test in filter(None, (name, same_file_name)):
                assert f'def {test}(' in source, (current, test)
