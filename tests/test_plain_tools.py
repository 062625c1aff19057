"""Across the package: what works on a plain model works on its SE model, on every family of the zoo and timm's.

Three SE models of each: folded into the next BatchNorm (the default), unfolded
(``fold_batchnorm=False``) and, for residual networks, the paper's placement. On each:

- an empty batch gives the plain model's empty output in training and eval, a backward
  pass, and leaves the running statistics as plain BatchNorms leave them;
- torchvision's ``create_feature_extractor`` (timm's, for timm models, which keeps timm's
  leaf modules) traces the model with ``torch.fx``, and the traced module computes what
  the eager model computes, in training (outputs and running statistics) and eval, with
  a feature tap after an SE block returning what a hook on that block sees;
- ``torch.fx.experimental.optimization.fuse`` fuses it for inference, exactly, wherever
  it fuses the plain model.
"""

from __future__ import annotations

import copy
import inspect
from typing import Optional

import pytest
import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from tests.zoo import SE_MODELS, SeModel, close, one_thread  # noqa: F401 - one_thread: an autouse fixture


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # GoogLeNet and Inception v3 in training


@pytest.mark.filterwarnings('ignore:Scripted (GoogleNet|Inception3) always returns')
@pytest.mark.parametrize('case', SE_MODELS, ids=str)
def test_empty_batch(case: SeModel):
    plain, model, _ = case.models()
    empty = torch.randn(0, 3, case.size, case.size, dtype=torch.float64)
    for training in (True, False):
        outputs = []
        for net in (plain, model):
            net.train(training)
            out = _first(net(empty))
            if training:
                out.sum().backward()
            outputs.append(out)
        assert outputs[1].shape == outputs[0].shape == (0, 10)
        state = model.state_dict()
        for key, value in plain.state_dict().items():  # plain BatchNorms count the batch, keep the statistics
            assert torch.equal(state[key], value), key
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(not g.any() for g in grads)


def _leaf_types(is_timm: bool) -> tuple[type, ...]:
    """The modules the feature extractor calls without tracing into them: torchvision's ops (its
    ``Conv2dNormActivation`` holds a conv and its BatchNorm), and, for timm, those timm registers (``BatchNormAct2d``)."""
    import torchvision
    types = [obj for _, obj in inspect.getmembers(torchvision.ops)
             if inspect.isclass(obj) and issubclass(obj, nn.Module)]
    if is_timm:
        from timm.layers import _fx
        types += _fx.get_notrace_modules()
    return tuple(types)


def _tap_name(model: nn.Module, blocks: dict[str, Optional[str]], nodes: list[str], leaves: tuple[type, ...]) -> str:
    """A module to tap after an SE block: the first block's own ``se`` that the graph shows; where none is shown,
    the leaf module that applies the first block, which must be one of ``leaves``."""
    def shown(name: str) -> bool:  # a node of its own, or nodes inside it (the extractor taps the last)
        return any(node == name or node.startswith(f'{name}.') for node in nodes)

    for name in blocks:
        if shown(f'{name}.se'):
            return f'{name}.se'
    first = next(iter(blocks))
    for start in (blocks[first], first):
        name = start
        while name and not shown(name):
            name = name.rsplit('.', 1)[0] if '.' in name else ''
        if name:
            assert isinstance(model.get_submodule(name), leaves), f'the graph shows none of the blocks {list(blocks)}'
            return name
    raise AssertionError(f'nothing of {first} is in the graph')


@pytest.mark.filterwarnings('ignore:Scripted (GoogleNet|Inception3) always returns')
@pytest.mark.parametrize('case', SE_MODELS, ids=str)
def test_fx_feature_extraction(case: SeModel):
    _, model, blocks = case.models()
    if case.is_timm:
        from timm.models._features_fx import create_feature_extractor as extractor
        from timm.models._features_fx import get_graph_node_names as node_names
    else:
        extractor, node_names = create_feature_extractor, get_graph_node_names
    x = torch.randn(2, 3, case.size, case.size, dtype=torch.float64)
    for training in (True, False):
        eager = copy.deepcopy(model).train(training)
        nodes = node_names(eager)[0 if training else 1]
        tap = _tap_name(eager, blocks, nodes, _leaf_types(case.is_timm))
        traced = extractor(copy.deepcopy(eager), return_nodes={tap: 'tap', nodes[-1]: 'out'}).train(training)
        seen = []
        eager.get_submodule(tap).register_forward_hook(lambda module, args, out: seen.append(out.clone()))
        torch.manual_seed(2)  # the same dropout masks
        expected = _first(eager(x))
        torch.manual_seed(2)
        got = traced(x)
        what = f'{"training" if training else "eval"}, traced'
        close(got['out'], expected, f'{what} output')
        close(got['tap'], seen[0], f'{what} tap at {tap}')
        state = traced.state_dict()
        for key, value in eager.state_dict().items():
            if key in state:
                close(state[key], value, f'{what}: {key}')


def _fx_fused(model: nn.Module) -> nn.Module:
    return fx_optimization.fuse(model.eval())


@pytest.mark.parametrize('case', SE_MODELS, ids=str)
def test_fx_fuse(case: SeModel):
    plain, model, _ = case.models()
    try:
        _fx_fused(copy.deepcopy(plain))
    except Exception as error:  # torch.fx.symbolic_trace cannot trace this plain model either
        pytest.skip(f'fx fuse fails on the plain {case.family} too: {type(error).__name__}')
    x = torch.randn(2, 3, case.size, case.size, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        close(_first(_fx_fused(copy.deepcopy(model))(x)), _first(model(x)), 'fx-fused eval output')
