"""What SE costs: no SE, Composer's SqueezeExcite and ours, on the same convolutions.

    python benchmarks/overhead.py --model resnet50 --batch 8
    python benchmarks/overhead.py --model resnet50 --batch 8 --placement block
    python benchmarks/overhead.py --model resnet56 --batch 64
    python benchmarks/overhead.py --model resnet56 --batch 64 --compile
    python benchmarks/overhead.py --model resnet50 --batch 8 --sweep --plot benchmarks/resnet50_overhead.png

For each variant it prints the SE blocks, parameters added, forward FLOPs added
(``torch.utils.flop_counter``), bytes autograd saves for backward (unique storages seen by
``saved_tensors_hooks``: all of them, and without parameter storages, which live anyway),
and the time of a training step (forward, backward, SGD step) and of inference (eval,
no grad) as ratios to the model without SE.

Timing protocol: the variants are measured in one process, interleaved (round r times
every variant once), after warm-up; each figure is the minimum over the rounds. On CPU
the default is one thread (``torch.set_num_threads(1)``) and 21 rounds. With a CUDA
device (``--device cuda``) it runs in bf16 autocast with channels_last, synchronises
around each step, and also reports ``torch.cuda.max_memory_allocated`` and images per
second.

Which convs: ``--rule composer`` (default for resnet50) takes the convs Composer's
``apply_squeeze_excite`` picks, ``min(in, out) >= min_channels``; ``--rule out`` (default for
resnet56) takes those with ``out >= min_channels``. Composer's SE goes on exactly those
convs (its own ``SqueezeExciteConv2d``), ours through ``include=`` on their names.
``--placement block`` compares the paper's place instead (one block at the end of every
residual branch, reduction 16), written plainly (a separate SE module after the last
BatchNorm, as timm's ``seresnet`` does) and ours (:class:`~composer_se.batchnorm.SqueezeExciteBatchNorm2d`).
The variants are built in ``benchmarks/variants.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.variants import (chosen_convs, saved_bytes, with_composer_se, with_our_block_se,  # noqa: E402
                                 with_our_se, with_plain_block_se)
from composer_se.recipes.models.cifar_resnet import cifar_resnet  # noqa: E402


def build(model_name: str) -> tuple[nn.Module, int]:
    """The model and its input size."""
    if model_name.startswith('resnet') and model_name[6:].isdigit() and int(model_name[6:]) in (20, 32, 44, 56, 110):
        return cifar_resnet(int(model_name[6:])), 32
    return torchvision.models.get_model(model_name), 224


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def measure(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int, device: str) -> dict:
    """Minimum train-step and inference times per variant, interleaved rounds."""
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    target = torch.randint(0, 10, (x.shape[0],), device=x.device)
    cuda = device == 'cuda'
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def train_step(name):
        model, opt = models[name], optimizers[name]
        model.train()
        with autocast:
            loss = nn.functional.cross_entropy(model(x).float()[:, :10], target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer(name):
        model = models[name]
        model.eval()
        with torch.no_grad(), autocast:
            model(x)

    times = {k: {'train': float('inf'), 'infer': float('inf')} for k in models}
    memory = {}
    for step in range(warmup + rounds):
        for name in models:
            for kind, fn in (('train', train_step), ('infer', infer)):
                if cuda and kind == 'train' and step == warmup:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                start = time.perf_counter()
                fn(name)
                sync()
                elapsed = time.perf_counter() - start
                if cuda and kind == 'train' and step == warmup:
                    memory[name] = torch.cuda.max_memory_allocated()
                if step >= warmup:
                    times[name][kind] = min(times[name][kind], elapsed)
    return {'times': times, 'max_memory_allocated': memory}


def run(args, min_channels: int) -> dict:
    torch.manual_seed(0)
    base, size = build(args.model)
    if args.placement == 'block':  # the paper's place: Composer has none, so the plain formulation stands in
        models = {'none': base, 'plain': with_plain_block_se(base), 'ours': with_our_block_se(base)}
        names = [name for name, m in models['ours'].named_modules() if name.endswith('.se')]
    else:
        names = chosen_convs(base, args.rule, min_channels)
        models = {
            'none': base,
            'composer': with_composer_se(base, names, args.latent),
            'ours': with_our_se(base, names, args.latent),
        }
    x = torch.randn(args.batch, 3, size, size)
    base_params = sum(p.numel() for p in base.parameters())
    row = {'model': args.model, 'batch': args.batch, 'min_channels': min_channels, 'rule': args.rule,
           'placement': args.placement, 'se_blocks': len(names), 'variants': {}}
    flops_x = x[:2] if args.device == 'cuda' else x
    for name, model in models.items():
        model.train()
        all_bytes, activation_bytes = saved_bytes(model, x[:8] if args.device == 'cuda' else x)
        row['variants'][name] = {
            'params_added': sum(p.numel() for p in model.parameters()) - base_params,
            'flops_added': forward_flops(model, flops_x) - (forward_flops(base, flops_x) if name != 'none' else 0),
            'saved_bytes': all_bytes,
            'saved_activation_bytes': activation_bytes,
        }
    row['variants']['none']['flops_added'] = 0
    if args.device == 'cuda':
        models = {k: m.cuda().to(memory_format=torch.channels_last) for k, m in models.items()}
        x = x.cuda().to(memory_format=torch.channels_last)
    if args.compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    timing = measure(models, x, args.rounds, args.warmup, args.device)
    none = timing['times']['none']
    for name, t in timing['times'].items():
        v = row['variants'][name]
        v['train_s'], v['infer_s'] = t['train'], t['infer']
        v['train_overhead'] = t['train'] / none['train'] - 1
        v['infer_overhead'] = t['infer'] / none['infer'] - 1
        v['images_per_s'] = args.batch / t['train']
        if timing['max_memory_allocated']:
            v['max_memory_allocated'] = timing['max_memory_allocated'][name]
    return row


def table(rows: list[dict], device: str) -> str:
    lines = [
        '| model | batch | min_ch | SE blocks | variant | params added | fwd FLOPs added | saved bytes added '
        '(all / non-param) | train step | inference |' + (' peak mem | img/s |' if device == 'cuda' else ''),
        '|---|---|---|---|---|---|---|---|---|---|' + ('---|---|' if device == 'cuda' else ''),
    ]
    for row in rows:
        none = row['variants']['none']
        for name, v in row['variants'].items():
            added = v['saved_bytes'] - none['saved_bytes']
            added_act = v['saved_activation_bytes'] - none['saved_activation_bytes']
            line = (f"| {row['model']} | {row['batch']} | {row['min_channels']} | {row['se_blocks']} | {name} | "
                    f"{v['params_added']:,} | {v['flops_added']:,} | {added / 2**20:+.1f} / {added_act / 2**20:+.1f} MiB | "
                    f"{v['train_overhead']:+.1%} | {v['infer_overhead']:+.1%} |")
            if device == 'cuda':
                line += f" {v['max_memory_allocated'] / 2**30:.2f} GiB | {v['images_per_s']:,.0f} |"
            lines.append(line)
    return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Train-step and inference overhead, and saved-for-backward bytes added, against min_channels."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    xs = [row['min_channels'] for row in rows]
    panels = (
        ('train_overhead', 'training step overhead (%)', 100),
        ('infer_overhead', 'inference overhead (%)', 100),
        ('saved_activation_bytes', 'saved for backward, added (MiB)', 2.0**-20),
    )
    for ax, (key, label, factor) in zip(axes, panels):
        for name in ('composer', 'ours'):
            values = [row['variants'][name][key] - (row['variants']['none'][key] if 'bytes' in key else 0)
                      for row in rows]
            ax.plot(xs, [factor * v for v in values], marker='o', label="Composer's SE" if name == 'composer' else
                    'composer-se')
        ax.set_xscale('log', base=2)
        ax.set_xlabel('min_channels')
        ax.set_ylabel(label)
        ax.axhline(0, color='grey', lw=0.5)
        ax.legend()
    first = rows[0]
    fig.suptitle(f"SE overhead against min_channels: {first['model']}, batch {first['batch']}, "
                 f"rule {first['rule']!r}, same convs for both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--latent', type=int, default=64)
    parser.add_argument('--min-channels', type=int, default=None, help='default: 128 (resnet50 rule), 64 (resnet56)')
    parser.add_argument('--rule', choices=('composer', 'out'), default=None)
    parser.add_argument('--placement', choices=('conv', 'block'), default='conv',
                        help="'block': the paper's place (1/16, every residual block) written plainly and ours")
    parser.add_argument('--sweep', action='store_true', help='min_channels 64, 128, 256, 512, 1024, 2048')
    parser.add_argument('--rounds', type=int, default=21)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--compile', action='store_true', help='time the torch.compile\'d models')
    parser.add_argument('--plot', default=None, help='write a PNG of overhead against min_channels (with --sweep)')
    parser.add_argument('--json', default=None, help='also write the rows as JSON here')
    parser.add_argument('--plot-from', default=None, help='only draw --plot from rows written earlier with --json')
    args = parser.parse_args()
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), args.plot or 'overhead.png')
        return
    cifar = args.model in ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110')
    args.rule = args.rule or ('out' if cifar else 'composer')
    if args.device == 'cpu':
        torch.set_num_threads(args.threads)
    elif args.batch == 8 and not cifar:
        args.batch = 256
    settings = [64, 128, 256, 512, 1024, 2048] if args.sweep else [args.min_channels or (64 if cifar else 128)]
    if args.placement == 'block':
        settings = [1]
    rows = []
    for min_channels in settings:
        if args.placement == 'conv' and not chosen_convs(build(args.model)[0], args.rule, min_channels):
            print(f'# min_channels={min_channels}: no conv qualifies under rule {args.rule!r}; skipped')
            continue
        rows.append(run(args, min_channels))
        if args.json:  # written as it goes, so a long sweep keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f'# {platform.node()}: {platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads() if args.device == "cpu" else torch.cuda.get_device_name()} '
          f'{"thread(s)" if args.device == "cpu" else ""}, torch {torch.__version__}, {date.today()}, '
          f'{args.rounds} rounds, min{", torch.compile" if args.compile else ""}')
    print(table(rows, args.device))
    if args.plot:
        plot(rows, args.plot)


if __name__ == '__main__':
    main()
