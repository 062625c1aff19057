"""composer_se/checkpoints.py: the first difference between a state dict and an SE model, and its message."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from composer_se import apply_squeeze_excite
from composer_se.checkpoints import (ROOT_MODULE, TRAINER_WORDING, CheckpointError, Wording, check_model_state,
                                     find_mismatch)
from tests.helpers import small_cnn

SAVED_CALL = 'SqueezeExcite(latent_channels=4, min_channels=16)'
CURRENT_CALL = 'SqueezeExcite(latent_channels=2, min_channels=16)'


def se_cnn(latent_channels: int = 4, num_classes: int = 4) -> nn.Sequential:
    """``small_cnn`` with SE blocks on its convs of 16 and 32 output channels (hosts '0' and '3.0')."""
    model = small_cnn(num_classes)
    apply_squeeze_excite(model, latent_channels, 16)
    return model


def net(width: int) -> nn.Sequential:
    """conv (3 -> width) -> BatchNorm -> ReLU -> conv (width -> 4): two layers whose shapes follow ``width``."""
    return nn.Sequential(nn.Conv2d(3, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 4, 1))


def message(saved, model, **kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        check_model_state(saved, model, source='checkpoint run.pt', **kwargs)
    return str(caught.value)


def test_a_state_dict_of_the_same_model_passes():
    model = se_cnn()
    saved = se_cnn().state_dict()  # other values, same entries and shapes
    assert find_mismatch(saved, model) is None
    assert find_mismatch(saved, model, partial=True) is None
    check_model_state(saved, model, source='checkpoint run.pt')


def test_a_checkpoint_with_se_blocks_for_a_model_without_them_says_to_add_the_algorithm_in_the_wording_given():
    saved = se_cnn().state_dict()
    mismatch = find_mismatch(saved, small_cnn())
    assert (mismatch.kind, mismatch.layer, mismatch.key) == ('no_se_model', '0', '0.se.gate_scale')
    assert mismatch.detail == 'the checkpoint has an SE block there (0.se.fc1.weight (4, 16)) and the model has none'
    assert mismatch.count == 10  # five entries in each of the two blocks
    text = message(saved, small_cnn(), saved_call=SAVED_CALL)
    assert text.startswith('checkpoint run.pt does not fit the model: at layer 0, the checkpoint has an SE block')
    assert f'add the algorithm: Trainer(..., algorithms=[{SAVED_CALL}])' in text
    wording = Wording(no_se_saved='drop SE', no_se_model='add {saved} to the recipe', se='match', other='rebuild')
    text = message(saved, small_cnn(), saved_call=SAVED_CALL, wording=wording)
    assert text.endswith(f'this model has no SE blocks: add {SAVED_CALL} to the recipe.')


def test_a_checkpoint_without_se_blocks_for_a_model_with_them_says_how_to_fine_tune():
    mismatch = find_mismatch(small_cnn().state_dict(), se_cnn())
    assert (mismatch.kind, mismatch.layer, mismatch.count) == ('no_se_saved', '0', 10)
    assert mismatch.detail == 'the model has an SE block there (0.se.fc1.weight (4, 16)) and the checkpoint has none'
    text = message(small_cnn().state_dict(), se_cnn())
    assert 'saved without SqueezeExcite' in text
    assert TRAINER_WORDING.no_se_saved in text


def test_se_blocks_of_another_width_name_the_key_both_shapes_and_both_calls():
    saved, model = se_cnn(latent_channels=4).state_dict(), se_cnn(latent_channels=2)
    mismatch = find_mismatch(saved, model)
    assert (mismatch.kind, mismatch.layer, mismatch.key) == ('se', '0', '0.se.fc1.weight')
    assert mismatch.detail == '0.se.fc1.weight is (4, 16) in the checkpoint and (2, 16) in the model'
    assert mismatch.count == 6  # fc1.weight, fc1.bias, fc2.weight of both blocks; fc2.bias and gate_scale agree
    text = message(saved, model, saved_call=SAVED_CALL, current_call=CURRENT_CALL)
    assert '0.se.fc1.weight is (4, 16) in the checkpoint and (2, 16) in the model (6 entries differ)' in text
    assert f'saved with {SAVED_CALL} and this run uses {CURRENT_CALL}' in text
    text = message(saved, model, saved_call=SAVED_CALL, current_call=SAVED_CALL)
    assert 'the models differ before SE was added' in text
    assert SAVED_CALL not in text  # the two calls are the same: naming them would explain nothing


def test_a_model_of_another_width_is_a_different_model_whatever_its_se_blocks_and_calls():
    saved, model = net(16), net(24)
    apply_squeeze_excite(saved, 4, 16)
    apply_squeeze_excite(model, 4, 16)
    mismatch = find_mismatch(saved.state_dict(), model)
    assert mismatch.kind == 'other'
    assert (mismatch.layer, mismatch.key) == ('0', '0.weight')  # the first non-SE entry, not 0.se.*
    text = message(saved.state_dict(), model, saved_call=SAVED_CALL, current_call=SAVED_CALL)
    assert 'The checkpoint was saved from a different model; build the same model as the run that saved it.' in text
    assert 'SqueezeExcite(' not in text  # the two calls are the same: naming them would explain nothing


def test_a_module_of_the_network_called_se_is_an_ordinary_layer():
    def model(features: int) -> nn.Module:
        return nn.Sequential(OrderedDict(body=nn.Sequential(OrderedDict(se=nn.Linear(3, features)))))

    mismatch = find_mismatch(model(5).state_dict(), model(6))
    assert (mismatch.kind, mismatch.layer, mismatch.key) == ('other', 'body.se', 'body.se.weight')


def test_partial_state_dicts_are_checked_only_where_they_hold_a_host_module():
    model = se_cnn()
    state = model.state_dict()
    head = {k: v for k, v in state.items() if k.startswith('8.')}
    assert find_mismatch(head, model, partial=True) is None
    assert find_mismatch(head, model).kind == 'other'  # the rest is missing
    host_without_block = {'0.weight': state['0.weight']}
    mismatch = find_mismatch(host_without_block, model, partial=True)
    assert (mismatch.kind, mismatch.layer, mismatch.count) == ('no_se_saved', '0', 5)  # '3.0' is not covered
    extra_block = {**state, **{k.replace('3.0.se', '4.se'): v for k, v in state.items() if k.startswith('3.0.se.')}}
    mismatch = find_mismatch(extra_block, model, partial=True)
    assert (mismatch.kind, mismatch.layer) == ('se', '4')
    assert 'the checkpoint has an SE block there' in mismatch.detail
    elsewhere = {'9.se.fc1.weight': torch.zeros(4, 16)}  # a host the model does not have: not part of this model
    assert find_mismatch(elsewhere, model, partial=True) is None


def test_checking_never_changes_the_model_or_the_state_dict():
    model, saved = se_cnn(latent_channels=2), se_cnn(latent_channels=4).state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved_before = {k: v.clone() for k, v in saved.items()}
    structure = repr(model)
    message(saved, model, saved_call=SAVED_CALL, current_call=CURRENT_CALL)
    message(saved, model, partial=True)
    assert repr(model) == structure
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert list(saved) == list(saved_before) and all(torch.equal(saved[k], v) for k, v in saved_before.items())


def test_a_block_on_the_root_module_counts_in_a_partial_check_both_ways():
    """A lone conv with SE hosts its block at the root (keys ``se.*``): a partial state dict that holds the conv's
    weights must hold its block too, and may not bring one to a plain conv."""
    se_conv, plain_conv = nn.Conv2d(3, 16, 3), nn.Conv2d(3, 16, 3)
    apply_squeeze_excite(se_conv, 4, 16)
    mismatch = find_mismatch(plain_conv.state_dict(), se_conv, partial=True)
    assert mismatch is not None and mismatch.layer == ROOT_MODULE and 'the checkpoint has none' in mismatch.detail
    mismatch = find_mismatch(se_conv.state_dict(), plain_conv, partial=True)
    assert mismatch is not None and mismatch.layer == ROOT_MODULE and 'the model has none' in mismatch.detail
    assert find_mismatch(se_conv.state_dict(), se_conv, partial=True) is None
