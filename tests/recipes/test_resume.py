"""composer_se/recipes/resume.py: checkpoint files of a save folder, autoresume after a kill, and safe loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from composer.utils import checkpoint as composer_checkpoint
from torch import nn

from composer_se.checkpoints import CheckpointError
from composer_se.recipes.resume import ORPHANS_FOLDER, checkpoint_files, composer_loads_safely, prepare_autoresume

LINK = 'latest-rank0.pt'


def name(batch: int, rank: int = 0) -> str:
    return f'ep{batch // 4}-ba{batch}-rank{rank}.pt'


def save_folder(folder: Path, batches, link_to=None, cut_short=()) -> dict[str, bytes]:
    """Checkpoint files (real zip archives) for ``batches``, those in ``cut_short`` truncated, and the latest link to
    ``link_to``: each file's bytes."""
    folder.mkdir(exist_ok=True)
    written = {}
    for batch in batches:
        path = folder / name(batch)
        torch.save({'state': {'model': {'w': torch.full((16,), float(batch))}}}, path)
        if batch in cut_short:
            path.write_bytes(path.read_bytes()[:200])
        written[name(batch)] = path.read_bytes()
    if link_to is not None:
        os.symlink(name(link_to), folder / LINK)
    return written


def test_checkpoint_files_are_sorted_by_batch_and_other_names_ignored(tmp_path):
    for file in (name(10), name(2), name(4, rank=1), name(4), 'latest-rank0.pt', name(6) + '.tmp', 'notes.txt'):
        (tmp_path / file).write_bytes(b'')
    (tmp_path / ORPHANS_FOLDER).mkdir()
    assert checkpoint_files(tmp_path) == [(2, name(2)), (4, name(4)), (4, name(4, rank=1)), (10, name(10))]
    assert checkpoint_files(tmp_path / 'absent') == []


def test_files_newer_than_the_links_target_are_moved_aside_and_never_deleted(tmp_path):
    written = save_folder(tmp_path, (2, 4, 6, 8), link_to=4, cut_short=(8,))
    resumed, notes = prepare_autoresume(tmp_path)
    assert resumed == str(tmp_path / name(4))
    assert checkpoint_files(tmp_path) == [(2, name(2)), (4, name(4))]
    aside = tmp_path / ORPHANS_FOLDER
    assert sorted(os.listdir(aside)) == [name(6), name(8)]
    assert all((aside / file).read_bytes() == written[file] for file in (name(6), name(8)))
    assert os.readlink(tmp_path / LINK) == name(4)
    assert len(notes) == 1 and notes[0].startswith('moved 2 checkpoint file(s)') and f'{name(6)}, {name(8)}' in notes[0]


def test_a_folder_whose_link_is_the_newest_is_left_as_it_is(tmp_path):
    save_folder(tmp_path, (2, 4), link_to=4)
    before = sorted(os.listdir(tmp_path))
    assert prepare_autoresume(tmp_path) == (str(tmp_path / name(4)), [])
    assert sorted(os.listdir(tmp_path)) == before  # no orphans folder either
    assert prepare_autoresume(tmp_path / 'empty') == (None, [])


def test_without_a_link_it_points_again_to_the_newest_intact_checkpoint(tmp_path):
    written = save_folder(tmp_path, (2, 4, 6), cut_short=(6,))
    resumed, notes = prepare_autoresume(tmp_path)
    assert resumed == str(tmp_path / name(4))
    assert os.readlink(tmp_path / LINK) == name(4)  # relative, as Composer makes it
    assert notes[0] == f'{tmp_path / LINK} was missing; it now points to {name(4)}, the newest intact checkpoint'
    assert len(notes) == 2 and notes[1].startswith('moved 1 checkpoint file(s)')
    assert (tmp_path / ORPHANS_FOLDER / name(6)).read_bytes() == written[name(6)]
    assert checkpoint_files(tmp_path) == [(2, name(2)), (4, name(4))]


def test_without_a_link_or_an_intact_checkpoint_everything_is_moved_aside_for_a_fresh_start(tmp_path):
    save_folder(tmp_path, (2, 4), cut_short=(2, 4))
    (tmp_path / ORPHANS_FOLDER).mkdir()
    (tmp_path / ORPHANS_FOLDER / name(4)).write_bytes(b'an earlier orphan')
    resumed, notes = prepare_autoresume(tmp_path)
    assert resumed is None and len(notes) == 1
    assert not (tmp_path / LINK).exists() and not (tmp_path / LINK).is_symlink()
    assert checkpoint_files(tmp_path) == []
    aside = tmp_path / ORPHANS_FOLDER
    assert sorted(os.listdir(aside)) == [name(2), name(4), name(4) + '.1']
    assert (aside / name(4)).read_bytes() == b'an earlier orphan'  # not overwritten


def test_a_link_to_a_missing_file_is_an_error_and_a_plain_file_in_its_place_is_kept(tmp_path):
    save_folder(tmp_path / 'dangling', (2,))
    os.symlink(name(4), tmp_path / 'dangling' / LINK)
    with pytest.raises(CheckpointError, match=rf'points to .*{name(4)}, which does not exist'):
        prepare_autoresume(tmp_path / 'dangling')
    assert (tmp_path / 'dangling' / name(2)).exists()
    save_folder(tmp_path / 'plain', (2, 4))
    (tmp_path / 'plain' / LINK).write_bytes(b'')
    assert prepare_autoresume(tmp_path / 'plain') == (str(tmp_path / 'plain' / LINK), [])
    assert len(checkpoint_files(tmp_path / 'plain')) == 2


def test_composer_loads_safely_reads_and_checks_checkpoints_while_it_lasts(tmp_path):
    original = composer_checkpoint._torch_load_with_validation
    model = nn.Sequential(nn.Linear(3, 4))
    fits, other = tmp_path / 'fits.pt', tmp_path / 'other.pt'
    torch.save({'state': {'model': model.state_dict()}}, fits)
    torch.save({'state': {'model': nn.Sequential(nn.Linear(3, 5)).state_dict()}}, other)
    with composer_loads_safely(model, source='checkpoint.load_path'):
        reader = composer_checkpoint._torch_load_with_validation
        assert reader is not original
        loaded = reader(str(fits), 'cpu')
        torch.testing.assert_close(loaded['state']['model']['0.weight'], model[0].weight.detach())
        with pytest.raises(CheckpointError) as caught:
            reader(str(other), 'cpu')
    assert composer_checkpoint._torch_load_with_validation is original
    text = str(caught.value)
    assert text.startswith('checkpoint.load_path does not fit the model: at layer 0, 0.weight is (5, 3) in '
                           'the checkpoint and (4, 3) in the model')
    assert 'use the model settings (model.name, model.num_classes) of the run that saved it' in text
