"""One command on a machine with one CUDA GPU: is SE right there, and what does it cost?

    python benchmarks/gpu_suite.py --out DIR            # about 6 minutes on one H100/H200
    python benchmarks/gpu_suite.py --out DIR --dry-run  # every part at toy size, on CPU

Parts, in this order (each in its own ``try``: a failure is recorded and the rest runs):

1. **correctness**: on a small model in float32 (TF32 off), ours (folded after convs, and
   the fused block end) and the same SE written in plain operations, each against
   float64, outputs and gradients, and on CUDA ours under ``torch.compile`` too (its
   Triton kernels in the compiled graph); the passes against float64 on a large bf16
   channels_last activation;
2. **kernels**: SE + BatchNorm (folded) and BatchNorm + SE (block end) against
   ``F.batch_norm`` alone on one ResNet-50 activation, forward and forward + backward,
   with the bytes each must move and the bandwidth reached;
3. **arms**: torchvision ResNet-50, batch 256, bf16 autocast, channels_last, in the three
   arms a user chooses from: eager, ``torch.compile`` (default mode) and ``torch.compile``
   with ``mode='reduce-overhead'`` (CUDA graphs). Variants: no SE; ours after convs at
   ``min_channels`` 512 and 128 (folded; and unfolded at 128, eager only, for inference);
   ours at the paper's place (the fused block end); Composer's ``SqueezeExcite`` (its rule,
   ``min(in, out) >= 128``); and timm's ``resnet50`` and ``seresnet50`` where timm imports.
   Training and inference images/s, the peak memory a training step allocates above what
   is resident, and for the compiled arms the compile time, the CUDA-graph skips Inductor
   counts (0 is the aim) and one training step under
   ``torch.cuda.set_sync_debug_mode('error')`` (no host sync). Each compiled arm builds
   its variants in order of importance until ``--compile-budget`` seconds of it are
   spent; the rest are listed as skipped;
4. **resnet56**: the CIFAR ResNet-56 at batch 1024, 32x32, a training step, eager: no SE,
   the recipe's SE (``latent_channels=64, min_channels=64``) and the paper's place;
5. **host**: ``benchmarks/host_cost.py``'s measurement, the CPU time to issue a training
   step of one fused call on a small activation, against ``F.batch_norm``;
6. **profile**: ``torch.profiler`` over two eager training steps of ours at
   ``min_channels=128`` and at the paper's place, and of no SE: the kernels that take the
   time.

Timing: every variant of an arm lives on the GPU at once; rounds visit them in turn (in a
rotated order), each timing a few steps between CUDA events after warm-up; a figure is
the median over rounds. Writes ``DIR/gpu_results.json`` after each part,
``DIR/gpu_results.md``, ``DIR/gpu_throughput.png`` and ``DIR/gpu_profile.txt``, and
prints the tables. ``--dry-run`` compiles with the ``aot_eager`` backend (no code
generation, no CUDA graphs on CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.variants import chosen_convs, with_composer_se, with_our_block_se, with_our_se  # noqa: E402
from composer_se import apply_squeeze_excite  # noqa: E402
from composer_se.batchnorm import se_batch_norm  # noqa: E402
from composer_se.layers import SqueezeExcite2d  # noqa: E402
from composer_se.recipes.models.cifar_resnet import cifar_resnet  # noqa: E402

#: (arm, variant) -> the aim for its training images/s against no SE in the same arm (bf16, channels_last)
TARGETS = {
    ('eager', 'ours conv min512 folded'): 0.98, ('compiled', 'ours conv min512 folded'): 0.97,
    ('reduce-overhead', 'ours conv min512 folded'): 0.97,
    ('eager', 'ours conv min128 folded'): 0.95, ('compiled', 'ours conv min128 folded'): 0.95,
    ('reduce-overhead', 'ours conv min128 folded'): 0.95,
    ('eager', 'ours block (fused)'): 0.96, ('compiled', 'ours block (fused)'): 0.96,
    ('reduce-overhead', 'ours block (fused)'): 0.96,
}
#: The arms: torch.compile's options for each (None: eager).
ARMS = {'eager': None, 'compiled': {}, 'reduce-overhead': {'mode': 'reduce-overhead'}}
#: The variants compiled in the compiled arms, most important first (compiling stops when the time budget is spent).
COMPILED_VARIANTS = ('plain', 'ours conv min512 folded', 'ours block (fused)', 'ours conv min128 folded',
                     'composer min128', 'timm resnet50', 'timm seresnet50')


@dataclass
class Sizes:
    """How big each part runs: the real sizes on a GPU, toy sizes on CPU for ``--dry-run``."""

    device: str
    batch: int = 256
    image: int = 224
    cifar_batch: int = 1024
    warmup: int = 5
    rounds: int = 7
    steps: int = 5
    kernel_shape: tuple = (256, 256, 56, 56)
    resnet50: Callable[[], nn.Module] = torchvision.models.resnet50
    cifar_depth: int = 56
    compile_backend: str = 'inductor'

    @classmethod
    def dry_run(cls) -> 'Sizes':
        def tiny_resnet():  # ResNet-50's structure (Bottlenecks up to 2048 channels), one narrow block a stage
            return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                                    width_per_group=8)

        return cls('cpu', batch=2, image=32, cifar_batch=8, warmup=1, rounds=2, steps=1, kernel_shape=(4, 16, 8, 8),
                   resnet50=tiny_resnet, cifar_depth=20, compile_backend='aot_eager')


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


class Timer:
    """Seconds between two points of the device's stream (CUDA events on a GPU)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == 'cuda':
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == 'cuda':
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


class Bench:
    """Trains and evaluates variants of one model on one batch, in bf16 autocast and channels_last."""

    def __init__(self, sizes: Sizes, batch: int, image: int, classes: int = 1000):
        self.sizes, self.device = sizes, sizes.device
        self.x = torch.randn(batch, 3, image, image, device=self.device).to(memory_format=torch.channels_last)
        self.y = torch.randint(0, classes, (batch,), device=self.device)

    def prepare(self, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device).to(memory_format=torch.channels_last).train()
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.autocast(self.device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(self.x).float(), self.y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step(self, model: nn.Module) -> None:
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16):
            model(self.x)

    def step_memory(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """The most memory three training steps allocate above what is resident before them (0 on CPU): activations
        kept for backward, gradients and workspaces; the same measure whatever else lives on the GPU."""
        if self.device != 'cuda':
            return 0
        sync(self.device)
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            self.train_step(model, optimizer)
        sync(self.device)
        return torch.cuda.max_memory_allocated() - resident

    def throughput(self, prepared: dict[str, tuple[nn.Module, torch.optim.Optimizer]], infer: bool = True,
                   warmup: int = None) -> dict:
        """Median images/s per variant (a prepared model and its optimizer), training and inference, over interleaved
        rounds."""
        sizes = self.sizes
        for name, (model, optimizer) in prepared.items():
            for _ in range(sizes.warmup if warmup is None else warmup):
                self.train_step(model, optimizer)
            if infer:
                model.eval()
                self.infer_step(model)
                model.train()
        sync(self.device)
        times = {name: {'train': [], 'infer': []} for name in prepared}
        names = list(prepared)
        for round_index in range(sizes.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                model, optimizer = prepared[name]
                with Timer(self.device) as timer:
                    for _ in range(sizes.steps):
                        self.train_step(model, optimizer)
                times[name]['train'].append(timer.seconds / sizes.steps)
                if infer:
                    model.eval()
                    with Timer(self.device) as timer:
                        for _ in range(sizes.steps):
                            self.infer_step(model)
                    model.train()
                    times[name]['infer'].append(timer.seconds / sizes.steps)
        batch = self.x.shape[0]
        return {
            name: {kind: batch / statistics.median(values) for kind, values in kinds.items() if values}
            for name, kinds in times.items()
        }


def part_correctness(sizes: Sizes) -> dict:
    """Ours and SE in plain operations, each in float32 against float64; kernels against float64.

    TF32 is turned off for the float32 models (cuDNN and cuBLAS use it by default for
    float32 convs and matrix products, which would swamp the comparison).
    """
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _correctness(sizes)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _correctness(sizes: Sizes) -> dict:
    device = sizes.device
    torch.manual_seed(0)
    checks = {}
    base = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(8, 3, 64, 64, device=device)
    weights = torch.randn(8, 10, device=device)

    def run(model, inputs):
        out = model(inputs)
        (out * weights.to(out.dtype)).sum().backward()
        return out.detach(), [p.grad for p in model.parameters()]

    for placement, kwargs in (('conv', {'latent_channels': 16, 'min_channels': 64}),
                              ('block', {'latent_channels': 1 / 16, 'min_channels': 1, 'placement': 'block'})):
        ours = copy.deepcopy(base)
        report = apply_squeeze_excite(ours, **kwargs)
        ours.to(device)
        # SE in plain operations (TorchScript runs SE in the conv, or after the BatchNorm, with
        # torch's own batch_norm), with the same weights, in float32 and in float64.
        plain = torch.jit.script(copy.deepcopy(ours))
        exact = torch.jit.script(copy.deepcopy(ours).double())
        # Under torch.compile on CUDA the compiled graph launches the Triton kernels itself.
        compiled = torch.compile(copy.deepcopy(ours)) if device == 'cuda' else None
        runs = {'ours': run(ours, x), 'plain SE': run(plain, x)}
        if compiled is not None:
            runs['ours compiled'] = run(compiled, x)
        exact_out, exact_grads = run(exact, x.double())
        checks[f'{placement}: blocks (folded)'] = f'{report.num_blocks} ({report.num_folded})'
        for label, (o, g) in runs.items():
            checks[f'{placement}, float32 {label}: output vs float64'] = relative_error(o, exact_out)
            checks[f'{placement}, float32 {label}: worst gradient vs float64'] = max(
                relative_error(a, b) for a, b in zip(g, exact_grads))
        with torch.no_grad():
            ours.eval(), exact.eval()
            checks[f'{placement}, float32 ours: eval output vs float64'] = relative_error(ours(x), exact(x.double()))
    # The fused functions on a large bf16 channels_last activation, against float64.
    u = (torch.randn(sizes.kernel_shape, device=device) * 2 + 1).to(torch.bfloat16).to(
        memory_format=torch.channels_last).requires_grad_()
    c = u.shape[1]
    se = SqueezeExcite2d(c, max(1, c // 16)).to(device)
    for name, fused, reference in (
        ('SE then BN', lambda t, s, n: se_batch_norm(t, s, n, True, 0.1, n.running_mean, n.running_var),
         lambda t, s, n: n(s(t))),
        ('BN then SE', lambda t, s, n: se_batch_norm(t, s, n, False, 0.1, n.running_mean, n.running_var),
         lambda t, s, n: s(n(t))),
    ):
        norm = nn.BatchNorm2d(c).to(device)
        out = fused(u, se, norm)
        g = torch.randn_like(out)
        (grad_u,) = torch.autograd.grad(out, u, g)
        u64 = u.detach().double().requires_grad_()
        se64, norm64 = copy.deepcopy(se).double(), nn.BatchNorm2d(c).to(device).double()
        out64 = reference(u64, se64, norm64)
        (grad64,) = torch.autograd.grad(out64, u64, g.double())
        checks[f'{name}, bf16 channels_last {tuple(u.shape)}: output vs float64'] = relative_error(out, out64)
        checks[f'{name}, bf16 channels_last {tuple(u.shape)}: grad_u vs float64'] = relative_error(grad_u, grad64)
        checks[f'{name}: output keeps channels_last'] = bool(out.is_contiguous(memory_format=torch.channels_last))
    return checks


def part_kernels(sizes: Sizes) -> dict:
    """SE + BN (folded), BN + SE (block end) and F.batch_norm alone on one activation, bf16 channels_last."""
    device = sizes.device
    u = torch.randn(sizes.kernel_shape, device=device).to(torch.bfloat16).to(
        memory_format=torch.channels_last).requires_grad_()
    c = u.shape[1]
    se = SqueezeExcite2d(c, 64).to(device)
    norm = nn.BatchNorm2d(c).to(device)
    g = torch.randn_like(u)
    variants = {
        'F.batch_norm': lambda: F.batch_norm(u, norm.running_mean, norm.running_var, norm.weight, norm.bias, True),
        'SE then BN (folded)': lambda: se_batch_norm(u, se, norm, True, 0.1, norm.running_mean, norm.running_var),
        'BN then SE (block end)': lambda: se_batch_norm(u, se, norm, False, 0.1, norm.running_mean,
                                                        norm.running_var),
    }
    size = u.numel() * u.element_size()
    result = {'shape': list(u.shape), 'activation_bytes': size}
    for name, fn in variants.items():
        for _ in range(3):
            fn().backward(g)
        times = {'forward': [], 'forward+backward': []}
        for _ in range(sizes.rounds):
            with Timer(device) as timer:
                for _ in range(sizes.steps):
                    fn()
            times['forward'].append(timer.seconds / sizes.steps)
            with Timer(device) as timer:
                for _ in range(sizes.steps):
                    fn().backward(g)
            times['forward+backward'].append(timer.seconds / sizes.steps)
        # Bytes that must move: forward reads u twice and writes out; backward reads g and u
        # twice (sums, then the elementwise pass) and writes grad_u.
        floor = {'forward': 3 * size, 'forward+backward': 8 * size}
        result[name] = {
            kind: {'ms': 1e3 * statistics.median(values), 'GB/s': floor[kind] / statistics.median(values) / 1e9}
            for kind, values in times.items()
        }
    if device == 'cuda':  # how the folded forward + backward depends on the activation kernels' tiles
        from composer_se.batchnorm import triton_passes as triton_ops
        defaults = triton_ops.TILE, triton_ops.MAX_TILE_CHANNELS
        sweep = {}
        try:
            for tile in (2048, 4096, 8192):
                for channels in (64, 128, 256):
                    triton_ops.TILE, triton_ops.MAX_TILE_CHANNELS = tile, channels
                    triton_ops._tile.cache_clear()  # tiles are cached per shape
                    triton_ops._cached_geometry.cache_clear()
                    fn = variants['SE then BN (folded)']
                    for _ in range(2):
                        fn().backward(g)
                    with Timer(device) as timer:
                        for _ in range(sizes.steps):
                            fn().backward(g)
                    sweep[f'TILE={tile} MAX_TILE_CHANNELS={channels}'] = 1e3 * timer.seconds / sizes.steps
        finally:
            triton_ops.TILE, triton_ops.MAX_TILE_CHANNELS = defaults
            triton_ops._tile.cache_clear()
            triton_ops._cached_geometry.cache_clear()
        result['tile sweep, SE then BN forward+backward ms'] = sweep
    return result


def resnet50_variants(sizes: Sizes) -> dict[str, nn.Module]:
    """The variants of the arms, each built from one ResNet-50 (its structure, at toy size, for a dry run)."""
    torch.manual_seed(0)
    base = sizes.resnet50()
    variants = {'plain': copy.deepcopy(base)}
    for minimum in (512, 128):
        names = chosen_convs(base, 'out', minimum)
        variants[f'ours conv min{minimum} folded'] = with_our_se(base, names, 64, fold=True)
    variants['ours conv min128 unfolded'] = with_our_se(base, chosen_convs(base, 'out', 128), 64, fold=False)
    variants['ours block (fused)'] = with_our_block_se(base)
    try:
        variants['composer min128'] = with_composer_se(base, chosen_convs(base, 'composer', 128), 64)
    except ImportError as error:
        print(f'# Composer does not import ({error}); its SqueezeExcite is left out')
    try:
        import timm
        if sizes.device == 'cuda':
            variants['timm resnet50'] = timm.create_model('resnet50', pretrained=False)
            variants['timm seresnet50'] = timm.create_model('seresnet50', pretrained=False)
    except ImportError:
        print('# timm does not import; its resnet50 and seresnet50 are left out')
    return variants


def _sync_free_step(bench: Bench, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """One training step under ``torch.cuda.set_sync_debug_mode('error')``: ``'no sync'``, or what synchronised."""
    if bench.device != 'cuda':
        return 'not on CUDA'
    torch.cuda.set_sync_debug_mode('error')
    try:
        bench.train_step(model, optimizer)
        return 'no sync'
    except RuntimeError as error:
        return f'sync: {str(error).splitlines()[0]}'
    finally:
        torch.cuda.set_sync_debug_mode(0)
        sync(bench.device)


def part_arms(sizes: Sizes, compile_budget: float) -> dict:
    """Each arm (eager, compiled, reduce-overhead) with its variants: see the module docstring, part 3."""
    from torch._dynamo.utils import counters
    variants = resnet50_variants(sizes)
    bench = Bench(sizes, sizes.batch, sizes.image)
    blocks = {name: sum(isinstance(m, SqueezeExcite2d) or (type(m).__name__ in ('SEModule', 'SqueezeExciteConv2d') and
                                                            not isinstance(m, nn.Conv2d)) for m in model.modules())
              for name, model in variants.items()}
    results = {}
    for arm, options in ARMS.items():
        rows, prepared, skipped = {}, {}, []
        deadline = time.time() + compile_budget
        names = list(variants) if options is None else [name for name in COMPILED_VARIANTS if name in variants]
        for name in names:
            if options is not None and time.time() > deadline:
                skipped.append(name)
                continue
            torch._dynamo.reset()
            skips_before = counters['inductor']['cudagraph_skips']
            started = time.time()
            model, optimizer = bench.prepare(copy.deepcopy(variants[name]))
            if options is not None:
                backend = sizes.compile_backend
                model = torch.compile(model, backend=backend, **(options if backend == 'inductor' else {}))
            for _ in range(2):  # compiles the training graph and, for CUDA graphs, records it
                bench.train_step(model, optimizer)
            model.eval()
            bench.infer_step(model)  # ... and the inference graph
            model.train()
            sync(sizes.device)
            row = {'blocks': blocks[name], 'max_memory_allocated': bench.step_memory(model, optimizer)}
            if options is not None:
                row['compile_and_warmup_s'] = time.time() - started
                row['cudagraph_skips'] = counters['inductor']['cudagraph_skips'] - skips_before
                row['host_sync'] = _sync_free_step(bench, model, optimizer)
            rows[name], prepared[name] = row, (model, optimizer)
        for name, speed in bench.throughput(prepared, warmup=1).items():
            rows[name]['train_images_per_s'] = speed['train']
            rows[name]['infer_images_per_s'] = speed['infer']
        results[arm] = {'rows': rows, 'skipped': skipped}
        del prepared
        if sizes.device == 'cuda':
            torch.cuda.empty_cache()
    return results


def part_resnet56(sizes: Sizes) -> dict:
    torch.manual_seed(0)
    base = cifar_resnet(sizes.cifar_depth)
    ours = copy.deepcopy(base)
    apply_squeeze_excite(ours, latent_channels=64, min_channels=64)
    variants = {'plain': base, 'ours recipe (64, min 64)': ours, 'ours block (fused)': with_our_block_se(base)}
    bench = Bench(sizes, sizes.cifar_batch, 32, classes=10)
    prepared = {name: bench.prepare(model) for name, model in variants.items()}
    memory = {name: bench.step_memory(*pair) for name, pair in prepared.items()}
    speed = bench.throughput(prepared, infer=False)
    return {name: {'train_images_per_s': speed[name]['train'], 'max_memory_allocated': memory[name]}
            for name in variants}


def part_host(sizes: Sizes) -> dict:
    """``benchmarks/host_cost.py`` on the suite's device: the host time to issue one fused call's training step."""
    from benchmarks.host_cost import issue_times
    return issue_times(sizes.device, batch=8, channels=64, latent=16, size=4, rounds=7,
                       n_steps=50 if sizes.device == 'cuda' else 3)


def part_profile(sizes: Sizes, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    base = sizes.resnet50()
    variants = {
        'plain': base,
        'ours conv min128 folded': with_our_se(base, chosen_convs(base, 'out', 128), 64),
        'ours block (fused)': with_our_block_se(base),
    }
    bench = Bench(sizes, sizes.batch, sizes.image)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sizes.device == 'cuda' else [])
    texts, totals = [], {}
    for name, model in variants.items():
        model, optimizer = bench.prepare(model)
        for _ in range(2):
            bench.train_step(model, optimizer)
        sync(sizes.device)
        with profile(activities=activities) as prof:
            for _ in range(2):
                bench.train_step(model, optimizer)
            sync(sizes.device)
        averages = prof.key_averages()
        device_time = 'device_time_total' if hasattr(averages[0], 'device_time_total') else 'cuda_time_total'
        sort = device_time if sizes.device == 'cuda' else 'cpu_time_total'
        texts.append(f'## {name}: two training steps\n\n' + averages.table(sort_by=sort, row_limit=30))
        totals[name] = {'ops with device time': sum(1 for e in averages if getattr(e, device_time, 0) > 0),
                        'their calls': sum(e.count for e in averages if getattr(e, device_time, 0) > 0)}
        del model, optimizer
    (out / 'gpu_profile.txt').write_text('\n\n'.join(texts))
    return totals


def environment(device: str) -> dict:
    import importlib.metadata as metadata
    versions = {}
    for package in ('torch', 'torchvision', 'triton', 'timm', 'mosaicml'):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        'device': torch.cuda.get_device_name() if device == 'cuda' else f'CPU ({platform.machine()})',
        'python': platform.python_version(),
        'versions': versions,
        'date': str(date.today()),
    }


def markdown(results: dict) -> str:
    env = results['environment']
    lines = [f"# GPU suite: {env['device']}, torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
             f"{env['date']}", '']
    if 'correctness' in results:
        lines += ['## Correctness', '', '| check | value |', '|---|---|']
        lines += [f'| {k} | {v:.2e} |' if isinstance(v, float) else f'| {k} | {v} |'
                  for k, v in results['correctness'].items()]
        lines.append('')
    if 'kernels' in results:
        k = results['kernels']
        lines += [f"## One activation {tuple(k['shape'])}, bf16 channels_last", '',
                  '| function | forward ms | GB/s | forward+backward ms | GB/s |', '|---|---|---|---|---|']
        for name, v in k.items():
            if isinstance(v, dict) and 'forward' in v:
                lines.append(f"| {name} | {v['forward']['ms']:.3f} | {v['forward']['GB/s']:.0f} | "
                             f"{v['forward+backward']['ms']:.3f} | {v['forward+backward']['GB/s']:.0f} |")
        if 'tile sweep, SE then BN forward+backward ms' in k:
            lines += ['', 'Tile sweep (SE then BN, forward + backward, ms): ' + ', '.join(
                f'{name}: {ms:.3f}' for name, ms in k['tile sweep, SE then BN forward+backward ms'].items())]
        lines.append('')
    tables = [(f'ResNet-50, {arm}, bf16 autocast, channels_last', arm, results['arms'][arm])
              for arm in results.get('arms', {})]
    if 'resnet56' in results:
        tables.append(('ResNet-56 (CIFAR), eager, bf16 autocast, channels_last', 'resnet56',
                       {'rows': results['resnet56'], 'skipped': []}))
    for title, arm, table in tables:
        rows = table['rows']
        plain = rows.get('plain', {})
        compiled = any('cudagraph_skips' in v for v in rows.values())
        extra = ' compile s | CUDA-graph skips | host sync |' if compiled else ''
        lines += [f'## {title}', '', '| variant | SE blocks | train img/s | vs plain | target | infer img/s | '
                  'vs plain | step memory | vs plain |' + extra,
                  '|---|---|---|---|---|---|---|---|---|' + ('---|---|---|' if compiled else '')]
        for name, v in rows.items():
            reference = rows.get('timm resnet50', plain) if name.startswith('timm se') else plain

            def ratio(key, v=v, reference=reference):
                return f'{v[key] / reference[key]:.3f}' if v.get(key) and reference.get(key) else '-'

            train = v.get('train_images_per_s')
            infer = v.get('infer_images_per_s')
            memory = v.get('max_memory_allocated')
            line = (f"| {name} | {v.get('blocks', '-')} | {f'{train:,.0f}' if train else '-'} | "
                    f"{ratio('train_images_per_s')} | {TARGETS.get((arm, name), '-')} | "
                    f"{f'{infer:,.0f}' if infer else '-'} | {ratio('infer_images_per_s')} | "
                    f"{f'{memory / 2**30:.2f} GiB' if memory else '-'} | {ratio('max_memory_allocated')} |")
            if compiled:
                line += f" {v['compile_and_warmup_s']:.0f} | {v['cudagraph_skips']} | {v['host_sync']} |"
            lines.append(line)
        if table['skipped']:
            lines += ['', f"Not compiled within the time budget: {', '.join(table['skipped'])}."]
        lines.append('')
    small_tables = {  # part: title, columns, and each row's cells from its values
        'host': ('Host work per fused call (8 x 64 x 4 x 4, latent 16; benchmarks/host_cost.py)',
                 ('training step', 'host us', 'vs F.batch_norm', 'Triton launches', 'torch ops'),
                 lambda v: (f"{v['host_us']:.1f}", f"{v['vs_batch_norm']:.2f}", v['triton_launches'], v['torch_ops'])),
        'profile': ('Profile (two training steps; the kernel tables are in gpu_profile.txt)',
                    ('variant', 'ops with device time', 'their calls'),
                    lambda v: (v['ops with device time'], v['their calls'])),
    }
    for part, (title, columns, cells) in small_tables.items():
        if part in results:
            lines += [f'## {title}', '', '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
            lines += ['| ' + ' | '.join(map(str, (name, *cells(v)))) + ' |' for name, v in results[part].items()]
            lines.append('')
    if results.get('failures'):
        lines += ['## Failures', ''] + [f'- {name}: {error}' for name, error in results['failures'].items()] + ['']
    return '\n'.join(lines)


def plot(results: dict, path: Path) -> None:
    """Training images/s against no SE, per arm and variant, with the targets."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    bars = []  # (label, ratio, target, ours)
    for arm, table in results.get('arms', {}).items():
        rows = table['rows']
        for name, v in rows.items():
            reference = rows.get('timm resnet50' if name.startswith('timm se') else 'plain')
            if name in ('plain', 'timm resnet50') or not reference or not v.get('train_images_per_s'):
                continue
            bars.append((f'{arm}: {name}', v['train_images_per_s'] / reference['train_images_per_s'],
                         TARGETS.get((arm, name)), 'ours' in name))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(bars) + 1.5))
    for index, (label, ratio, target, ours) in enumerate(bars):
        ax.barh(index, ratio, color='tab:blue' if ours else 'tab:grey')
        ax.text(ratio, index, f' {ratio:.3f}', va='center')
        if target is not None:
            ax.plot([target] * 2, [index - 0.4, index + 0.4], color='tab:red')
    ax.set_yticks(range(len(bars)), [bar[0] for bar in bars])
    ax.set_xlim(0.5, 1.1)
    ax.axvline(1.0, color='black', lw=0.5)
    ax.set_xlabel('training images/s against no SE in the same arm (red: target)')
    env = results['environment']
    ax.set_title(f"ResNet-50, batch {results['sizes']['batch']}, bf16, channels_last: {env['device']}, "
                 f"torch {env['versions']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, type=Path)
    parser.add_argument('--dry-run', action='store_true', help='every part at toy size on CPU')
    parser.add_argument('--parts', nargs='+', default=['correctness', 'kernels', 'arms', 'resnet56', 'host', 'profile'])
    parser.add_argument('--compile-budget', type=float, default=100.0,
                        help='seconds each compiled arm may spend before it compiles no further variant (default 100)')
    args = parser.parse_args(argv)
    started = time.time()
    if args.dry_run:
        sizes = Sizes.dry_run()
    elif torch.cuda.is_available():
        sizes = Sizes('cuda')
        torch.backends.cudnn.benchmark = True
    else:
        parser.error('no CUDA device: run on a machine with one, or use --dry-run')
    args.out.mkdir(parents=True, exist_ok=True)
    results = {'environment': environment(sizes.device), 'sizes': {'batch': sizes.batch, 'image': sizes.image,
                                                                    'cifar_batch': sizes.cifar_batch},
               'failures': {}}
    print(f"# {results['environment']}", flush=True)
    parts = {
        'correctness': lambda: part_correctness(sizes),
        'kernels': lambda: part_kernels(sizes),
        'arms': lambda: part_arms(sizes, args.compile_budget),
        'resnet56': lambda: part_resnet56(sizes),
        'host': lambda: part_host(sizes),
        'profile': lambda: part_profile(sizes, args.out),
    }
    for name in args.parts:
        part_started = time.time()
        try:
            results[name] = parts[name]()
        except Exception as error:  # a failed part is reported; the others still run
            results['failures'][name] = f'{type(error).__name__}: {error}'
            traceback.print_exc()
        print(f'# {name}: {time.time() - part_started:.0f} s', flush=True)
        (args.out / 'gpu_results.json').write_text(json.dumps(results, indent=1))
    results['total_seconds'] = time.time() - started
    (args.out / 'gpu_results.json').write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (args.out / 'gpu_results.md').write_text(text)
    try:
        plot(results, args.out / 'gpu_throughput.png')
    except ImportError as error:
        print(f'# no plot: {error} (pip install matplotlib)')
    print(text, flush=True)
    return 1 if results['failures'] else 0


if __name__ == '__main__':
    sys.exit(main())
