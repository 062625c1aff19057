"""How the Triton kernels are launched: a launch plan cached per call shape in eager mode, ``wrap_triton`` when traced.

Triton's own launch, ``kernel[grid](*arguments)``, binds the arguments to the kernel's
signature, works out how to specialise the kernel for them (dtypes, which integers are 1
or multiples of 16, which pointers are 16-byte aligned), builds and looks up a cache key,
and only then calls the compiled kernel's launcher: tens of microseconds of Python per
launch, which on a fast GPU costs more than the kernels themselves. A fused SE +
BatchNorm call launches the same kernels with the same specialisation whenever its
input has the same shape, strides and dtypes and its tensors are aligned, so
:func:`launcher` keeps, per such *call key*, the compiled kernel of each launch
(:class:`LaunchPlan`), and from the second call on hands the arguments straight to its
launcher.

The plan is used only where it is known to hold (:data:`PLANS_WORK`): a Triton version
whose launch path it was checked against (3.2 up to 3.8; the tests check that equal
call keys give Triton's own specialisation), no launch hook set (profilers read
launches through them), and every tensor from outside the call 16-byte aligned (the
call's own allocations are). Anywhere else each launch goes through ``kernel[grid]``.
Under ``torch.compile`` the kernels are launched through ``torch.library.wrap_triton``
(:func:`traced_launch`), which puts each in the graph for Inductor to launch.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Sequence

import torch
import triton

__all__ = ['LaunchPlan', 'PLANS_WORK', 'device_of', 'launcher', 'plain_launch', 'traced_launch']

Launch = Callable[..., None]

#: Triton versions whose launch path (``CompiledKernel.run`` taking the grid, the stream, the
#: function handle, its metadata, launch metadata, the two hooks and every argument) the plans
#: follow: the first is the oldest with that signature, the second the first not yet checked.
CHECKED_TRITON = ((3, 2), (3, 9))
_VERSION = tuple(int(part) for part in triton.__version__.split('+')[0].split('.')[:2])

try:  # Triton 3.4 and later keep the launch hooks in its knobs; 3.2 and 3.3 on the compiled kernel's class
    from triton import knobs as _knobs
    _HOOKS = _knobs.runtime
except ImportError:
    from triton.compiler import CompiledKernel as _HOOKS

#: Whether launch plans are used at all: Triton's version is one they were checked against, and kernels are
#: compiled (under ``TRITON_INTERPRET=1`` Triton's interpreter runs them, and there is nothing to keep).
PLANS_WORK = (CHECKED_TRITON[0] <= _VERSION < CHECKED_TRITON[1] and hasattr(_HOOKS, 'launch_enter_hook') and
              os.environ.get('TRITON_INTERPRET') != '1')

#: Plans kept, at most; beyond it they are dropped all at once (a model has a few dozen call keys).
MAX_PLANS = 1024


class LaunchPlan:
    """The compiled kernel of each launch of one call key, ``id(kernel) -> (launcher, function handle, metadata,
    compiled kernel)``, and the launch through it for the stream last used."""

    __slots__ = ('compiled', 'launch')

    def __init__(self):
        self.compiled = {}
        self.launch = None


class _PlannedLaunch:
    """One call's launches: the first of each kernel through Triton (recording what it compiled), then directly."""

    __slots__ = ('compiled', 'stream')

    def __init__(self, plan: LaunchPlan, stream: int):
        self.compiled, self.stream = plan.compiled, stream

    def __call__(self, kernel, grid: tuple[int, int, int], *arguments) -> None:
        # By id: a kernel's own hash hashes its source, a microsecond a launch. Kernels are module globals, never freed.
        entry = self.compiled.get(id(kernel))
        if entry is None:
            compiled = kernel[grid](*arguments)
            if compiled is not None:  # else Triton launched without a compiled kernel to keep: it does so again
                self.compiled[id(kernel)] = (compiled.run, compiled.function, compiled.packed_metadata, compiled)
            return
        run, function, metadata, _ = entry
        run(grid[0], grid[1], grid[2], self.stream, function, metadata, None, None, None, *arguments)


_PLANS: dict = {}


def plain_launch(kernel, grid: tuple[int, int, int], *arguments) -> None:
    """Triton's own launch path."""
    kernel[grid](*arguments)


def traced_launch(kernel, grid: tuple[int, int, int], *arguments) -> None:
    """A launch that ``torch.compile`` (and ``make_fx``) records as the kernel itself, for Inductor to launch."""
    torch.library.wrap_triton(kernel)[grid](*arguments)


def _hook_set(hook) -> bool:
    """Whether a launch hook does something: it is set (Triton 3.3, 3.4), or it is a chain with hooks in it (3.5 and
    later, where the hooks are always chains)."""
    return hook is not None and bool(getattr(hook, 'calls', True))


def _hooks_set() -> bool:
    return _hook_set(_HOOKS.launch_enter_hook) or _hook_set(_HOOKS.launch_exit_hook)


def _stream(device: torch.device) -> int:
    """The raw current stream of ``device`` (0, the default stream, for CPU tensors on a CPU driver)."""
    if device.type == 'cuda':
        return torch._C._cuda_getCurrentRawStream(device.index)
    return 0


def launcher(key: tuple, device: torch.device, external: Sequence[Optional[torch.Tensor]]) -> Launch:
    """The launcher for one fused call on ``device`` whose launches ``key`` determines (see the module docstring).

    ``external`` are the tensors the call did not allocate (``None`` for absent ones):
    the plan needs each 16-byte aligned, as Triton would specialise for it.
    """
    if not PLANS_WORK or _hooks_set():
        return plain_launch
    for tensor in external:
        if tensor is not None and tensor.data_ptr() % 16:
            return plain_launch
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = LaunchPlan()
    stream = _stream(device)
    if plan.launch is None or plan.launch.stream != stream:
        plan.launch = _PlannedLaunch(plan, stream)
    return plan.launch


def device_of(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is the current one, as Triton launches on the current device."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
