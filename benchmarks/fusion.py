"""Eval time before and after fusing each conv with its BatchNorm, with and without SE.

    python benchmarks/fusion.py --model resnet50 --batch 8
    python benchmarks/fusion.py --model resnet56 --batch 64
    python benchmarks/fusion.py --model resnet50 --batch 8 --placement block --json out.json

Four variants of one model, in eval mode, without gradients: no SE; no SE with each conv
fused with its BatchNorm (``torch.fx.experimental.optimization.fuse``, the usual deployment
step); SE as trained (folded into the BatchNorms by default, or at the end of the residual
branches with ``--placement block``); and SE after ``composer_se.fuse_for_inference``. The
SE variants' outputs are checked against each other before timing.

Timing protocol (as ``overhead.py``): one process, one thread, interleaved rounds (round r
times every variant once) after warm-up; each figure is the minimum over the rounds,
reported as a ratio to the model without SE, unfused.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.fx.experimental.optimization as fx_optimization

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.overhead import build  # noqa: E402
from composer_se import apply_squeeze_excite, fuse_for_inference  # noqa: E402


def variants(model_name: str, placement: str, latent: float, min_channels: int) -> tuple[dict, int, object]:
    """The four models (see the module's docstring), their input size and the fusion's report."""
    torch.manual_seed(0)
    plain, size = build(model_name)
    se = copy.deepcopy(plain)
    if placement == 'block':
        apply_squeeze_excite(se, 1 / 16, 1, placement='block')
    else:
        apply_squeeze_excite(se, latent, min_channels)
    for model in (plain, se):
        model.eval()
    fused = copy.deepcopy(se)
    report = fuse_for_inference(fused)
    models = {'none': plain, 'none, fused': fx_optimization.fuse(copy.deepcopy(plain)), 'SE': se, 'SE, fused': fused}
    return models, size, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--placement', choices=['conv', 'block'], default='conv')
    parser.add_argument('--latent', type=float, default=64)
    parser.add_argument('--min-channels', type=int, default=512)
    parser.add_argument('--rounds', type=int, default=21)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--json')
    args = parser.parse_args()
    torch.set_num_threads(1)
    latent = int(args.latent) if args.latent >= 1 else args.latent
    models, size, report = variants(args.model, args.placement, latent, args.min_channels)
    x = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        expected, got = models['SE'](x), models['SE, fused'](x)
    error = float((got - expected).abs().max() / expected.abs().max())
    times = {name: float('inf') for name in models}
    with torch.no_grad():
        for step in range(args.warmup + args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                elapsed = time.perf_counter() - start
                if step >= args.warmup:
                    times[name] = min(times[name], elapsed)
    row = {
        'model': args.model, 'batch': args.batch, 'placement': args.placement, 'date': str(date.today()),
        'machine': f'{platform.processor() or platform.machine()}, 1 thread', 'torch': torch.__version__,
        'fused_pairs': report.num_fused, 'unfused_pairs': len(report.unfused),
        'fused_vs_unfused_max_relative_difference': error,
        'seconds': times, 'ratio_to_none': {name: t / times['none'] for name, t in times.items()},
    }
    print(f'{args.model}, batch {args.batch}, placement {args.placement}: {report.num_fused} pairs fused, '
          f'{len(report.unfused)} left; fused output within {error:.1e} of the unfused (relative to its largest)')
    for name, t in times.items():
        print(f'  {name:12s} {t * 1e3:8.1f} ms  x{t / times["none"]:.3f}')
    print(f'  SE, fused / SE: x{times["SE, fused"] / times["SE"]:.3f}')
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + '\n')


if __name__ == '__main__':
    main()
