"""SE models at inference: fusing each conv with its BatchNorm, and blocks whose gate is nearly fixed made free.

- :mod:`~composer_se.inference.fuse`: :func:`fuse_for_inference`, each conv with its
  BatchNorm, the SE blocks kept exact;
- :mod:`~composer_se.inference.static_gates`: :func:`fold_static_gates`, blocks whose
  gate hardly depends on the input replaced by their mean gate.

It imports only ``torch``.
"""

from composer_se.inference.fuse import ChannelBias, FusedConv, FusionReport, fuse_for_inference
from composer_se.inference.static_gates import MEASURES, ChannelScale, StaticGate, StaticGateReport, fold_static_gates

__all__ = [
    'MEASURES',
    'ChannelBias',
    'ChannelScale',
    'FusedConv',
    'FusionReport',
    'StaticGate',
    'StaticGateReport',
    'fold_static_gates',
    'fuse_for_inference',
]
