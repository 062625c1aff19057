"""Which convolutions feed a BatchNorm and nothing else, read from the model's traced graph.

SE after such a conv can be folded into the BatchNorm (see
:class:`~composer_se.batchnorm.FoldedSqueezeExciteBatchNorm2d`). The module tree alone
cannot tell (registration order is not call order, and a conv's output may also go
elsewhere), so this traces the model's forward with ``torch.fx`` and reads the data flow.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from torch import fx, nn

from composer_se.batchnorm.fold import can_fold

__all__ = ['batch_norm_consumers', 'fold_targets']


class _LeafTracer(fx.Tracer):
    """Keeps every conv and BatchNorm (our SE subclasses included) as one call in the graph."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, qualified_name)


def batch_norm_consumers(model: nn.Module) -> tuple[dict[int, nn.BatchNorm2d], Optional[str]]:
    """Maps ``id(conv)`` to the BatchNorm that is the only consumer of that conv's output.

    A pair counts when, in the traced forward, the conv and the BatchNorm are each called
    exactly once, and the conv's output is used by that BatchNorm call alone, as its
    only argument. Returns the map and ``None``, or an empty map and the reason when the
    model cannot be traced symbolically (data-dependent control flow, say); nothing is
    folded then, which costs speed and memory but never correctness.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure just means no folding
        return {}, f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'.rstrip(': ')
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = [node for node in graph.nodes if node.op == 'call_module']
    times_called = Counter(id(modules[node.target]) for node in calls)
    pairs: dict[int, nn.BatchNorm2d] = {}
    for node in calls:
        conv = modules[node.target]
        if not isinstance(conv, nn.Conv2d) or times_called[id(conv)] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != 'call_module' or user.args != (node,) or user.kwargs:
            continue
        norm = modules[user.target]
        if isinstance(norm, nn.BatchNorm2d) and times_called[id(norm)] == 1:
            pairs[id(conv)] = norm
    return pairs, None


def fold_targets(network: nn.Module, convs: Sequence[nn.Conv2d]) -> tuple[dict[int, nn.BatchNorm2d], Optional[str]]:
    """For each of ``convs`` (by ``id``) whose SE block can be folded, its BatchNorm; and why none can be, if so.

    A conv's output must go to a BatchNorm alone (:func:`batch_norm_consumers`) that
    :func:`~composer_se.batchnorm.can_fold` accepts.
    """
    if not convs:
        return {}, None
    consumers, reason = batch_norm_consumers(network)
    folds = {}
    for conv in convs:
        norm = consumers.get(id(conv))
        if norm is not None and can_fold(norm, conv.out_channels):
            folds[id(conv)] = norm
    return folds, reason
