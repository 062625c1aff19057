"""What each SE block's gate does on given data: its mean per channel, how much it depends on the input, per class.

The SENet paper's analysis ("Role of Excitation") found early blocks gating alike for
every class, middle blocks strongly input-dependent, and the last stage's blocks near
one fixed gate. :func:`gate_statistics` measures that for any model holding this
package's blocks (:class:`~composer_se.layers.SqueezeExcite2d`, in a conv, folded into a
BatchNorm, at a block end, or left by :func:`~composer_se.fuse_for_inference`), in eval
mode, without changing the model: each block's forward hook recomputes its gate, in
float32 or wider, from the input the block sees (a block with a hook runs as a module,
folded or not). :class:`GateRecorder` is the accumulation, which
:class:`~composer_se.callbacks.GateMonitor` shares.

It imports only ``torch``.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from composer_se.layers import SqueezeExcite2d, excite

__all__ = ['GateRecorder', 'GateStatistics', 'evaluating', 'gate_of', 'gate_statistics', 'split_batch']


@dataclass(frozen=True)
class GateStatistics:
    """One SE block's gate over the samples it saw. Gates are in the block's own units: ``(0, 1)`` for the paper's
    sigmoid, ``(0, 2)`` for ``init='identity'`` (``scale``)."""

    block: str  #: the block's name in the model, e.g. ``'layer4.0.conv2.se'``
    channels: int
    samples: int
    scale: float  #: the gate's upper bound, the block's ``gate_scale``
    spatial: tuple[int, int]  #: height and width of the block's input (the last batch's)
    mean: torch.Tensor  #: (C,) float64, the mean gate of each channel over the samples
    #: the standard deviation of each channel's gate over the samples, averaged over the channels
    input_dependence: float
    max_input_dependence: float  #: the largest of those standard deviations
    #: the largest departure of any sample's gate from its channel's mean: folding the block to its mean gate changes
    #: no output on these samples by more than this fraction of the block's input
    max_deviation: float
    near_zero: float  #: the fraction of gate values (samples x channels) at most ``near * scale``
    near_one: float  #: the fraction at least ``(1 - near) * scale`` (saturated open)
    #: (K, C) the mean gate per class, row k for label k (NaN for a class with no sample), or ``None`` without labels
    class_mean: Optional[torch.Tensor] = None
    class_counts: Optional[torch.Tensor] = None  #: (K,) samples per class, or ``None``

    def summary(self) -> dict[str, float]:
        """The scalars, for a logger: mean gate (over channels), input dependence, its maximum, near zero, near one."""
        return {'mean': float(self.mean.mean()), 'input_dependence': self.input_dependence,
                'max_input_dependence': self.max_input_dependence, 'near_zero': self.near_zero,
                'near_one': self.near_one}


def gate_of(block: SqueezeExcite2d, input: torch.Tensor) -> torch.Tensor:
    """``block``'s gate (N, C) for its input (N, C, H, W), in float32 or wider, outside any autocast."""
    dtype = torch.promote_types(input.dtype, torch.float32)

    def cast(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.detach().to(dtype)

    with torch.autocast(input.device.type, enabled=False):
        return excite(input.detach().to(dtype).mean((2, 3)), cast(block.fc1.weight), cast(block.fc1.bias),
                      cast(block.fc2.weight), cast(block.fc2.bias), cast(block.gate_scale))


class _Tally:
    """Running sums of one block's gates, in float64."""

    def __init__(self, block: SqueezeExcite2d, near: float):
        self.block, self.near = block, near
        self.samples = 0
        self.spatial = (0, 0)
        self.first = self.total = self.squares = self.low = self.high = None
        self.near_zero = self.near_one = 0
        self.class_total: Optional[torch.Tensor] = None
        self.class_counts: Optional[torch.Tensor] = None

    def add(self, input: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        if input.shape[0] == 0:  # an empty batch: nothing to count
            return
        gate = gate_of(self.block, input).double()
        if self.total is None:  # sums of the departures from the first sample: no cancellation, 0 for a fixed gate
            self.first = gate[0].clone()
            self.total, self.squares = gate.new_zeros(gate.shape[1]), gate.new_zeros(gate.shape[1])
            self.low, self.high = gate.amin(0), gate.amax(0)
        else:
            self.low, self.high = torch.minimum(self.low, gate.amin(0)), torch.maximum(self.high, gate.amax(0))
        departure = gate - self.first
        self.total += departure.sum(0)
        self.squares += departure.square().sum(0)
        self.samples += gate.shape[0]
        self.spatial = (int(input.shape[2]), int(input.shape[3]))
        scale = self.block.gate_scale.double()  # counted on the device: no wait for it between batches
        self.near_zero = self.near_zero + (gate <= self.near * scale).sum()
        self.near_one = self.near_one + (gate >= (1 - self.near) * scale).sum()
        if labels is not None:
            self._add_classes(gate, labels.to(device=gate.device, dtype=torch.long))

    def _add_classes(self, gate: torch.Tensor, labels: torch.Tensor) -> None:
        classes = int(labels.max()) + 1
        if self.class_total is None:
            self.class_total = gate.new_zeros(0, gate.shape[1])
            self.class_counts = gate.new_zeros(0)
        if classes > self.class_total.shape[0]:
            grow = classes - self.class_total.shape[0]
            self.class_total = torch.cat([self.class_total, gate.new_zeros(grow, gate.shape[1])])
            self.class_counts = torch.cat([self.class_counts, gate.new_zeros(grow)])
        self.class_total.index_add_(0, labels, gate)
        self.class_counts.index_add_(0, labels, torch.ones_like(labels, dtype=gate.dtype))

    def result(self, name: str) -> GateStatistics:
        n = self.samples
        shift = self.total / n
        mean = self.first + shift
        std = (self.squares / n - shift.square()).clamp_min(0).sqrt()
        deviation = torch.maximum(self.high - mean, mean - self.low).clamp_min(0)
        values = n * self.block.channels
        class_mean = None
        if self.class_total is not None:
            class_mean = (self.class_total / self.class_counts[:, None]).cpu()  # 0/0 = NaN for absent classes
        return GateStatistics(
            block=name, channels=self.block.channels, samples=n, scale=float(self.block.gate_scale),
            spatial=self.spatial, mean=mean.cpu(), input_dependence=float(std.mean()),
            max_input_dependence=float(std.max()), max_deviation=float(deviation.max()),
            near_zero=int(self.near_zero) / values, near_one=int(self.near_one) / values, class_mean=class_mean,
            class_counts=None if self.class_counts is None else self.class_counts.long().cpu())


class GateRecorder:
    """Tallies of every SE block's gates in ``model``, taken by forward hooks that exist only inside :meth:`recording`.

    Set :attr:`labels` to the batch's labels (or ``None``) before each forward to tally
    the mean gate per class. A block with a forward hook runs as a module, so a folded
    block is seen as well (at the cost of its one-pass form while recording).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``model`` holds no SE block, or ``near`` is outside ``[0, 0.5)``.
    """

    def __init__(self, model: nn.Module, near: float = 0.05):
        if not isinstance(model, nn.Module):
            raise TypeError(f'gate statistics need a torch.nn.Module, got {type(model).__name__}: {model!r:.80}')
        if not 0 <= near < 0.5:
            raise ValueError(f'near must be in [0, 0.5), got {near!r}')
        self.labels: Optional[torch.Tensor] = None
        self._tallies = {name: _Tally(module, near) for name, module in model.named_modules()
                         if isinstance(module, SqueezeExcite2d)}
        if not self._tallies:
            raise ValueError(f'{type(model).__name__} holds no SE block (composer_se.layers.SqueezeExcite2d) to '
                             f'measure')

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """The blocks' forward passes inside this context are tallied; their hooks are removed on leaving it."""
        handles = [tally.block.register_forward_hook(self._hook(name, tally)) for name, tally in self._tallies.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str, tally: _Tally):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            (input,) = args
            labels = self.labels
            if labels is not None and labels.shape[0] != input.shape[0]:
                raise ValueError(f'SE block {name!r} saw {input.shape[0]} samples but the batch has '
                                 f'{labels.shape[0]} labels: does the model run it more than once per input?')
            tally.add(input, labels)
        return hook

    def statistics(self) -> dict[str, GateStatistics]:
        """Each block's statistics so far, by name, in model order; blocks that saw nothing are left out."""
        return {name: tally.result(name) for name, tally in self._tallies.items() if tally.samples}


def split_batch(batch: Any) -> tuple[Any, Optional[torch.Tensor]]:
    """``(inputs, labels)`` of a batch: a tensor is inputs alone; a tuple or list is (inputs, labels, ...), where the
    labels count only as a 1-D integer tensor (class indices)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 else None
        if not (isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()
                and not labels.is_complex() and labels.dtype != torch.bool):
            labels = None
        return batch[0], labels
    raise TypeError(f'a batch must be a tensor of inputs or a tuple or list (inputs, labels, ...), got '
                    f'{type(batch).__name__}')


def _device_of(model: nn.Module) -> Optional[torch.device]:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients; each module's training flag as it was afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def gate_statistics(model: nn.Module, dataloader: Iterable, max_batches: Optional[int] = None, *, near: float = 0.05,
                    per_class: bool = True) -> dict[str, GateStatistics]:
    """Each SE block's gate statistics over ``dataloader``'s inputs, by block name, in model order.

    ``model`` runs in eval mode, without gradients, on the device of its parameters; each
    module's training flag is restored afterwards, and its parameters and buffers
    (running statistics included) are left as they were. Batches are a tensor of
    inputs, or ``(inputs, labels, ...)``; with integer labels (and ``per_class``) each
    block also gets its mean gate per class.

    Args:
        model (torch.nn.Module): a model holding SE blocks, with or without a
            classifier wrapper whose ``forward`` takes the inputs.
        dataloader (Iterable): batches, as above.
        max_batches (int, optional): stop after this many batches. Default: all.
        near (float): a gate counts as near 0 at most ``near * scale``, and near 1 at
            least ``(1 - near) * scale``. Default: ``0.05``.
        per_class (bool): tally the mean gate per class when batches carry labels.

    Raises:
        TypeError: ``model`` is not a module, or a batch is neither a tensor nor a tuple or list.
        ValueError: ``model`` has no SE block, ``max_batches`` is not a positive integer,
            ``near`` is outside ``[0, 0.5)``, or ``dataloader`` gave no batch.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f'max_batches must be a positive integer or None, got {max_batches!r}')
    recorder = GateRecorder(model, near)
    device = _device_of(model)
    with recorder.recording(), evaluating(model):
        batches = 0
        for batch in itertools.islice(dataloader, max_batches):  # no batch read beyond max_batches
            inputs, labels = split_batch(batch)
            if device is not None and isinstance(inputs, torch.Tensor):
                inputs = inputs.to(device)
            if labels is not None and per_class and labels.numel() and int(labels.min()) < 0:
                raise ValueError(f'labels must be class indices >= 0 to give a mean gate per class, got '
                                 f'{int(labels.min())}; pass per_class=False to leave them out')
            recorder.labels = labels if per_class else None
            model(inputs)
            batches += 1
        if not batches:
            raise ValueError('the dataloader gave no batch')
        return recorder.statistics()
