"""A Triton driver for machines without a GPU: compiles for an H100 (sm_90) and launches nothing, or interprets.

    with stand_in_driver():                    # Triton's launch path on CPU tensors, kernels not run
    with stand_in_driver(interpret=True):      # ... and each launch run by Triton's interpreter

Triton's JIT path (argument binding, specialisation, the compile cache, the compiled
kernel's launcher) runs as on a GPU: kernels are compiled for sm_90 through PTX and
ptxas, which needs no GPU. Only the last step differs: the launcher does nothing, so what
the host does to issue a kernel can be timed (``benchmarks/host_cost.py``); or it runs the
kernel in Triton's interpreter on the CPU tensors it was given, so that code which must
see real ``triton.jit`` kernels (``torch.library.wrap_triton``, ``torch.compile``'s graphs)
is checked for its numbers too. While the driver is active, :func:`composer_se.batchnorm.runs_triton`
is true for CPU tensors (the driver's torch device is the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Iterator

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

__all__ = ['StandInDriver', 'stand_in_driver']

#: What an H100 reports: the numbers Triton checks a compiled kernel against.
H100 = {'max_shared_mem': 232448, 'multiprocessor_count': 132, 'max_num_regs': 65536, 'warpSize': 32,
        'sm_clock_rate': 1980000, 'mem_clock_rate': 2619000, 'mem_bus_width': 5120}
#: Triton 3.4 added the most threads per block to what loading a kernel returns.
_LOAD_RETURNS_MAX_THREADS = tuple(int(part) for part in triton.__version__.split('.')[:2]) >= (3, 4)


class _Utils:
    """The driver's module utilities: loading a kernel binary gives a module handle but no function; the device is an
    H100."""

    def load_binary(self, name, kernel, shared, device):
        module = object()  # not None: Triton then keeps the kernel's launcher, as with a real module
        return (module, 0, 0, 0, 1024) if _LOAD_RETURNS_MAX_THREADS else (module, 0, 0, 0)

    def get_device_properties(self, device):
        return dict(H100)


def _launcher(interpret: bool):
    """The driver's ``launcher_cls``: for a compiled kernel, the callable its launches go to.

    It takes what Triton's own CUDA launcher takes, and calls the launch hooks it is
    given as that one does; in between it runs the kernel in Triton's interpreter, or
    nothing.
    """

    def make(src, metadata):
        def launch(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
                   *args):
            if enter_hook is not None:
                enter_hook(launch_metadata)
            if interpret:
                _interpret(src.fn, (grid_x, grid_y, grid_z), args)
            if exit_hook is not None:
                exit_hook(launch_metadata)

        return launch

    return make


def _interpret(kernel, grid: tuple, args: tuple) -> None:
    """Runs ``kernel`` in Triton's interpreter, then leaves ``triton.language`` as it found it.

    The ``triton.jit`` functions the kernel calls (its module's, and those of
    ``triton.language``, such as ``tl.zeros``) are swapped for interpreted ones while it
    runs, as ``TRITON_INTERPRET=1`` would have made them; and the interpreter's changes to
    ``triton.language`` (it sets numpy versions of the language's functions and methods,
    for good) are undone, so that Triton still compiles the next kernel. Integer operations
    are not checked for overflow (as compiled kernels are not, outside debug mode).
    """
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang, interpreter_builder
    from triton.runtime.jit import JITFunction
    modules = [module for name, module in list(sys.modules.items())
               if name.startswith('triton.language') and module is not None]
    owners = _PATCHED or modules + [value for module in modules for value in vars(module).values()
                                    if isinstance(value, type) and value.__module__.startswith('triton')]
    saved = [(owner, dict(vars(owner))) for owner in owners]
    namespaces = [kernel.fn.__globals__] + [vars(module) for module in modules]
    jitted = [(names, {name: value for name, value in names.items() if isinstance(value, JITFunction)})
              for names in namespaces]
    for names, functions in jitted:
        names.update({name: _device_function(value.fn) for name, value in functions.items()})
        if functions and any(value in (tl, tl.core) for value in names.values()):
            _patch_lang(next(iter(functions.values())).fn)  # the language as this module sees it, once a launch
    options = interpreter_builder.options  # without numpy checks of every integer operation
    interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        InterpretedFunction(kernel.fn)[grid](*args)
    finally:
        interpreter_builder.options = options
        for names, functions in jitted:
            names.update(functions)
        for owner, attributes in saved:
            now = vars(owner)
            changed = [name for name in now if attributes.get(name, _MISSING) is not now[name]]
            if changed and owner not in _PATCHED:
                _PATCHED.append(owner)  # the interpreter patches the same objects each time: watch only those
            for name in changed:
                if name in attributes:
                    setattr(owner, name, attributes[name])
                else:
                    delattr(owner, name)


def _device_function(fn):
    """``fn`` as the interpreter runs a function a kernel calls: its rewritten form, called as it is (the language is
    already the interpreter's while the kernel runs; an ``InterpretedFunction`` would set it up again at every call,
    which makes a kernel with many small functions run a hundred times slower)."""
    if fn not in _DEVICE_FUNCTIONS:
        from triton.runtime.interpreter import InterpretedFunction
        _DEVICE_FUNCTIONS[fn] = InterpretedFunction(fn).rewrite()
    return _DEVICE_FUNCTIONS[fn]


_DEVICE_FUNCTIONS: dict = {}
#: The modules and classes of ``triton.language`` that running the interpreter changed, learnt on its first run.
_PATCHED: list = []
_MISSING = object()


class StandInDriver:
    """An active Triton driver for an sm_90 GPU whose tensors are the CPU's; see the module docstring."""

    def __init__(self, interpret: bool = False):
        self.utils = _Utils()
        self.launcher_cls = _launcher(interpret)

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget('cuda', 90, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int = 0) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device('cpu')

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise NotImplementedError('the stand-in driver launches nothing, so there is nothing to benchmark')


@contextlib.contextmanager
def stand_in_driver(interpret: bool = False) -> Iterator[StandInDriver]:
    """Makes a :class:`StandInDriver` Triton's active driver for the block, then restores the one before."""
    # Triton 3.4 and later make their default driver when ``driver.active`` is first read, which fails without a
    # GPU: read what is set without making it.
    previous = driver._active if hasattr(driver, '_active') else driver.active
    stand_in = StandInDriver(interpret)
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        if hasattr(driver, '_active'):
            driver._active = previous
        else:
            driver.set_active(previous)
