"""The composer_se custom operators (what torch.compile runs of the fused functions) are sound operators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer_se.fused.function import _arguments
from composer_se.layers import SqueezeExcite2d
from tests.helpers import compiled_operators, se_basic_blocks


@pytest.mark.parametrize('name', ['squeeze_excite_batch_norm', 'batch_norm_squeeze_excite'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('running', [True, False])
def test_operator_schema_fake_tensors_and_autograd_agree(name, dtype, layout, running):
    """torch.library.opcheck: the schema (nothing mutated), the fake implementation (shapes, dtypes, strides) and the
    registered backward match what the operator does."""
    torch.manual_seed(0)
    u = torch.randn(4, 6, 5, 3, dtype=dtype).to(memory_format=layout).requires_grad_()
    se, norm = SqueezeExcite2d(6, 3).to(dtype), nn.BatchNorm2d(6).to(dtype)
    stats = (norm.running_mean, norm.running_var) if running else (None, None)
    torch.library.opcheck(getattr(torch.ops.composer_se, name), _arguments(se, norm, u, 0.1, *stats))


def test_on_cpu_the_compiler_gets_plain_operations():
    """Without Triton (CPU), the compiled graph holds plain operations the compiler fuses, not the operators."""
    model, blocks = se_basic_blocks('conv')
    assert blocks == 4
    _, operators = compiled_operators(model, torch.randn(2, 8, 4, 4))
    assert operators == []
