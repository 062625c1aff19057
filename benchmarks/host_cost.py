"""What one fused SE + BatchNorm call costs the host: CPU time to issue a training step's work.

    python benchmarks/host_cost.py                    # a CUDA GPU: real launches
    python benchmarks/host_cost.py --stand-in-driver  # no GPU: Triton's launch path, nothing launched

Eager ResNet-50 on a fast GPU is bound by the host issuing its work (see
``benchmarks/RESULTS.md``), so the CPU time of each call, not its GPU time, sets what SE
costs there. This times the forward and backward of one call on a small activation (the
GPU idles; nothing synchronises inside the timed loop) for ``F.batch_norm`` alone, SE
then BatchNorm (a block folded into the BatchNorm after its conv) and BatchNorm then SE
(a block at the end of a residual branch), both :func:`composer_se.batchnorm.se_batch_norm`,
and, for comparison, SE written plainly before ``F.batch_norm`` (an unfolded block); and
counts what each step issues: Triton launches (through Triton's launch hook) and torch
operations (views, other metadata-only operations and allocations excluded). Each step starts with no ``.grad`` set, as after
``optimizer.zero_grad()``, so autograd accumulates nothing.

``--stand-in-driver`` runs on CPU tensors with ``benchmarks/stand_in_driver.py`` as
Triton's driver: kernels compile for an H100 (sm_90) and every launch goes through
Triton's launch path, and the launcher then does nothing. It times everything the host
does, launches included, on any machine. Timing protocol: interleaved rounds (each in
another order: every variant starts some), the minimum over rounds, one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.accuracy import device_name  # noqa: E402
from composer_se.batchnorm import se_batch_norm  # noqa: E402
from composer_se.layers import SqueezeExcite2d  # noqa: E402

#: Operations that only make views, read metadata or allocate: no kernel on any device.
METADATA_OPS = {'view', 'permute', 't', 'transpose', 'unbind', 'select', 'slice', 'detach', 'alias', 'as_strided',
                'expand', 'unsqueeze', 'squeeze', '_reshape_alias', 'reshape', 'split', 'empty', 'empty_like',
                'new_empty', 'empty_strided'}


class OpCounter(TorchDispatchMode):
    """Counts the torch operations dispatched, by name, leaving out :data:`METADATA_OPS`."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in METADATA_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_launches(launches: Counter):
    """Counts every Triton kernel launch in the block, by kernel name, through Triton's launch-enter hook."""
    import triton
    try:
        from triton import knobs
        hooks, attribute = knobs.runtime, 'launch_enter_hook'
    except ImportError:  # Triton 3.3: a class attribute of the compiled kernel
        from triton.compiler import CompiledKernel
        hooks, attribute = CompiledKernel, 'launch_enter_hook'
    previous = getattr(hooks, attribute)

    def count(metadata):
        launches[metadata.get()['name'] if hasattr(metadata, 'get') else 'kernel'] += 1

    if hasattr(previous, 'add'):  # Triton 3.5 and later: a chain of hooks
        previous.add(count)
    else:
        setattr(hooks, attribute, count)
    try:
        yield
    finally:
        if hasattr(previous, 'remove'):
            previous.remove(count)
        else:
            setattr(hooks, attribute, previous)
    del triton


def steps(batch: int, channels: int, latent: int, size: int, device: str) -> dict:
    """The training steps to time, each a forward and a backward of one call from no ``.grad``."""
    dtype = torch.bfloat16 if device == 'cuda' else torch.float32
    u = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    u = u.to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(u)
    se = SqueezeExcite2d(channels, latent).to(device)
    norm = torch.nn.BatchNorm2d(channels).to(device)
    params = [u, *se.parameters(), *norm.parameters()]

    def step(forward):
        def run():
            for p in params:
                p.grad = None
            forward().backward(grad)
        return run

    return {
        'F.batch_norm': step(lambda: F.batch_norm(u, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                                  True, 0.1, norm.eps)),
        'SE then BatchNorm (folded)': step(lambda: se_batch_norm(u, se, norm, True, 0.1, norm.running_mean,
                                                                 norm.running_var)),
        'BatchNorm then SE (block end)': step(lambda: se_batch_norm(u, se, norm, False, 0.1, norm.running_mean,
                                                                    norm.running_var)),
        # SE written plainly, as an unfolded block and Composer's SE do
        'SE then BatchNorm, plain operations': step(lambda: F.batch_norm(se(u), norm.running_mean, norm.running_var,
                                                                         norm.weight, norm.bias, True, 0.1,
                                                                         norm.eps)),
    }


def issue_times(device: str, batch: int, channels: int, latent: int, size: int, rounds: int, n_steps: int) -> dict:
    """Per training step: host microseconds (minimum over interleaved rounds), its ratio to ``F.batch_norm``'s,
    Triton launches and torch operations."""
    to_time = steps(batch, channels, latent, size, device)
    rows = {}
    for name, step in to_time.items():
        step()  # warm-up: compiles the kernels once
        launches = Counter()
        with counting_launches(launches), OpCounter() as counter:
            step()
        rows[name] = {'triton_launches': sum(launches.values()), 'torch_ops': sum(counter.ops.values()),
                      'launches': dict(sorted(launches.items())), 'ops': dict(sorted(counter.ops.items()))}
    best = dict.fromkeys(to_time, float('inf'))
    names = list(to_time)
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:  # each starts a round
            step = to_time[name]
            if device == 'cuda':
                torch.cuda.synchronize()  # the previous variant's work is done: the GPU idles
            start = time.perf_counter()
            for _ in range(n_steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / n_steps * 1e6)
    for name, row in rows.items():
        row['host_us'] = best[name]
        row['vs_batch_norm'] = best[name] / best['F.batch_norm']
    return rows


def measure(args: argparse.Namespace) -> dict:
    device = 'cpu' if args.stand_in_driver else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('no CUDA device: run with --stand-in-driver to time the host path on CPU')
    torch.set_num_threads(1)
    context = contextlib.nullcontext()
    if args.stand_in_driver:
        from benchmarks.stand_in_driver import stand_in_driver
        context = stand_in_driver()
    with context:
        rows = issue_times(device, args.batch, args.channels, args.latent, args.size, args.rounds, args.steps)
    import triton
    return {'device': device_name(device == 'cuda'),
            'mode': 'stand-in Triton driver (sm_90, nothing launched)' if args.stand_in_driver else 'CUDA',
            'torch': torch.__version__, 'triton': triton.__version__, 'python': platform.python_version(),
            'date': date.today().isoformat(), 'shape': [args.batch, args.channels, args.size, args.size],
            'latent': args.latent, 'rounds': args.rounds, 'steps': args.steps, 'rows': rows}


def table(results: dict) -> str:
    lines = [f"{results['device']}, {results['mode']}, torch {results['torch']}, triton {results['triton']}, "
             f"{results['date']}; activation {'x'.join(map(str, results['shape']))}, latent {results['latent']}; "
             f"minimum over {results['rounds']} rounds of {results['steps']} steps",
             '| training step (forward + backward) | host us | vs F.batch_norm | Triton launches | torch ops |',
             '|---|---|---|---|---|']
    for name, row in results['rows'].items():
        lines.append(f"| {name} | {row['host_us']:.1f} | {row['vs_batch_norm']:.2f} | {row['triton_launches']} | "
                     f"{row['torch_ops']} |")
    for name, row in results['rows'].items():
        lines.append(f"{name}: {', '.join(f'{op} x{n}' for op, n in row['ops'].items()) or 'no torch ops'}")
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--stand-in-driver', action='store_true',
                        help="CPU tensors; Triton's launch path with a driver that compiles for sm_90 and launches "
                             'nothing')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--latent', type=int, default=16)
    parser.add_argument('--size', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=21)
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--json', type=Path)
    args = parser.parse_args(argv)
    results = measure(args)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
