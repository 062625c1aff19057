"""SE models at inference: fusing each conv with its BatchNorm, with the SE blocks kept exact.

- :mod:`~composer_se.inference.fuse`: :func:`fuse_for_inference`.

It imports only ``torch``.
"""

from composer_se.inference.fuse import ChannelBias, FusedConv, FusionReport, fuse_for_inference

__all__ = ['ChannelBias', 'FusedConv', 'FusionReport', 'fuse_for_inference']
