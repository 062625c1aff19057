"""composer_se/batchnorm/launch.py: launch plans. From the second call of a shape on, each launch skips Triton's
binding and specialising of its arguments and goes to the kernel Triton itself would have picked; where a plan cannot
be trusted, Triton's own launch.

Run with the stand-in Triton driver of benchmarks/stand_in_driver.py (each kernel compiled for sm_90, each launch run
by Triton's interpreter), so that Triton's real launch path is the one under test.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from composer_se.batchnorm import se_batch_norm, se_batch_norm_eval
from composer_se.layers import SqueezeExcite2d
from tests.helpers import se_basic_blocks

pytest.importorskip('triton')


@pytest.fixture
def stand_in():
    from benchmarks.stand_in_driver import stand_in_driver
    with stand_in_driver(interpret=True) as driver:
        yield driver


@pytest.fixture
def through_triton(monkeypatch) -> Counter:
    """Counts the launches that go through Triton's own ``kernel[grid](...)``, by kernel."""
    from triton.runtime.jit import JITFunction
    counts = Counter()
    run = JITFunction.run

    def counted(self, *args, **kwargs):
        if not kwargs.get('warmup'):
            counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, 'run', counted)
    return counts


def training_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out


def test_a_second_call_launches_every_kernel_without_triton_and_computes_the_same(stand_in, through_triton,
                                                                                  monkeypatch):
    from composer_se.batchnorm import launch
    assert launch.PLANS_WORK
    launch._PLANS.clear()
    model, blocks = se_basic_blocks('conv')
    unplanned = copy.deepcopy(model)
    x = torch.randn(4, 8, 6, 5)
    training_step(model, x)
    assert sum(through_triton.values()) == 9  # each kernel once through Triton; the other blocks reuse the plan
    through_triton.clear()
    out = training_step(model, x)
    assert sum(through_triton.values()) == 0  # every launch of every block from the plans
    monkeypatch.setattr(launch, 'PLANS_WORK', False)
    for _ in range(2):
        expected = training_step(unplanned, x)
    assert sum(through_triton.values()) == 2 * 9 * blocks
    assert torch.equal(out, expected)
    for (name, p), q in zip(model.named_parameters(), unplanned.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize('se_first', [True, False], ids=['se-bn', 'bn-se'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
def test_each_planned_launch_goes_to_the_kernel_triton_would_pick(stand_in, monkeypatch, se_first, dtype, layout):
    """The call key (shapes, strides, dtypes, alignment) determines Triton's specialisation: on every planned launch,
    Triton's own choice for the same arguments is the compiled kernel the plan holds. Sizes of 1 and multiples of 16
    are among them, which Triton specialises on."""
    from composer_se.batchnorm import launch
    hits = []
    call = launch._PlannedLaunch.__call__

    def recording(self, kernel, grid, *arguments):
        entry = self.compiled.get(id(kernel))
        if entry is not None:
            hits.append((kernel, grid, arguments, entry))
        return call(self, kernel, grid, *arguments)

    monkeypatch.setattr(launch._PlannedLaunch, '__call__', recording)
    for shape, latent in (((16, 32, 1, 2), 16), ((3, 17, 5, 7), 3), ((2, 48, 4, 4), 1)):
        se, norm = SqueezeExcite2d(shape[1], latent), nn.BatchNorm2d(shape[1])
        for _ in range(2):
            u = torch.randn(shape).to(dtype).to(memory_format=layout).requires_grad_()
            out = se_batch_norm(u, se, norm, se_first, 0.1, norm.running_mean, norm.running_var)
            out.float().square().sum().backward()
            with torch.no_grad():
                se_batch_norm_eval(u, se, norm, se_first, norm.running_mean, norm.running_var)
    assert len(hits) >= 3 * 12
    for kernel, grid, arguments, (run, _, _, planned) in hits:
        assert kernel.run(*arguments, grid=grid, warmup=True) is planned, kernel.fn.__name__
        assert planned.run is run


def test_misaligned_tensors_launch_hooks_and_unchecked_triton_versions_go_through_triton(stand_in, through_triton,
                                                                                         monkeypatch):
    from composer_se.batchnorm import launch
    se, norm = SqueezeExcite2d(8, 3), nn.BatchNorm2d(8)
    aligned = torch.randn(4, 8, 5, 5)

    def forward(u):
        return se_batch_norm(u, se, norm, True, 0.1, None, None)

    expected = forward(aligned)
    forward(aligned)
    through_triton.clear()
    misaligned = torch.empty(aligned.numel() + 1)[1:].view_as(aligned).copy_(aligned)  # 4 bytes past 16-byte alignment
    assert misaligned.data_ptr() % 16
    assert torch.equal(forward(misaligned), expected)
    assert sum(through_triton.values()) == 4
    # A launch hook (a profiler reading launches) sees every launch: none skips Triton's launch path.
    try:
        from triton import knobs
        hooks = knobs.runtime
    except ImportError:
        from triton.compiler import CompiledKernel as hooks
    seen = []
    previous = hooks.launch_enter_hook
    if hasattr(previous, 'add'):
        previous.add(seen.append)
        monkeypatch.setattr(previous, 'calls', previous.calls)  # restored by monkeypatch, with the hook in it
        restore = lambda: previous.remove(seen.append)  # noqa: E731
    else:
        monkeypatch.setattr(hooks, 'launch_enter_hook', seen.append)
        restore = None
    through_triton.clear()
    try:
        assert torch.equal(forward(aligned), expected)
    finally:
        if restore is not None:
            restore()
    assert len(seen) == sum(through_triton.values()) == 4
    # A Triton version the plans were not checked against: Triton's launch.
    monkeypatch.setattr(launch, 'PLANS_WORK', False)
    through_triton.clear()
    assert torch.equal(forward(aligned), expected)
    assert sum(through_triton.values()) == 4


def test_launches_per_call_training_and_eval(stand_in, through_triton, monkeypatch):
    """What one call issues: 4 launches forward and 5 backward in either order, 3 in eval; nothing else."""
    from composer_se.batchnorm import launch
    monkeypatch.setattr(launch, 'PLANS_WORK', False)  # every launch through Triton, where it is counted
    se, norm = SqueezeExcite2d(8, 3), nn.BatchNorm2d(8)
    for se_first in (True, False):
        u = torch.randn(4, 8, 5, 5, requires_grad=True)
        through_triton.clear()
        out = se_batch_norm(u, se, norm, se_first, 0.1, norm.running_mean, norm.running_var)
        assert sum(through_triton.values()) == 4
        out.sum().backward()
        assert sum(through_triton.values()) == 9
        through_triton.clear()
        with torch.no_grad():
            se_batch_norm_eval(u, se, norm, se_first, norm.running_mean, norm.running_var)
        assert dict(through_triton) == {'_channel_stats_kernel': 1, '_gate_hidden_kernel': 1,
                                        '_gate_affine_kernel': 1}


def test_plans_are_bounded(stand_in, monkeypatch):
    from composer_se.batchnorm import launch
    monkeypatch.setattr(launch, 'MAX_PLANS', 2)
    launch._PLANS.clear()
    se, norm = SqueezeExcite2d(8, 3), nn.BatchNorm2d(8)
    for size in (3, 4, 5):
        with torch.no_grad():
            se_batch_norm(torch.randn(2, 8, size, size), se, norm, True, 0.1, None, None)
    assert 0 < len(launch._PLANS) <= 2
