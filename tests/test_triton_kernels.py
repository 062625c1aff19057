"""The Triton kernels of composer_se.fused, run on the CPU by Triton's interpreter, against float64.

Triton reads ``TRITON_INTERPRET`` when it compiles a kernel, so the checks run in a
child process started with ``TRITON_INTERPRET=1`` (:func:`test_kernels_in_the_interpreter`
runs this file there); in it, ``composer_se.fused`` runs its Triton kernels on CPU
tensors, the whole model path included. The interpreter does not compile, so
:func:`test_every_kernel_compiles_for_an_h100` also compiles every kernel for an sm_90 GPU,
which Triton does without one.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip('triton')

INTERPRETING = os.environ.get('TRITON_INTERPRET') == '1'
ROOT = Path(__file__).resolve().parents[1]
in_the_interpreter = pytest.mark.skipif(not INTERPRETING, reason='runs in the TRITON_INTERPRET=1 child process')


@pytest.mark.skipif(INTERPRETING, reason='this is the child process')
def test_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r'(\d+) passed', result.stdout)
    assert passed and int(passed.group(1)) >= 14, result.stdout[-2000:]  # the child ran the checks, not only this


#: A value for each compile-time argument of the kernels: tile sizes as the launchers pick them, and the optional parts on.
CONSTEXPRS = {'BLOCK_HW': 64, 'BLOCK_C': 16, 'BLOCK_N': 256, 'HAS_RUNNING': True, 'HAS_R2': True}
ACTIVATION_POINTERS = {'x_ptr', 'y_ptr', 'g_ptr', 'u_ptr', 'out_ptr'}  # bf16 activations; the rest is float32
SCALARS = {'momentum', 'eps', 'unbias', 'count', 'area', 'r2_scale'}  # float arguments; the rest are sizes and strides


@pytest.mark.skipif(INTERPRETING, reason='the interpreter does not compile')
def test_every_kernel_compiles_for_an_h100():
    """What the interpreter cannot check: each kernel compiles, through PTX and ptxas, for sm_90 (no GPU needed)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from composer_se.fused import triton_ops
    kernels = [value for name, value in vars(triton_ops).items() if name.endswith('_kernel')]
    assert len(kernels) == 10
    for kernel in kernels:
        constants = {name: tl.float32 if name == 'ACC' else CONSTEXPRS[name]
                     for name in kernel.arg_names if kernel.params[kernel.arg_names.index(name)].is_constexpr}
        signature = {name: 'constexpr' if name in constants else '*bf16' if name in ACTIVATION_POINTERS else
                     '*fp32' if name.endswith('_ptr') else 'fp32' if name in SCALARS else 'i32'
                     for name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
        compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32))
        assert compiled.asm['cubin'], kernel.fn.__name__


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


#: Largest relative error against float64 per dtype: float32 rounding, bf16 rounding of the output.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
LAYOUTS = {'nchw': torch.contiguous_format, 'nhwc': torch.channels_last}


def activation(dtype, layout, shape=(3, 37, 7, 5), mean=3.0, spread=2.0) -> torch.Tensor:
    """Channels and H*W that are no multiple of a tile, a mean well away from zero."""
    return (torch.randn(shape, dtype=torch.float64) * spread + mean).to(dtype).to(memory_format=LAYOUTS[layout])


@in_the_interpreter
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', TOLERANCE, ids=str)
def test_activation_kernels_against_float64(dtype, layout):
    from composer_se.fused import torch_ops, triton_ops
    torch.manual_seed(0)
    u, g = activation(dtype, layout), activation(dtype, layout, mean=0.0)
    n, c = u.shape[:2]
    reference = u.double()
    mean, var = triton_ops.channel_stats(u)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_error(mean, reference.mean((2, 3))) < TOLERANCE[torch.float32]
    assert relative_error(var, reference.var((2, 3), correction=0)) < TOLERANCE[torch.float32]
    g_sum, gu_c = triton_ops.grad_sums(g, u, mean)
    assert relative_error(g_sum, g.double().sum((2, 3))) < 1e-5
    centred = (g.double() * (reference - mean.double()[:, :, None, None])).sum((2, 3))
    assert relative_error(gu_c, centred) < 1e-5
    acc = mean.dtype
    a, b, p, q, r, r2 = (torch.randn(n, c, dtype=acc) for _ in range(6))
    y = triton_ops.affine(u, a, b[0])
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert relative_error(y, reference * a.double()[:, :, None, None] + b[0].double()[:, None, None]) < TOLERANCE[dtype]
    out = triton_ops.affine2(g, u, p, q, mean, r, r2, 0.25)
    expected = torch_ops.affine2(g.double(), reference, p.double(), q.double(), mean.double(), r.double(), r2.double(),
                                 0.25)
    assert out.dtype == dtype and out.is_contiguous(memory_format=LAYOUTS[layout])
    assert relative_error(out, expected) < TOLERANCE[dtype]


@in_the_interpreter
def test_statistics_of_a_large_mean_and_a_small_spread():
    """Blocks merged with Chan's update: no E[x^2] - E[x]^2 cancellation."""
    from composer_se.fused import triton_ops
    u = activation(torch.float32, 'nchw', shape=(2, 3, 40, 40), mean=1e4, spread=1e-2)
    _, var = triton_ops.channel_stats(u)
    assert relative_error(var, u.double().var((2, 3), correction=0)) < 1e-3


@in_the_interpreter
def test_an_input_in_another_layout_is_handled():
    from composer_se.fused import triton_ops
    u = activation(torch.float32, 'nchw', shape=(3, 8, 6, 10))[:, :, :, ::2]  # neither NCHW nor NHWC dense
    mean, var = triton_ops.channel_stats(u)
    assert relative_error(var, u.double().var((2, 3), correction=0)) < 1e-5


@in_the_interpreter
@pytest.mark.parametrize('running', [True, False])
def test_statistic_kernels_against_float64(running):
    from composer_se.fused import torch_ops, triton_ops
    torch.manual_seed(0)
    n, c, count = 37, 45, 37 * 20  # more than one program of channels, batch rows that end mid-block
    m, v, z2, g_sum, gu_c, grad_z = (torch.randn(n, c) for _ in range(6))
    v = v.abs() + 0.1
    gate_scale, weight, bias = torch.tensor(2.0), torch.rand(c) + 0.5, torch.randn(c)
    stats = [torch.randn(c), torch.rand(c) + 0.5]

    def both(name, *args, update=()):
        """The kernel on float32 inputs, and the torch formula on float64 copies."""
        ours = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        exact = [a.double().clone() if isinstance(a, torch.Tensor) else a for a in args]
        results = getattr(triton_ops, name)(*ours), getattr(torch_ops, name)(*exact)
        for index in update:  # running statistics updated in place
            if args[index] is not None:
                assert relative_error(ours[index], exact[index]) < 1e-6, (name, index)
        return results

    rm, rv = stats if running else (None, None)
    got, exact = both('se_bn_forward', m, v, z2, gate_scale, weight, bias, rm, rv, 0.1, 1e-5, count, update=(6, 7))
    for ours, reference in zip(got, exact):
        assert relative_error(ours, reference) < 1e-5
    sig, _, _, mu, rstd = exact
    got, exact = both('se_bn_backward', g_sum, gu_c, m, v, sig, gate_scale, mu, rstd, weight, count)
    for ours, reference in zip(got, exact):
        assert relative_error(ours, reference) < 1e-5
    got, exact = both('bn_stats', m, v, weight, bias, rm, rv, 0.1, 1e-5, count, update=(4, 5))
    for ours, reference in zip(got, exact):
        assert relative_error(ours, reference) < 1e-5
    mu, rstd, _ = exact
    got, exact = both('bn_se_scale', z2, gate_scale, mu, rstd, weight, bias)
    for ours, reference in zip(got, exact):
        assert relative_error(ours, reference) < 1e-5
    sig = exact[0]
    got, exact = both('bn_se_gate_grad', g_sum, gu_c, m, sig, gate_scale, mu, rstd, weight, bias)
    for ours, reference in zip(got, exact):
        assert relative_error(ours, reference) < 1e-5
    got, exact = both('bn_se_backward', g_sum, gu_c, m, sig, gate_scale, grad_z, mu, rstd, weight, count)
    for ours, reference in zip(got, exact):
        assert relative_error(ours, reference) < 1e-5


def assert_trains_as_plain_float64(model: nn.Module, reference: nn.Module, out: torch.Tensor, x: torch.Tensor,
                                   weights: torch.Tensor) -> torch.jit.ScriptModule:
    """``out = model(x)`` and the gradients it gives match the float64 ``reference`` in plain operations (as
    TorchScript runs it); returns the scripted reference."""
    (out * weights).sum().backward()
    plain = torch.jit.script(reference)
    expected = plain(x.double())
    (expected * weights.double()).sum().backward()
    assert relative_error(out, expected) < 1e-5
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) < 1e-4, name
    return plain


@in_the_interpreter
@pytest.mark.parametrize('placement', ['conv', 'block'])
@pytest.mark.parametrize('layout', LAYOUTS)
def test_an_se_model_through_the_kernels_matches_float64(placement, layout):
    """The whole path (the folded BatchNorm, or the block end) on the Triton kernels: outputs and gradients."""
    from composer_se.fused import kernels_for, triton_ops
    from tests.helpers import se_basic_blocks
    model, blocks = se_basic_blocks(placement)
    assert blocks == (4 if placement == 'conv' else 2)
    assert kernels_for(torch.zeros(1)) is triton_ops
    reference = copy.deepcopy(model).double()
    x = torch.randn(4, 8, 6, 5)
    weights = torch.randn(4, 8, 6, 5)
    model, x = model.to(memory_format=LAYOUTS[layout]), x.to(memory_format=LAYOUTS[layout])
    out = model(x)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    plain = assert_trains_as_plain_float64(model, reference, out, x, weights)
    # Eval mode, with gradients (a frozen BatchNorm, saliency maps): the kernels' output has none, so the
    # running-statistics path keeps to torch operations there, and matches float64 too.
    model.eval(), plain.eval()
    model.zero_grad(), reference.zero_grad()
    x_grad, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    out, expected = model(x_grad), plain(x64)
    assert relative_error(out, expected) < 1e-5
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert relative_error(x_grad.grad, x64.grad) < 1e-4
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) < 1e-4, name
    with torch.no_grad():  # and without: the kernels
        assert relative_error(model(x), plain(x.double())) < 1e-5


@in_the_interpreter
@pytest.mark.parametrize('placement', ['conv', 'block'])
def test_a_compiled_se_model_runs_the_kernels_as_operators(placement):
    """Under torch.compile the fused functions are the composer_se operators, whole in one graph, and the compiled
    model trains as the float64 plain model does: outputs, gradients, running statistics."""
    from tests.helpers import compiled_operators, se_basic_blocks
    model, blocks = se_basic_blocks(placement)
    assert blocks == (4 if placement == 'conv' else 2)
    reference = copy.deepcopy(model).double()
    x = torch.randn(4, 8, 6, 5).to(memory_format=torch.channels_last)
    weights = torch.randn(4, 8, 6, 5)
    out, operators = compiled_operators(model, x)
    name = 'squeeze_excite_batch_norm' if placement == 'conv' else 'batch_norm_squeeze_excite'
    assert operators == [f'composer_se.{name}.default'] * blocks
    assert_trains_as_plain_float64(model, reference, out, x, weights)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert relative_error(b.double(), c) < 1e-5, name


@in_the_interpreter
@pytest.mark.parametrize('placement', ['conv', 'block'])
def test_a_compiled_se_model_under_bf16_autocast_gives_the_eager_output(placement):
    """Under bf16 autocast (bf16 activations, float32 parameters and statistics) the operators' fake implementations
    give the dtypes the kernels produce, and the compiled model's output is the eager one, bit for bit."""
    from tests.helpers import compiled_operators, se_basic_blocks
    model, blocks = se_basic_blocks(placement)
    assert blocks == (4 if placement == 'conv' else 2)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 8, 6, 5).to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, operators = compiled_operators(model, x)
        expected = eager(x)
    assert len(operators) == blocks
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@in_the_interpreter
@pytest.mark.parametrize('name, min_channels', [('mobilenet_v2', 96), ('efficientnet_b0', 192), ('vgg11_bn', 256),
                                                ('regnet_y_400mf', 208)])
def test_compiled_cnns_beyond_resnets_run_one_operator_per_folded_block(name, min_channels):
    """Inverted residuals, depthwise convs, no residuals, networks with SE modules of their own: compiled, each folded
    block is one operator, and outputs and gradients are the eager ones."""
    import torchvision

    from composer_se import apply_squeeze_excite
    from tests.helpers import compiled_operators
    model = torchvision.models.get_model(name, num_classes=10)
    report = apply_squeeze_excite(model, latent_channels=4, min_channels=min_channels)
    assert report.num_folded == report.num_blocks > 0
    for module in model.modules():  # no random draws: compiled and eager must see the same computation
        if isinstance(module, (nn.Dropout, torchvision.ops.StochasticDepth)):
            module.p = 0.0
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    out, operators = compiled_operators(model, x)
    assert operators == ['composer_se.squeeze_excite_batch_norm.default'] * report.num_folded
    expected = eager(x)
    assert torch.equal(out, expected)
    weights = torch.randn(2, 10)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    # Against the model's largest gradient: a bias whose true gradient is zero (a BatchNorm's, where a BatchNorm
    # follows) gets rounding noise in float32, the same size in both.
    scale = max(q.grad.abs().max() for q in eager.parameters())
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * scale, name
