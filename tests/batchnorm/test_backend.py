"""composer_se/batchnorm/backend.py: where the fused passes run, read from TRITON_INTERPRET and Triton's driver."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from composer_se.batchnorm import backend

DRIVER_MODULE = 'triton.runtime.driver'


class FakeDriver:
    """A Triton driver as far as ``backend`` looks at it: its torch device, and how often it was asked."""

    def __init__(self, device: str):
        self.device = device
        self.asked = 0

    def get_active_torch_device(self) -> torch.device:
        self.asked += 1
        return torch.device(self.device)


def driver_module(active, default=None, *, old_names: bool = False) -> types.ModuleType:
    """A stand-in for ``triton.runtime.driver``, whose ``driver`` holds the active and the default driver under
    Triton 3.4's attribute names (``_active``, ``_default``) or the older ones (``active``, ``default``)."""
    module = types.ModuleType(DRIVER_MODULE)
    names = ('active', 'default') if old_names else ('_active', '_default')
    module.driver = types.SimpleNamespace(**dict(zip(names, (active, default))))
    return module


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """No interpreter, no cached driver, and no Triton driver module unless a test puts one there."""
    monkeypatch.setattr(backend, '_INTERPRETED', False)
    monkeypatch.setattr(backend, '_CPU_DRIVER', [None, False])
    monkeypatch.delitem(sys.modules, DRIVER_MODULE, raising=False)


def test_on_cpu_without_the_interpreter_or_an_active_driver_the_passes_are_torch(monkeypatch):
    x = torch.zeros(2, 3, 4, 4)
    assert not backend.triton_takes_cpu_tensors()
    assert not backend.runs_triton(x) and not backend.compiles_triton(x)
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(active=None))  # Triton imported, no driver yet
    assert not backend.triton_takes_cpu_tensors()
    assert not backend.runs_triton(x)


def test_an_active_driver_on_the_cpu_runs_and_compiles_triton_on_cpu_tensors(monkeypatch):
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(FakeDriver('cpu'), default=FakeDriver('cuda')))
    x = torch.zeros(2, 3, 4, 4)
    assert backend.triton_takes_cpu_tensors()
    assert backend.runs_triton(x) and backend.compiles_triton(x)
    assert not backend.runs_triton(x.to('meta'))  # neither CUDA nor CPU


@pytest.mark.parametrize('old_names', [False, True], ids=['_active', 'active'])
def test_a_cuda_driver_or_the_default_driver_does_not_take_cpu_tensors(monkeypatch, old_names):
    cuda = FakeDriver('cuda')
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(cuda, old_names=old_names))
    assert not backend.triton_takes_cpu_tensors()
    assert cuda.asked == 1
    default = FakeDriver('cpu')  # even one on the CPU: Triton's default driver is never taken for a stand-in
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(default, default, old_names=old_names))
    assert not backend.triton_takes_cpu_tensors()
    assert default.asked == 0
    cpu = FakeDriver('cpu')
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(cpu, FakeDriver('cuda'), old_names=old_names))
    assert backend.triton_takes_cpu_tensors()


def test_each_active_driver_is_asked_its_device_once(monkeypatch):
    first, second = FakeDriver('cpu'), FakeDriver('cuda')
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(first))
    assert [backend.triton_takes_cpu_tensors() for _ in range(3)] == [True, True, True]
    assert first.asked == 1 and backend._CPU_DRIVER == [first, True]
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(second))
    assert [backend.triton_takes_cpu_tensors() for _ in range(2)] == [False, False]
    assert second.asked == 1 and backend._CPU_DRIVER == [second, False]


def test_under_the_interpreter_triton_runs_on_cpu_tensors_but_is_not_compiled(monkeypatch):
    monkeypatch.setattr(backend, '_INTERPRETED', True)
    x = torch.zeros(2, 3, 4, 4)
    assert backend.runs_triton(x)
    assert not backend.compiles_triton(x)
    monkeypatch.setitem(sys.modules, DRIVER_MODULE, driver_module(FakeDriver('cpu')))
    assert backend.runs_triton(x) and not backend.compiles_triton(x)
