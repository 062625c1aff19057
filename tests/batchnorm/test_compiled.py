"""composer_se/batchnorm/compiled.py: SE + BatchNorm under torch.compile, sound operators, and graphs that hold
the Triton kernels themselves, which Inductor can launch and capture in CUDA graphs.

The graph tests run on CPU with the stand-in Triton driver of benchmarks/stand_in_driver.py,
which compiles each kernel for an sm_90 GPU and runs each launch in Triton's interpreter:
the compiled model is checked for what it holds, and for its numbers against eager and
against float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from composer_se import apply_squeeze_excite
from composer_se.batchnorm import compiled  # noqa: F401 - registers composer_se::se_batch_norm
from composer_se.batchnorm.function import gate_tensors
from composer_se.layers import SqueezeExcite2d
from tests.helpers import compiled_graphs, graph_calls, se_basic_blocks

pytest.importorskip('triton')

#: Per folded block (SE then BatchNorm) and per block end (BatchNorm then SE): the kernels each way.
FORWARD = {'conv': ['_channel_stats_kernel', '_gate_hidden_kernel', '_se_bn_forward_kernel', '_gate_affine_kernel'],
           'block': ['_channel_stats_kernel', '_bn_stats_kernel', '_gate_hidden_kernel', '_gate_affine_kernel']}
BACKWARD = {'conv': ['_grad_sums_kernel', '_se_bn_backward_kernel', '_gate_hidden_backward_kernel',
                     '_gate_input_backward_kernel', '_affine_of_two_kernel'],
            'block': ['_grad_sums_kernel', '_bn_se_gate_grad_kernel', '_gate_hidden_backward_kernel',
                      '_bn_se_backward_kernel', '_affine_of_two_kernel']}
#: Operations that wait for the device (a value read back to the host).
SYNCS = {'aten._local_scalar_dense.default', 'aten.item.default', 'aten.nonzero.default', 'aten.is_nonzero.default',
         'aten.equal.default'}


@pytest.fixture
def stand_in():
    """The stand-in Triton driver, interpreting each launch: Triton kernels on CPU tensors, compiled for sm_90."""
    from benchmarks.stand_in_driver import stand_in_driver
    with stand_in_driver(interpret=True) as driver:
        yield driver
    torch._dynamo.reset()


def arguments(se_first: bool, dtype, layout, running: bool):
    torch.manual_seed(0)
    u = torch.randn(4, 6, 5, 3, dtype=dtype).to(memory_format=layout).requires_grad_()
    se, norm = SqueezeExcite2d(6, 3).to(dtype), nn.BatchNorm2d(6).to(dtype)
    stats = (norm.running_mean, norm.running_var) if running else (None, None)
    return (se_first, u, *gate_tensors(se), norm.weight, norm.bias, *stats, 0.1, 1e-5)


@pytest.mark.parametrize('se_first', [True, False], ids=['se-bn', 'bn-se'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('running', [True, False])
def test_operator_schema_fake_tensors_and_autograd_agree(se_first, dtype, layout, running):
    """torch.library.opcheck on CPU (the torch passes): the schema (nothing mutated), the fake implementation (shapes,
    dtypes, strides) and the registered backward match what the operator does."""
    torch.library.opcheck(torch.ops.composer_se.se_batch_norm, arguments(se_first, dtype, layout, running))


@pytest.mark.parametrize('se_first', [True, False], ids=['se-bn', 'bn-se'])
def test_the_triton_operator_is_a_sound_operator(stand_in, se_first):
    """The same with the Triton passes (the stand-in driver): the kernels' fake and traced forms agree with them."""
    torch.library.opcheck(torch.ops.composer_se.se_batch_norm,
                          arguments(se_first, torch.float32, torch.channels_last, True))


def incompatible_with_cuda_graphs(gm: torch.fx.GraphModule):
    """Inductor's check of a graph for CUDA graphs (an operator that cannot be captured, a size read from the
    device), on a graph whose Triton kernels' values are dicts of tensors, which the check reads as their tensors."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    swapped = {node: node.meta['val'] for node in gm.graph.nodes if isinstance(node.meta.get('val'), dict)}
    for node, value in swapped.items():
        node.meta['val'] = tuple(value.values())
    try:
        return get_first_incompatible_cudagraph_node(gm)
    finally:
        for node, value in swapped.items():
            node.meta['val'] = value


def assert_compiles_to_kernels(graphs: dict, placement: str, blocks: int) -> None:
    """The forward and backward graphs hold the Triton kernels of each block, no opaque operator, nothing that keeps
    CUDA graphs out and nothing that waits for the device; the only inputs they write are BatchNorm buffers."""
    for kind, expected in (('forward', FORWARD), ('backward', BACKWARD)):
        calls = graph_calls(graphs[kind])
        assert [call for call in calls if call.endswith('_kernel')] == expected[placement] * blocks, kind
        # Every operator in the graph is aten's (or a higher-order one): no composer_se or other opaque operator.
        assert not [call for call in calls if '.' in call and not call.startswith(('aten.', 'higher_order.'))], kind
        assert not set(calls) & SYNCS, kind
        for gm in graphs[kind]:
            assert incompatible_with_cuda_graphs(gm) is None, kind
    for gm in graphs['forward']:
        for node in gm.graph.nodes:
            if node.op == 'call_function' and str(node.target) == 'aten.copy_.default':
                destination = node.args[0]
                assert destination.op == 'placeholder' and destination.meta['val'].dim() <= 1  # running statistics


@pytest.mark.parametrize('placement', ['conv', 'block'])
def test_a_compiled_se_model_holds_the_kernels_and_trains_as_eager_and_float64(stand_in, placement):
    model, blocks = se_basic_blocks(placement)
    eager, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(4, 8, 6, 5).to(memory_format=torch.channels_last)
    weights = torch.randn(4, 8, 6, 5)
    out, graphs = compiled_graphs(model, x)
    (out * weights).sum().backward()
    expected = eager(x)
    (expected * weights).sum().backward()
    assert_compiles_to_kernels(graphs, placement, blocks)
    assert torch.equal(out, expected)  # the same kernels, launched from the graph
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        assert torch.equal(b, c), name
    plain = torch.jit.script(reference)  # float64, plain operations
    exact = plain(x.double())
    (exact * weights.double()).sum().backward()
    assert ((out.double() - exact).norm() / exact.norm()) < 1e-5
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert ((p.grad.double() - q.grad).norm() / q.grad.norm().clamp(min=1e-30)) < 1e-4, name


def test_dynamic_shapes_keep_the_kernels(stand_in):
    """Symbolic sizes (``dynamic=True``, or torch.compile's own after a batch of another size): they reach the
    kernels' grids and sizes, and the compiled model trains as eager does at each batch size."""
    model, blocks = se_basic_blocks('conv')
    eager = copy.deepcopy(model)
    for batch in (4, 3):
        x = torch.randn(batch, 8, 6, 5)
        out, graphs = compiled_graphs(model, x, dynamic=True)
        expected = eager(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        expected.square().sum().backward()
        for p, q in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    assert [call for call in graph_calls(graphs['forward']) if call.endswith('_kernel')] == FORWARD['conv'] * blocks
    placeholders = [node for gm in graphs['forward'] for node in gm.graph.nodes if node.op == 'placeholder']
    assert any(isinstance(node.meta.get('val'), torch.SymInt) for node in placeholders)  # the sizes are symbolic


@pytest.mark.parametrize('placement', ['conv', 'block'])
def test_a_compiled_se_model_under_bf16_autocast_gives_the_eager_output(stand_in, placement):
    """Under bf16 autocast (bf16 activations, float32 parameters and statistics) the compiled model runs the same
    kernels in the same dtypes as eager: the same output, bit for bit."""
    model, blocks = se_basic_blocks(placement)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 8, 6, 5).to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, graphs = compiled_graphs(model, x)
        expected = eager(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize('name, min_channels', [('mobilenet_v2', 960), ('efficientnet_b0', 1152), ('vgg11_bn', 512),
                                                ('regnet_y_400mf', 440)])
def test_compiled_cnns_beyond_resnets_hold_the_kernels_of_each_folded_block(name, min_channels):
    """Inverted residuals, depthwise convs, no residuals, networks with SE modules of their own: compiled for
    training, each folded block is its kernels each way, and nothing in the graphs is opaque or keeps CUDA graphs out.
    (The graphs are traced, not run: what they hold is checked here, their numbers above.)"""
    from benchmarks.stand_in_driver import stand_in_driver
    model = torchvision.models.get_model(name, num_classes=10)
    report = apply_squeeze_excite(model, latent_channels=4, min_channels=min_channels)
    assert report.num_folded == report.num_blocks > 0
    with stand_in_driver():
        out, graphs = compiled_graphs(model, torch.randn(2, 3, 32, 32), run=False)
        out.sum().backward()
    assert_compiles_to_kernels(graphs, 'conv', report.num_folded)
    torch._dynamo.reset()


def test_on_cpu_the_compiler_gets_plain_operations():
    """Without Triton (CPU), the compiled graph holds plain operations the compiler fuses: no kernel, no operator."""
    model, blocks = se_basic_blocks('conv')
    assert blocks == 4
    out, graphs = compiled_graphs(model, torch.randn(2, 8, 4, 4))
    calls = graph_calls(graphs['forward'])
    assert 'aten.native_batch_norm.default' in calls or 'aten._native_batch_norm_legit_functional.default' in calls
    assert not [call for call in calls if call.endswith('_kernel') or 'composer_se' in call]


@pytest.mark.parametrize('placement', ['conv', 'block'])
def test_a_compiled_se_model_takes_an_empty_batch(stand_in, placement):
    """An empty batch, compiled for training: what eager gives (an empty output, the statistics kept), no kernel."""
    model, _ = se_basic_blocks(placement)
    eager = copy.deepcopy(model)
    empty = torch.randn(0, 8, 6, 5)
    out, graphs = compiled_graphs(model, empty)
    out.sum().backward()
    assert out.shape == eager(empty).shape == empty.shape
    assert not [call for call in graph_calls(graphs['forward']) if call.endswith('_kernel')]
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        assert torch.equal(b, c), name
