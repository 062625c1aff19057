"""composer_se/optimizer_groups.py: which optimizer param group an SE block joins, and joining it."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from composer_se.layers import SqueezeExcite2d
from composer_se.optimizer_groups import as_optimizers, groups_for, join, param_index

BLOCK_NAMES = ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']


def two_convs() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))


def decay_groups(model: nn.Module) -> torch.optim.SGD:
    """Weights in group 0 (with weight decay), biases in group 1."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return torch.optim.SGD([{'params': weights, 'weight_decay': 1e-4}, {'params': biases, 'weight_decay': 0.0}],
                           lr=0.1)


def test_as_optimizers_makes_a_tuple_of_none_one_or_several_and_refuses_anything_else_by_name():
    model = two_convs()
    first, second = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.Adam(model[1].parameters())
    assert as_optimizers(None) == ()
    assert as_optimizers(first) == (first,)
    assert as_optimizers([first, second]) == (first, second)
    assert as_optimizers(iter([second])) == (second,)
    for bad, shown in ((0.1, 'float: 0.1'), ([first, 'adam'], "list: [SGD")):
        with pytest.raises(TypeError, match=f'optimizers must be a torch.optim.Optimizer, a sequence of them, or None, '
                                            f'got {re.escape(shown)}'):
            as_optimizers(bad)


def test_param_index_lists_every_group_holding_a_parameter_with_its_name_there():
    model = two_convs()
    plain = decay_groups(model)
    named = torch.optim.SGD(model[1].named_parameters(), lr=0.1)
    index = param_index([plain, named])
    assert set(index) == {id(p) for p in model.parameters()}
    (entry,) = index[id(model[0].weight)]
    assert entry[0] is plain.param_groups[0] and entry[1] is None
    (entry,) = index[id(model[0].bias)]
    assert entry[0] is plain.param_groups[1] and entry[1] is None
    first, second = index[id(model[1].weight)]
    assert first[0] is plain.param_groups[0] and first[1] is None
    assert second[0] is named.param_groups[0] and second[1] == 'weight'
    assert param_index([]) == {}


def test_a_block_joins_the_group_of_its_anchor_weight_in_every_optimizer_holding_it():
    model = two_convs()
    plain = decay_groups(model)
    wrapped = torch.optim.SGD([{'params': [model[1].weight], 'param_names': ['module.1.weight']}], lr=0.1)
    optimizers = (plain, wrapped)
    index = param_index(optimizers)
    first, second = groups_for('1', '1.weight', model[1].weight, optimizers, index)
    assert first[0] is plain.param_groups[0] and first[1] == '1.se.'
    assert second[0] is wrapped.param_groups[0] and second[1] == 'module.1.se.'  # the group's own names lead
    root = nn.Conv2d(3, 8, 3)
    solo = decay_groups(root)
    (target,) = groups_for('', 'weight', root.weight, (solo,), param_index((solo,)))
    assert target[0] is solo.param_groups[0] and target[1] == 'se.'


def test_a_frozen_anchor_falls_back_to_the_only_group_there_is():
    model = two_convs()
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    index = param_index((optimizer,))
    (target,) = groups_for('0', '0.weight', model[0].weight, (optimizer,), index)
    assert target[0] is optimizer.param_groups[0] and target[1] == '0.se.'
    (target,) = groups_for('0', '0.weight', None, (optimizer,), index)
    assert target[0] is optimizer.param_groups[0]
    assert groups_for('0', '0.weight', model[0].weight, (), {}) == []  # no optimizer: nothing to join


def test_an_anchor_in_none_of_several_groups_is_an_error_naming_it_and_the_way_out():
    model = two_convs()
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([{'params': [model[0].bias]}, {'params': list(model[1].parameters())}], lr=0.1)
    with pytest.raises(ValueError, match=r"weight '0\.weight' .* SE block at '0' is in none of the 2 optimizer param "
                                         r"groups.*exclude=\['0'\]"):
        groups_for('0', '0.weight', model[0].weight, (optimizer,), param_index((optimizer,)))


def test_join_appends_the_block_to_each_group_and_keeps_param_names_in_step():
    model = two_convs()
    named = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    block = SqueezeExcite2d(8, 2)
    join(block, [(named.param_groups[0], '0.se.'), (plain.param_groups[0], 'ignored.')])
    named_group, plain_group = named.param_groups[0], plain.param_groups[0]
    assert named_group['params'][-4:] == list(block.parameters())
    assert named_group['param_names'] == ['0.weight', '0.bias', '1.weight', '1.bias'] + ['0.se.' + n for n in
                                                                                        BLOCK_NAMES]
    assert len(named_group['param_names']) == len(named_group['params'])
    assert plain_group['params'][-4:] == list(block.parameters()) and 'param_names' not in plain_group
    before = [p.detach().clone() for p in block.parameters()]
    block(model(torch.randn(2, 3, 6, 6))).square().sum().backward()
    named.step()
    assert all(not torch.equal(p, b) for p, b in zip(block.parameters(), before))  # the optimizer steps the block
