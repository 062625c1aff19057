"""What one fused SE + BatchNorm call costs the host: CPU time to issue a training step's work.

    python benchmarks/host_cost.py                 # a CUDA GPU: real launches
    python benchmarks/host_cost.py --stub-kernels  # no GPU: the Python around the kernels

Eager ResNet-50 on a fast GPU is bound by the host issuing its work (see
``benchmarks/RESULTS.md``), so the CPU time of each call, not its GPU time, sets what SE
costs there. This times the forward and backward of one call on a small activation (the
GPU idles; nothing synchronises inside the timed loop) for ``F.batch_norm`` alone, SE
then BatchNorm (:func:`~composer_se.fused.squeeze_excite_batch_norm`) and BatchNorm then SE
(:func:`~composer_se.fused.batch_norm_squeeze_excite`), and, for comparison, SE written
plainly before ``F.batch_norm`` (an unfolded block), and counts what each step issues:
Triton launches and torch operations (views and other metadata-only operations
excluded).

``--stub-kernels`` runs the Triton path on CPU tensors (``TRITON_INTERPRET=1``) with each
kernel launch replaced by a counter: it times everything the host does except Triton's
own launch, on any machine. Timing protocol: interleaved rounds, the minimum over
rounds, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

if '--stub-kernels' in sys.argv:
    os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported: the Triton path on CPU tensors

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.accuracy import device_name  # noqa: E402
from composer_se.fused import batch_norm_squeeze_excite, squeeze_excite_batch_norm  # noqa: E402
from composer_se.layers import SqueezeExcite2d  # noqa: E402

#: Operations that only make views or read metadata: no kernel on any device.
METADATA_OPS = {'view', 'permute', 't', 'transpose', 'unbind', 'select', 'slice', 'detach', 'alias', 'as_strided',
                'expand', 'unsqueeze', 'squeeze', '_reshape_alias', 'reshape', 'split', 'empty', 'empty_like',
                'new_empty', 'empty_strided'}


def stub_kernels(launches: Counter) -> None:
    """Replace each Triton kernel of :mod:`composer_se.fused.triton_ops` by one that counts its launches."""
    from composer_se.fused import triton_ops

    class Counted:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches[self.name] += 1
            return launch

    for name in dir(triton_ops):
        if name.endswith('_kernel'):
            setattr(triton_ops, name, Counted(name))


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


def steps(batch: int, channels: int, latent: int, size: int, device: str) -> dict:
    """The three training steps to time, each a forward and a backward of one call."""
    dtype = torch.bfloat16 if device == 'cuda' else torch.float32
    u = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    u = u.to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(u)
    se = SqueezeExcite2d(channels, latent).to(device)
    norm = torch.nn.BatchNorm2d(channels).to(device)

    def batch_norm():
        F.batch_norm(u, norm.running_mean, norm.running_var, norm.weight, norm.bias, True, 0.1, norm.eps).backward(grad)

    def se_then_bn():
        squeeze_excite_batch_norm(u, se, norm, 0.1, norm.running_mean, norm.running_var).backward(grad)

    def bn_then_se():
        batch_norm_squeeze_excite(u, norm, se, 0.1, norm.running_mean, norm.running_var).backward(grad)

    def plain_se_then_bn():  # SE written plainly, as an unfolded block and Composer's SE do
        F.batch_norm(se(u), norm.running_mean, norm.running_var, norm.weight, norm.bias, True, 0.1,
                     norm.eps).backward(grad)

    return {'F.batch_norm': batch_norm, 'SE then BatchNorm (folded)': se_then_bn,
            'BatchNorm then SE (block end)': bn_then_se, 'SE then BatchNorm, plain operations': plain_se_then_bn}


def issue_times(device: str, batch: int, channels: int, latent: int, size: int, rounds: int, n_steps: int,
                launches: Counter) -> dict:
    """Per training step: host microseconds (minimum over interleaved rounds), its ratio to ``F.batch_norm``'s,
    Triton launches (counted in ``launches`` by stubbed kernels; 0 otherwise) and torch operations."""
    to_time = steps(batch, channels, latent, size, device)
    rows = {}
    for name, step in to_time.items():
        step()  # warm-up: compiles the kernels once
        launches.clear()
        with OpCounter() as counter:
            step()
        rows[name] = {'triton_launches': sum(launches.values()), 'torch_ops': sum(counter.ops.values()),
                      'ops': dict(sorted(counter.ops.items()))}
    best = dict.fromkeys(to_time, float('inf'))
    for _ in range(rounds):
        for name, step in to_time.items():
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
    device = 'cpu' if args.stub_kernels else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('no CUDA device: run with --stub-kernels to time the host path on CPU')
    torch.set_num_threads(1)
    launches = Counter()
    if args.stub_kernels:
        stub_kernels(launches)
    rows = issue_times(device, args.batch, args.channels, args.latent, args.size, args.rounds, args.steps, launches)
    return {'device': device_name(device == 'cuda'),
            'mode': 'stubbed Triton launches (TRITON_INTERPRET=1)' if args.stub_kernels else 'CUDA',
            'torch': torch.__version__, 'python': platform.python_version(), 'date': date.today().isoformat(),
            'shape': [args.batch, args.channels, args.size, args.size], 'latent': args.latent,
            'rounds': args.rounds, 'steps': args.steps, 'rows': rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--stub-kernels', action='store_true',
                        help='CPU tensors, Triton path, launches replaced by counters (set before torch is imported)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--latent', type=int, default=16)
    parser.add_argument('--size', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--json', type=Path)
    args = parser.parse_args(argv)
    results = measure(args)
    print(f"{results['device']}, {results['mode']}, torch {results['torch']}, {results['date']}; "
          f"activation {'x'.join(map(str, results['shape']))}, latent {results['latent']}; "
          f"minimum over {results['rounds']} rounds of {results['steps']} steps")
    print('| training step (forward + backward) | host us | vs F.batch_norm | Triton launches | torch ops |')
    print('|---|---|---|---|---|')
    for name, row in results['rows'].items():
        print(f"| {name} | {row['host_us']:.1f} | {row['vs_batch_norm']:.2f} | {row['triton_launches']} | "
              f"{row['torch_ops']} |")
    for name, row in results['rows'].items():
        print(f"{name}: {', '.join(f'{op} x{n}' for op, n in row['ops'].items())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
