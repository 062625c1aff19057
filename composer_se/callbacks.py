"""A Composer callback that logs what each SE block's gate does while a model trains (see :mod:`composer_se.gates`)."""

from __future__ import annotations

from typing import Optional, Union

from composer.core import Callback, State, get_precision_context
from composer.loggers import Logger
from torch import nn

from composer_se.gates import GateRecorder, evaluating

__all__ = ['GateMonitor']


def _composer_model(model: nn.Module) -> nn.Module:
    """The ComposerModel inside a DistributedDataParallel wrapper, or ``model``."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


class GateMonitor(Callback):
    """Logs each SE block's gate statistics (:class:`~composer_se.gates.GateStatistics`) to Composer's loggers.

    For each block and statistic the key is ``se_gates/{label}/{block}/{statistic}``
    (statistics: ``mean``, ``input_dependence``, ``max_input_dependence``, ``near_zero``,
    ``near_one``), so TensorBoard draws one curve per block. ``label`` is ``train``,
    or the evaluator's label (``eval``, ...).

    The measurement is a forward pass of its own, in eval mode without gradients, under
    the run's precision, through the model's own (uncompiled) ``forward``, of the batch
    as the model saw it (on the device, after Composer's transforms; with microbatches,
    each evaluation microbatch and the last training one), with hooks on the blocks that
    exist only during that pass: a step that does not log runs as without the callback.

    Args:
        interval (int | str, optional): every this many training batches (``100`` or
            ``'100ba'``), the batch just trained on is measured and logged. ``None``:
            never during training. Default: ``None``.
        eval_batches (int, optional): at each evaluation, the first this many batches
            of each evaluator are measured, and logged together at its end. ``0``:
            never. Default: ``4``.
        near (float): as in :func:`~composer_se.gate_statistics`. Default: ``0.05``.
    """

    def __init__(self, interval: Union[int, str, None] = None, eval_batches: int = 4, near: float = 0.05):
        self.interval = _batches(interval)
        if isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or eval_batches < 0:
            raise ValueError(f'eval_batches must be an integer >= 0, got {eval_batches!r}')
        if not 0 <= near < 0.5:
            raise ValueError(f'near must be in [0, 0.5), got {near!r}')
        self.eval_batches = eval_batches
        self.near = near
        self._eval_recorder: Optional[GateRecorder] = None
        self._measured = 0
        self._trained_on = None  #: the batch of the last training forward, as the model saw it

    def fit_start(self, state: State, logger: Logger) -> None:
        GateRecorder(_composer_model(state.model), self.near)  # a model without SE blocks is an error now, not later

    def _measure(self, state: State, recorder: GateRecorder, batch) -> None:
        """One forward pass of ``batch`` that ``recorder`` tallies; the model as it was afterwards."""
        model = _composer_model(state.model)
        with recorder.recording(), evaluating(model), get_precision_context(state.precision, state.precision_config):
            type(model).forward(model, batch)  # the class's forward: not the compiled one Composer may set

    @staticmethod
    def _log(logger: Logger, label: str, recorder: GateRecorder) -> None:
        logger.log_metrics({f'se_gates/{label}/{name}/{key}': value for name, stats in recorder.statistics().items()
                            for key, value in stats.summary().items()})

    def after_forward(self, state: State, logger: Logger) -> None:
        if self.interval is not None:
            self._trained_on = state.batch  # on the device and transformed; by BATCH_END Composer restores the raw one

    def batch_end(self, state: State, logger: Logger) -> None:
        batch, self._trained_on = self._trained_on, None
        if self.interval is None or int(state.timestamp.batch) % self.interval or batch is None:
            return
        recorder = GateRecorder(_composer_model(state.model), self.near)
        self._measure(state, recorder, batch)
        self._log(logger, 'train', recorder)

    def eval_start(self, state: State, logger: Logger) -> None:
        self._measured = 0
        self._eval_recorder = GateRecorder(_composer_model(state.model), self.near) if self.eval_batches else None

    def eval_after_forward(self, state: State, logger: Logger) -> None:
        if self._eval_recorder is not None and self._measured < self.eval_batches:
            self._measure(state, self._eval_recorder, state.batch)  # each microbatch, on the device

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        self._measured += 1

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._eval_recorder is not None and self._measured:
            self._log(logger, state.dataloader_label or 'eval', self._eval_recorder)
        self._eval_recorder = None


def _batches(interval: Union[int, str, None]) -> Optional[int]:
    """``interval`` as a number of batches, or ``None``."""
    if interval is None:
        return None
    count = interval
    if isinstance(interval, str):
        digits = interval[:-2] if interval.endswith('ba') else interval
        count = int(digits) if digits.isdigit() else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"interval must be a positive number of batches (100 or '100ba') or None, got {interval!r}")
    return count
