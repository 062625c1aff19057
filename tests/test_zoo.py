"""Across the package: SE is drop-in on one model of every torchvision classification CNN family, and on timm CNNs
(``tests/zoo.py``).

For each model: the folded model computes what SE inside the convs computes (float64:
training outputs, gradients, running statistics, eval outputs), it scripts, an optimizer
with two param groups trains the new blocks, every original state-dict key keeps its
name and shape, and no block lands inside an SE module the network already has.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composer_se import SqueezeExciteConv2d, apply_squeeze_excite
from composer_se.placement import registered_attention_modules
from tests.helpers import no_decay_groups
from tests.zoo import TIMM_ZOO, ZOO, Case, close, one_thread  # noqa: F401 - one_thread: an autouse fixture


def assert_drop_in(model: nn.Module, size: int, min_channels: int):
    """The checks of this file on ``model``; returns the report of the folded surgery."""
    torch.manual_seed(0)
    model = model.double()
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    plain = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(no_decay_groups(m), lr=0.01, momentum=0.9) for m in (model, plain)]
    torch.manual_seed(1)
    report = apply_squeeze_excite(model, 4, min_channels, optimizers=optimizers[0])
    torch.manual_seed(1)
    unfolded = apply_squeeze_excite(plain, 4, min_channels, optimizers=optimizers[1], fold_batchnorm=False)
    assert report.names == unfolded.names and report.fold_unavailable is None and unfolded.num_folded == 0

    # Names kept: every original key, same shape; the only new keys are the blocks'.
    state = model.state_dict()
    assert all(key in state and state[key].shape == shape for key, shape in shapes.items())
    new = {f'{name}.se.{key}' for name in report.names for key in ('gate_scale', 'fc1.weight', 'fc1.bias',
                                                                   'fc2.weight', 'fc2.bias')}
    assert set(state) - set(shapes) == new

    # No block inside an SE or attention module of the network.
    for holder in model.modules():
        if isinstance(holder, registered_attention_modules()):
            assert not any(isinstance(m, SqueezeExciteConv2d) for m in holder.modules())

    # One training step, two param groups: same outputs, gradients, weights and running statistics.
    se_before = {id(p): p.detach().clone() for name in report.names for p in model.get_submodule(name).se.parameters()}
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    outputs = []
    for net, optimizer in zip((model, plain), optimizers):
        torch.manual_seed(2)  # the same dropout masks in both
        out = net(x)
        F.cross_entropy(out, torch.arange(4)).backward()
        optimizer.step()
        outputs.append(out.detach())
    close(outputs[0], outputs[1], 'training outputs')
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if q.grad is not None:
            close(p.grad, q.grad, f'gradient of {name}')
    after, plain_after = model.state_dict(), plain.state_dict()
    for key in after:
        close(after[key], plain_after[key], f'{key} after the step')
    decay = {id(p) for p in optimizers[0].param_groups[0]['params']}
    for name in report.names:
        for key, p in model.get_submodule(name).se.named_parameters():
            assert id(p) in decay and not torch.equal(p, se_before[id(p)]), f'{name}.se.{key}'

    # Eval mode (running statistics, so one image will do), eager and scripted.
    model.eval(), plain.eval()
    x = x[:1]
    with torch.no_grad():
        expected = model(x)
        close(expected, plain(x), 'eval outputs')
        with torch.jit.optimized_execution(False):  # no profiling runs: the interpreter's result, at once
            scripted = torch.jit.script(model)(x)
    if isinstance(scripted, tuple):  # GoogLeNet and Inception v3 script to their output tuples
        scripted = scripted[0]
    close(scripted, expected, 'TorchScript eval outputs')
    return report


@pytest.mark.filterwarnings('ignore:Scripted (GoogleNet|Inception3) always returns')
@pytest.mark.parametrize('case', ZOO, ids=lambda case: case.family)
def test_torchvision_family(case: Case):
    report = assert_drop_in(case.build(), case.size, case.min_channels)
    assert (report.num_blocks, report.num_folded) == (case.blocks, case.folded)
    reasons = [reason for _, reason in report.skipped]
    assert reasons == ['inside an SE or attention module (SqueezeExcitation)'] * case.inside_attention


@pytest.mark.parametrize('name, kwargs, size, min_channels, blocks, folded, inside', TIMM_ZOO,
                         ids=[case[0] for case in TIMM_ZOO])
def test_timm_model(name, kwargs, size, min_channels, blocks, folded, inside):
    timm = pytest.importorskip('timm')
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    report = assert_drop_in(model, size, min_channels)
    assert (report.num_blocks, report.num_folded) == (blocks, folded)
    reasons = Counter(reason for _, reason in report.skipped)
    assert reasons == {f'inside an SE or attention module ({kind})': count for kind, count in inside.items()}

