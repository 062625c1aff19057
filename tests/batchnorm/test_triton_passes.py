"""composer_se/batchnorm/triton_passes.py: the Triton passes, run on the CPU by Triton's interpreter, against
float64.

Triton reads ``TRITON_INTERPRET`` when it makes its kernels, so the checks run in a child
process started with ``TRITON_INTERPRET=1`` (:func:`test_kernels_in_the_interpreter` runs
this file there); in it, ``composer_se.batchnorm`` runs its Triton kernels on CPU tensors,
the whole model path included. The interpreter does not compile, so
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
ROOT = Path(__file__).resolve().parents[2]
in_the_interpreter = pytest.mark.skipif(not INTERPRETING, reason='runs in the TRITON_INTERPRET=1 child process')


@pytest.mark.skipif(INTERPRETING, reason='this is the child process')
def test_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r'(\d+) passed', result.stdout)
    assert passed and int(passed.group(1)) >= 20, result.stdout[-2000:]  # the child ran the checks, not only this


#: A value for each compile-time argument of the kernels: tile sizes as the launches pick them.
BLOCKS = {'BLOCK_HW': 64, 'BLOCK_C': 16, 'BLOCK_N': 16, 'BLOCK_L': 16}
ACTIVATIONS = {'x_ptr', 'y_ptr', 'g_ptr', 'u_ptr', 'out_ptr'}  # the activation's dtype; the rest the accumulation's
SCALARS = {'momentum', 'eps'}  # float arguments; the rest are sizes and strides


@pytest.mark.skipif(INTERPRETING, reason='the interpreter does not compile')
@pytest.mark.parametrize('activation, accumulation, flags', [('*bf16', '*fp32', True), ('*bf16', '*fp32', False),
                                                             ('*fp64', '*fp64', True)], ids=['bf16-on', 'bf16-off',
                                                                                             'fp64'])
def test_every_kernel_compiles_for_an_h100(activation, accumulation, flags):
    """What the interpreter cannot check: each kernel compiles, through PTX and ptxas, for sm_90 (no GPU needed), with
    its switches on and off, and in float64 (whose gate products are not ``tl.dot``)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from composer_se.batchnorm.triton_passes import KERNELS
    assert len(KERNELS) == 12
    acc = tl.float64 if accumulation == '*fp64' else tl.float32
    for name, kernel in KERNELS.items():
        constants = {arg: acc if arg == 'ACC' else BLOCKS.get(arg, flags)
                     for arg in kernel.arg_names if kernel.params[kernel.arg_names.index(arg)].is_constexpr}
        signature = {arg: 'constexpr' if arg in constants else activation if arg in ACTIVATIONS else
                     accumulation if arg.endswith('_ptr') else 'fp32' if arg in SCALARS else 'i32'
                     for arg in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(arg),): value for arg, value in constants.items()})
        assert triton.compile(source, target=GPUTarget('cuda', 90, 32)).asm['cubin'], name


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


#: Largest relative error against float64 per dtype: float32 rounding, bf16 rounding of the output.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
LAYOUTS = {'nchw': torch.contiguous_format, 'nhwc': torch.channels_last}


def activation(dtype, layout, shape=(3, 37, 7, 5), mean=3.0, spread=2.0) -> torch.Tensor:
    """Channels and H*W that are no multiple of a tile, a mean well away from zero."""
    return (torch.randn(shape, dtype=torch.float64) * spread + mean).to(dtype).to(memory_format=LAYOUTS[layout])


def gate_and_norm(channels: int, latent: int, dtype=torch.float32, affine: bool = True):
    """A gate with a spread of values (some near 0 and 1) and a BatchNorm away from its initial state."""
    torch.manual_seed(1)
    se, norm = nn.Linear(channels, latent), nn.BatchNorm2d(channels, affine=affine)
    fc2 = nn.Linear(latent, channels)
    with torch.no_grad():
        fc2.bias.copy_(torch.linspace(-12, 6, channels))
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        if affine:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    params = [se.weight, se.bias, fc2.weight, fc2.bias, torch.tensor(2.0)]
    return [p.detach().to(dtype) for p in params], norm.to(dtype)


def passes_against_float64(dtype, layout, se_first, running, shape=(3, 37, 7, 5), latent=5, affine=True):
    """The Triton passes against the torch passes in float64: output, saved statistics, running statistics,
    gradients, and eval."""
    from composer_se.batchnorm import launch, torch_passes, triton_passes
    torch.manual_seed(0)
    u, g = activation(dtype, layout, shape), activation(dtype, layout, shape, mean=0.0)
    n, c = shape[:2]
    (w1, b1, w2, b2, gate_scale), norm = gate_and_norm(c, latent, affine=affine)
    weight, bias = (norm.weight.detach(), norm.bias.detach()) if affine else (None, None)
    stats = [norm.running_mean.clone(), norm.running_var.clone()] if running else [None, None]
    exact = [t.double() if t is not None else None for t in (w1, b1, w2, b2, gate_scale, weight, bias)]
    exact_stats = [t.double().clone() if t is not None else None for t in stats]
    ours_stats = [t.clone() if t is not None else None for t in stats]
    out, (ws,) = triton_passes.forward(launch.plain_launch, se_first, u, w1, b1, w2, b2, gate_scale, weight, bias,
                                       *ours_stats, *ours_stats, 0.1, 1e-5)
    expected, saved = torch_passes.forward(se_first, u.double(), *exact, *exact_stats, *exact_stats, 0.1, 1e-5)
    assert out.dtype == dtype and out.is_contiguous(memory_format=LAYOUTS[layout])
    assert relative_error(out, expected) < TOLERANCE[dtype]
    layout_of = triton_passes.forward_layout(n, c, latent, se_first)
    names = ('mean', 'var' if se_first else 'z', 'sig', 'mu', 'rstd', 'hidden')
    for name, reference in zip(names, saved):
        offset, size = layout_of[name]
        kept = ws[offset:offset + reference.numel()].view(size)
        assert relative_error(kept, reference) < 10 * TOLERANCE[torch.float32], name
    for ours, reference in zip(ours_stats, exact_stats):
        if ours is not None:
            assert relative_error(ours, reference) < 1e-6
    grads = triton_passes.backward(launch.plain_launch, se_first, g, u, (ws,), w1, b1, w2, b2, gate_scale, weight,
                                   bias)
    expected_grads = torch_passes.backward(se_first, g.double(), u.double(), saved, *exact[:5], exact[5], exact[6])
    for name, ours, reference in zip(('u', 'w1', 'b1', 'w2', 'b2', 'weight', 'bias'), grads, expected_grads):
        if reference is None:
            assert ours is None, name
            continue
        assert ours.dtype == (dtype if name == 'u' else torch.float32), name
        assert relative_error(ours, reference) < max(TOLERANCE[dtype], 1e-4), name
    if running:
        out = triton_passes.infer(launch.plain_launch, se_first, u, w1, b1, w2, b2, gate_scale, weight, bias,
                                  *ours_stats, 1e-5)
        expected = torch_passes.infer(se_first, u.double(), *exact, *[t.double() for t in ours_stats], 1e-5)
        assert out.dtype == dtype and out.is_contiguous(memory_format=LAYOUTS[layout])
        assert relative_error(out, expected) < TOLERANCE[dtype]


@in_the_interpreter
@pytest.mark.parametrize('se_first', [True, False], ids=['se-bn', 'bn-se'])
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', TOLERANCE, ids=str)
def test_passes_against_float64(dtype, layout, se_first):
    passes_against_float64(dtype, layout, se_first, running=True)


@in_the_interpreter
@pytest.mark.parametrize('se_first, affine', [(True, True), (False, True), (False, False)])
def test_passes_without_running_statistics_or_affine_parameters(se_first, affine):
    passes_against_float64(torch.float32, 'nhwc', se_first, running=False, affine=affine)


@in_the_interpreter
@pytest.mark.parametrize('se_first', [True, False], ids=['se-bn', 'bn-se'])
def test_passes_where_every_block_of_the_gate_loops(se_first):
    """A batch and a gate wider than one block of the (N, C) kernels (64 rows, 64 hidden units): the loops over
    batch rows and hidden units, and a first layer's bias gradient summed over several row blocks."""
    passes_against_float64(torch.float32, 'nchw', se_first, running=True, shape=(70, 20, 2, 3), latent=70)


@in_the_interpreter
def test_interpreted_kernels_launch_without_plans():
    """Interpreted kernels have nothing compiled to keep: every launch is the interpreter's own."""
    from composer_se.batchnorm import launch
    assert not launch.PLANS_WORK


@in_the_interpreter
def test_statistics_of_a_large_mean_and_a_small_spread():
    """Blocks merged with Chan's update: no E[x^2] - E[x]^2 cancellation."""
    from composer_se.batchnorm import launch, triton_passes
    u = activation(torch.float32, 'nchw', shape=(2, 3, 40, 40), mean=1e4, spread=1e-2)
    (w1, b1, w2, b2, gate_scale), norm = gate_and_norm(3, 2)
    _, (ws,) = triton_passes.forward(launch.plain_launch, True, u, w1, b1, w2, b2, gate_scale, norm.weight,
                                     norm.bias, None, None, None, None, 0.1, 1e-5)
    var = ws[6:12].view(2, 3)  # the variance's slot, after the (2, 3) mean
    assert relative_error(var, u.double().var((2, 3), correction=0)) < 1e-3


@in_the_interpreter
def test_an_input_in_another_layout_is_handled():
    from composer_se.batchnorm import launch, torch_passes, triton_passes
    u = activation(torch.float32, 'nchw', shape=(3, 8, 6, 10))[:, :, :, ::2]  # neither NCHW nor NHWC dense
    (w1, b1, w2, b2, gate_scale), norm = gate_and_norm(8, 2)
    args = (w1, b1, w2, b2, gate_scale, norm.weight.detach(), norm.bias.detach())
    out, _ = triton_passes.forward(launch.plain_launch, True, u, *args, None, None, None, None, 0.1, 1e-5)
    expected, _ = torch_passes.forward(True, u.double(), *(t.double() for t in args), None, None, None, None, 0.1,
                                       1e-5)
    assert relative_error(out, expected) < 1e-5


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
    from composer_se.batchnorm import runs_triton
    from tests.helpers import se_basic_blocks
    model, blocks = se_basic_blocks(placement)
    assert blocks == (4 if placement == 'conv' else 2)
    assert runs_triton(torch.zeros(1))
    reference = copy.deepcopy(model).double()
    x = torch.randn(4, 8, 6, 5)
    weights = torch.randn(4, 8, 6, 5)
    model, x = model.to(memory_format=LAYOUTS[layout]), x.to(memory_format=LAYOUTS[layout])
    out = model(x)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    plain = assert_trains_as_plain_float64(model, reference, out, x, weights)
    # Eval mode, with gradients (a frozen BatchNorm, saliency maps): the kernels have no backward there, so that path
    # keeps to the block and the BatchNorm in plain operations, and matches float64 too.
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
def test_an_empty_batch_gets_what_plain_batch_norm_gives(placement):
    """No images (the last shard of an evaluation): where the kernels would run, an empty output, in training and
    eval, with a backward pass, and statistics that plain BatchNorms leave as they are (they count the batch)."""
    from composer_se.batchnorm import runs_triton
    from tests.helpers import se_basic_blocks
    model, _ = se_basic_blocks(placement)
    empty = torch.randn(0, 8, 6, 5)
    assert runs_triton(empty)
    before = copy.deepcopy(model.state_dict())
    out = model(empty)
    out.sum().backward()
    assert out.shape == empty.shape
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    for key, value in model.state_dict().items():
        expected = before[key] + 1 if key.endswith('num_batches_tracked') else before[key]
        assert torch.equal(value, expected), key
    with torch.no_grad():
        assert model.eval()(empty).shape == empty.shape
