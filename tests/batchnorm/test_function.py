"""composer_se/batchnorm/function.py: SE and a BatchNorm as one function, its eager autograd function and checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer_se.batchnorm import se_batch_norm
from composer_se.batchnorm.function import _SEBatchNorm
from composer_se.layers import SqueezeExcite2d


@pytest.mark.parametrize('se_first', [True, False], ids=['se-bn', 'bn-se'])
def test_gradcheck_float64_including_near_zero_gates(se_first):
    """Both fused functions: SE then BatchNorm (folded) and BatchNorm then SE (a residual block's end)."""
    torch.manual_seed(0)
    n, c, latent = 3, 5, 2
    u = (torch.randn(n, c, 4, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    w1 = torch.randn(latent, c, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(latent, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(c, latent, dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor([0.0, 1.0, -2.0, -12.0, -20.0], dtype=torch.float64, requires_grad=True)  # gates to ~2e-9
    gamma = torch.rand(c, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.randn(c, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64)

    def fused(*inputs):
        return _SEBatchNorm.apply(*inputs, (se_first, scale, None, None, 0.1, 1e-5))

    assert torch.autograd.gradcheck(fused, (u, w1, b1, w2, b2, gamma, beta))


def test_a_double_backward_is_refused_with_the_way_to_one():
    u = torch.randn(2, 4, 3, 3, requires_grad=True)
    se, norm = SqueezeExcite2d(4, 2), nn.BatchNorm2d(4)
    out = se_batch_norm(u, se, norm, True, 0.1, norm.running_mean, norm.running_var)
    (grad,) = torch.autograd.grad(out.square().sum(), u, create_graph=False)
    assert grad.shape == u.shape
    out = se_batch_norm(u, se, norm, True, 0.1, norm.running_mean, norm.running_var)
    with pytest.raises(RuntimeError, match='no double backward.*fold_batchnorm=False'):
        torch.autograd.grad(out.square().sum(), u, create_graph=True)


def test_se_first_needs_an_affine_batch_norm():
    se, norm = SqueezeExcite2d(4, 2), nn.BatchNorm2d(4, affine=False)
    with pytest.raises(ValueError, match='affine'):
        se_batch_norm(torch.randn(2, 4, 3, 3), se, norm, True, 0.1, norm.running_mean, norm.running_var)
    assert se_batch_norm(torch.randn(2, 4, 3, 3), se, norm, False, 0.1, norm.running_mean,
                         norm.running_var).shape == (2, 4, 3, 3)
