"""Does SE help? The fast ResNet-56 recipes, with SE and without, over several seeds on real CIFAR-10.

    python benchmarks/accuracy.py --archive cifar10-jpeg.tar.gz --out results/accuracy
    python benchmarks/accuracy.py --data /data/cifar10 --out results/accuracy --seeds 5 --parallel 3
    python benchmarks/accuracy.py --archive cifar10-jpeg.tar.gz --out results/accuracy --arms baseline,se,paper
    python benchmarks/accuracy.py --dry-run --out /tmp/accuracy    # the whole pipeline at toy size, on CPU

The data is CIFAR-10 as a folder of images (``train/<class>/*.jpg``, ``test/<class>/*.jpg``):
``--data`` names the folder, ``--archive`` a ``.tar.gz`` of it, unpacked into a temporary
folder that is removed at the end. Each run is ``python -m composer_se.train RECIPE
data.root=... seed=S run_name=ARM-seedS loggers.progress_bar=false [overrides]`` in its own
process, for the arms ``--arms`` names (default ``baseline,se``), with the same seeds
``0 .. K-1`` for each:

- ``baseline``: ``yamls/resnet56_cifar10_fast_baseline.yaml``, no SE;
- ``se``: ``yamls/resnet56_cifar10_fast.yaml``, SE after the last stage's 19 convs;
- ``paper``: ``yamls/resnet56_cifar10_fast_paper.yaml``, SE at the end of every residual
  branch with a reduction ratio of 16, as the SENet paper's CIFAR ResNets have it.

Runs are launched seed by seed (seed 0 of every arm, then seed 1, ...), ``--parallel`` at a
time (default: all at once on a GPU and for ``--dry-run``, one at a time on the CPU).
``--compile MODE`` trains every arm under ``torch.compile`` (``compile.mode=MODE``, Inductor);
by default the recipes' own setting holds (eager). Every run that finishes is reported;
none is left out or stopped early for its accuracy.

``--time-limit`` stops launching runs once that many seconds have passed since the first
launch, and kills the runs still going at that moment: they are reported as unfinished,
never as results. A run that fails is named with its exit status and error line, and the
table is written all the same.

Output, in ``--out``: ``results.md`` (top-1 per seed, mean and standard deviation per arm,
each SE arm minus the baseline with a 95% confidence interval from Welch's t, time per
epoch per arm),
``results.json`` (all of it, with every run's evaluation curve), ``accuracy_vs_time.png``
(evaluation accuracy against seconds since each run's launch; needs matplotlib, as in
``pip install 'composer-se[bench]'``) and ``logs/ARM-seedS.log`` (each run's output; ``--logs``
puts them elsewhere, and the JSON keeps the last lines of every run without a result). The
evaluation curve comes from the run's output: each evaluation's top-1 is stamped with the
time its line arrived. Time per epoch is the time from the start of ``fit`` (the line that
reports the SE blocks) to the last evaluation, over the epochs trained: training and one
evaluation per epoch, with the other runs sharing the device.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from composer_se.recipes.config import COMPILE_MODES, RecipeError, load_recipe  # noqa: E402

#: Each arm's recipe, in the order the table shows them; the baseline is the one the others are compared with.
ARMS = {
    'baseline': ROOT / 'yamls' / 'resnet56_cifar10_fast_baseline.yaml',
    'se': ROOT / 'yamls' / 'resnet56_cifar10_fast.yaml',
    'paper': ROOT / 'yamls' / 'resnet56_cifar10_fast_paper.yaml',
}
BASELINE = 'baseline'
DEFAULT_ARMS = ('baseline', 'se')
#: How the table and the plot name each arm.
LABELS = {'baseline': 'baseline', 'se': 'SE', 'paper': 'SE, paper placement'}
COLOURS = {'baseline': 'tab:blue', 'se': 'tab:orange', 'paper': 'tab:green'}
#: --dry-run: ResNet-20 for one epoch of a few hundred images, on the CPU.
DRY_RUN = ['model.name=resnet20', 'device=cpu', 'data.num_workers=0', 'data.max_train_samples=200',
           'data.max_eval_samples=50', 'global_batch_size=32', 'eval_batch_size=50']
#: --dry-run images per class: training, test.
DRY_RUN_IMAGES = (20, 5)
CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

EPOCH_LINE = re.compile(r'^\[epoch=(\d+)\]\[batch=')
EVAL_LINE = re.compile(r'Eval metrics/eval/MulticlassAccuracy: ([0-9.]+)')
FIT_START_LINE = re.compile(r'^SqueezeExcite: \d+ SE blocks')
FINAL_LINE = re.compile(r'^final eval accuracy: ([0-9.]+)%')
TRAINED_LINE = re.compile(r'^trained (\d+) epochs')
ERROR_LINE = re.compile(r'composer_se\.train: error: (.*)')


# --- statistics -------------------------------------------------------------------------------------------------


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean; use the symmetry above it
        return 1.0 - _incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (possibly fractional) degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (``0.5 < p < 1``) of Student's t with ``df`` degrees of freedom, by bisection."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """``mean(a) - mean(b)`` with its ``level`` confidence interval from Welch's t (unequal variances)."""
    difference = statistics.mean(a) - statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # no spread at all: the interval is the point, and the degrees of freedom are not defined
        return {'difference': difference, 'low': difference, 'high': difference, 'df': None, 'level': level}
    df = (va + vb)**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return {'difference': difference, 'low': difference - half, 'high': difference + half, 'df': df, 'level': level}


# --- data -------------------------------------------------------------------------------------------------------


def _image_root(folder: Path) -> Path:
    """``folder`` or the folder inside it that holds ``train/``: where an unpacked archive keeps its images."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / 'train').is_dir():
            return candidate
    raise SystemExit(f'benchmarks/accuracy.py: found no train/ folder in {folder} or the folders inside it; the '
                     f'data must be CIFAR-10 as train/<class>/*.jpg and test/<class>/*.jpg')


def unpack(archive: Path, into: Path, per_class: Optional[tuple[int, int]] = None) -> Path:
    """Unpacks ``archive`` into ``into`` (only the first ``per_class`` training and test images of each class when
    given); returns the folder that holds ``train/``."""
    if not archive.is_file():
        raise SystemExit(f'benchmarks/accuracy.py: --archive {archive} does not exist')
    with tarfile.open(archive) as tar:
        if per_class is None:
            tar.extractall(into, filter='data')
        else:
            taken: dict[tuple[str, str], int] = {}
            for member in tar:  # .../<split>/<class>/<image>
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] not in ('train', 'test'):
                    continue
                split = parts[-3]
                key = (split, parts[-2])
                if taken.get(key, 0) < per_class[split == 'test']:
                    taken[key] = taken.get(key, 0) + 1
                    tar.extract(member, into, filter='data')
    return _image_root(into)


def write_toy_images(root: Path, per_class: tuple[int, int]) -> Path:
    """A CIFAR-shaped tree of 32x32 JPEGs, 10 classes, whose colour depends on the class: for --dry-run."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split, count in zip(('train', 'test'), per_class):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            tint = torch.tensor([label * 25, 250 - label * 25, (label * 70) % 256]).view(1, 1, 3)
            for index in range(count):
                noise = torch.randint(0, 60, (32, 32, 3), generator=generator)
                pixels = (tint * 0.75 + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f'{index:04d}.jpg')
    return root


# --- runs -------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: its command, what its output said, and how it ended."""

    arm: str
    seed: int
    command: list[str]
    log: str
    status: str = 'not started'  #: not started | running | finished | failed | unfinished
    returncode: Optional[int] = None
    error: Optional[str] = None
    top1: Optional[float] = None  #: final evaluation accuracy, in percent
    epochs: Optional[int] = None
    launched_at: Optional[float] = None  #: seconds after the first launch
    fit_started: Optional[float] = None  #: seconds after this run's launch
    wall_s: Optional[float] = None
    seconds_per_epoch: Optional[float] = None
    curve: list[dict] = field(default_factory=list)  #: {'seconds', 'epoch', 'top1'} per evaluation
    log_tail: list[str] = field(default_factory=list)  #: the last lines of its output, for a run without a result

    @property
    def name(self) -> str:
        return f'{self.arm}-seed{self.seed}'


class Launched:
    """A running :class:`Run`: its process, and a thread that logs and reads its output line by line."""

    def __init__(self, run: Run, clock_zero: float, env: dict):
        self.run = run
        self.start = time.monotonic()
        run.launched_at = self.start - clock_zero
        run.status = 'running'
        self.log = open(run.log, 'w')
        self.process = subprocess.Popen(run.command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        epoch = 0
        assert self.process.stdout is not None
        for line in self.process.stdout:
            seconds = time.monotonic() - self.start
            self.log.write(line)
            if match := EPOCH_LINE.match(line):
                epoch = int(match.group(1))
            elif match := EVAL_LINE.search(line):
                self.run.curve.append({'seconds': seconds, 'epoch': epoch, 'top1': 100 * float(match.group(1))})
            elif FIT_START_LINE.match(line):
                self.run.fit_started = seconds
            elif match := FINAL_LINE.match(line):
                self.run.top1 = float(match.group(1))
            elif match := TRAINED_LINE.match(line):
                self.run.epochs = int(match.group(1))
            elif match := ERROR_LINE.search(line):
                self.run.error = match.group(1).strip()

    def done(self) -> bool:
        if self.process.poll() is None:
            return False
        self.reader.join()
        self.log.close()
        run = self.run
        run.returncode = self.process.returncode
        run.wall_s = time.monotonic() - self.start
        if run.returncode == 0 and run.top1 is not None:
            run.status = 'finished'
            if run.epochs and run.curve and run.fit_started is not None:
                run.seconds_per_epoch = (run.curve[-1]['seconds'] - run.fit_started) / run.epochs
        else:
            run.status = 'failed'
            run.error = run.error or ('no final accuracy in its output' if run.returncode == 0 else
                                      f'exit status {run.returncode}; see {run.log}')
            run.log_tail = _tail(run.log)
        return True

    def kill(self, reason: str) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)  # the run and its dataloader workers
        self.process.wait()
        self.reader.join()
        self.log.close()
        self.run.status = 'unfinished'
        self.run.returncode = self.process.returncode
        self.run.wall_s = time.monotonic() - self.start
        self.run.error = reason
        self.run.log_tail = _tail(self.run.log)


def _tail(log: str, lines: int = 20) -> list[str]:
    return Path(log).read_text(errors='replace').splitlines()[-lines:]


def describe(run: Run) -> str:
    if run.status == 'finished':
        pace = f', {run.seconds_per_epoch:.2f} s/epoch' if run.seconds_per_epoch else ''
        return f'{run.top1:.2f}% top-1 ({run.epochs} epochs{pace})'
    return f'{run.status.upper()}: {run.error}'


def run_all(runs: list[Run], parallel: int, time_limit: Optional[float], env: dict) -> None:
    """Runs ``runs`` in order, ``parallel`` at a time, printing a line as each ends."""
    pending, running = list(runs), []
    zero = time.monotonic()
    while pending or running:
        elapsed = time.monotonic() - zero
        if time_limit is not None and elapsed >= time_limit:
            for launched in running:
                launched.kill(f'killed at the {time_limit:g} s time limit, {elapsed - launched.run.launched_at:.0f} s '
                              f'after its launch')
                print(f'[{elapsed:7.1f} s] {launched.run.name}: {describe(launched.run)}', flush=True)
            for run in pending:
                run.error = f'not launched: the {time_limit:g} s time limit had passed'
            return
        while pending and len(running) < parallel:
            running.append(Launched(pending.pop(0), zero, env))
        for launched in [launched for launched in running if launched.done()]:
            running.remove(launched)
            print(f'[{time.monotonic() - zero:7.1f} s] {launched.run.name}: {describe(launched.run)}', flush=True)
        time.sleep(0.2)


# --- report -----------------------------------------------------------------------------------------------------


def parse_arms(text: str) -> list[str]:
    """``'baseline,se'`` -> the arms in :data:`ARMS` order; a ValueError names an unknown arm or a missing baseline."""
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise ValueError(f'unknown arm {unknown[0]!r}; choose from {", ".join(ARMS)}')
    if BASELINE not in names or len(set(names)) < 2:
        raise ValueError(f'the arms must be {BASELINE!r} and at least one SE arm ({", ".join(ARMS)}), got {text!r}')
    return [arm for arm in ARMS if arm in names]


def summarise(runs: list[Run], arms: list[str]) -> dict:
    """Per arm: finished runs, mean and standard deviation of top-1, time per epoch; each other arm minus the
    baseline, with Welch's interval where both have at least two finished runs."""
    top1 = {arm: [run.top1 for run in runs if run.arm == arm and run.status == 'finished'] for arm in arms}
    summary = {}
    for arm in arms:
        paces = [run.seconds_per_epoch for run in runs if run.arm == arm and run.status == 'finished' and
                 run.seconds_per_epoch]
        summary[arm] = {
            'finished': len(top1[arm]),
            'mean': statistics.mean(top1[arm]) if top1[arm] else None,
            'sd': statistics.stdev(top1[arm]) if len(top1[arm]) > 1 else None,
            'seconds_per_epoch': statistics.mean(paces) if paces else None,
        }
    baseline = top1[BASELINE]
    versus = {arm: welch_interval(top1[arm], baseline) if len(top1[arm]) > 1 and len(baseline) > 1 else None
              for arm in arms if arm != BASELINE}
    return {'arms': summary, 'versus_baseline': versus}


def _percent(value: Optional[float]) -> str:
    return 'n/a' if value is None else f'{value:.2f}%'


def markdown(report: dict, runs: list[Run]) -> str:
    names, summary = report['arms'], report['summary']['arms']

    def row(first: str, cells: list[str]) -> str:
        return f'| {first} | ' + ' | '.join(cells) + ' |'

    compile_mode = report['compile'] or 'eager'
    lines = [
        '# SE against its baseline: ResNet-56 on CIFAR-10, fast recipes', '',
        f'{len(report["seeds"])} seeds per arm ({", ".join(map(str, report["seeds"]))}), '
        f'{report["max_duration"]}, {compile_mode}, {report["parallel"]} run(s) at a time on {report["device"]}; '
        f'torch {report["torch"]}, Composer {report["composer"]}, {report["date"]}, commit {report["commit"]}.', '',
        f'    {report["command"]}', '',
        row('seed', [f'{LABELS[arm]} top-1' for arm in names]), '|---|' + '---|' * len(names),
    ]
    by_key = {(run.arm, run.seed): run for run in runs}
    for seed in report['seeds']:
        lines.append(row(str(seed), [_percent(by_key[arm, seed].top1) if by_key[arm, seed].status == 'finished' else
                                     by_key[arm, seed].status for arm in names]))
    spread = [f'{_percent(summary[arm]["mean"])} ± {summary[arm]["sd"]:.2f}' if summary[arm]['sd'] is not None else
              _percent(summary[arm]['mean']) for arm in names]
    counts = ', '.join(str(summary[arm]['finished']) for arm in names)
    lines.append(row(f'mean ± sd ({counts} runs)', spread))
    paces = ['n/a' if summary[arm]['seconds_per_epoch'] is None else f'{summary[arm]["seconds_per_epoch"]:.2f} s'
             for arm in names]
    lines += [row('time per epoch', paces), '']
    for arm, difference in report['summary']['versus_baseline'].items():
        if difference is None:
            lines.append(f'{LABELS[arm]} − baseline: n/a (needs at least 2 finished runs per arm).')
        else:
            freedom = 'no spread' if difference['df'] is None else f'{difference["df"]:.1f} degrees of freedom'
            lines.append(f'{LABELS[arm]} − baseline: {difference["difference"]:+.2f} points of top-1, 95% confidence '
                         f'interval [{difference["low"]:+.2f}, {difference["high"]:+.2f}] (Welch\'s t, {freedom}).')
    lines += ['', 'Standard deviations are over seeds (n − 1); time per epoch is from the start of fit to the last '
              'evaluation, over the epochs, with the runs side by side sharing the device.']
    missing = [run for run in runs if run.status != 'finished']
    if missing:
        lines += ['', 'Runs without a result:', '']
        lines += [f'- {run.name}: {run.status}: {run.error}' for run in missing]
    return '\n'.join(lines) + '\n'


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm, colour in COLOURS.items():
        labelled = False
        for run in runs:
            if run.arm == arm and run.curve:
                axes.plot([point['seconds'] for point in run.curve], [point['top1'] for point in run.curve],
                          color=colour, alpha=0.8, marker='.', label=None if labelled else LABELS[arm])
                labelled = True
    axes.set_xlabel('seconds since the run was launched')
    axes.set_ylabel('evaluation top-1 (%)')
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def device_name(on_gpu: bool) -> str:
    if on_gpu:
        return torch.cuda.get_device_name(0)
    for line in Path('/proc/cpuinfo').read_text().splitlines() if Path('/proc/cpuinfo').exists() else []:
        if line.startswith('model name'):
            return f'CPU ({line.split(":", 1)[1].strip()}, {os.cpu_count()} cores)'
    return f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'


def _commit() -> str:
    found = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() or 'unknown'


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return 'not installed'


# --- main -------------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or '').split('\n')[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--data', type=Path, help='CIFAR-10 as a folder holding train/<class>/ and test/<class>/')
    source.add_argument('--archive', type=Path, help='a .tar.gz of that folder, unpacked into a temporary folder')
    parser.add_argument('--out', type=Path, required=True, help='folder for the table, JSON, plot and logs')
    parser.add_argument('--logs', type=Path, help='folder for the runs\' logs (default: OUT/logs)')
    parser.add_argument('--arms', default=','.join(DEFAULT_ARMS),
                        help=f'the arms, comma-separated: baseline and one or more of {", ".join(ARMS)} '
                        f'(default {",".join(DEFAULT_ARMS)})')
    parser.add_argument('--seeds', type=int, help='seeds per arm, 0 .. K-1, the same for every arm (default 3; 2 '
                        'with --dry-run)')
    parser.add_argument('--compile', choices=COMPILE_MODES, metavar='MODE',
                        help=f'train every arm under torch.compile with this mode ({", ".join(COMPILE_MODES)}); '
                        'default: as the recipes say (eager)')
    parser.add_argument('--parallel', type=int, help='runs at a time (default: all on a GPU and with --dry-run, 1 on '
                        'the CPU)')
    parser.add_argument('--epochs', type=int, help='train this many epochs instead of the recipe\'s (max_duration)')
    parser.add_argument('--extra', action='append', default=[], metavar='KEY=VALUE',
                        help='a recipe override for every arm; repeat it for more')
    parser.add_argument('--time-limit', type=float, metavar='SECONDS',
                        help='launch no run after this many seconds, and kill the runs still going then')
    parser.add_argument('--dry-run', action='store_true', help='ResNet-20, 1 epoch, 2 seeds, a few hundred images, '
                        'on the CPU: the whole pipeline in well under a minute')
    parser.add_argument('--no-plot', action='store_true', help='skip the plot (and the need for matplotlib)')
    args = parser.parse_args(argv)
    if not args.dry_run and args.data is None and args.archive is None:
        parser.error('give the images: --data FOLDER or --archive FILE.tar.gz (or --dry-run)')
    if not args.no_plot and importlib.util.find_spec('matplotlib') is None:
        parser.error("the plot needs matplotlib, which is not installed: pip install 'composer-se[bench]' (or pass "
                     '--no-plot)')
    for name, value in (('--seeds', args.seeds), ('--parallel', args.parallel), ('--epochs', args.epochs)):
        if value is not None and value < 1:
            parser.error(f'{name} must be at least 1, got {value}')
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error(f'--time-limit must be a positive number of seconds, got {args.time_limit:g}')
    try:
        arms = parse_arms(args.arms)
    except ValueError as error:
        parser.error(f'--arms: {error}')
    seeds = list(range(args.seeds or (2 if args.dry_run else 3)))
    overrides = [*(DRY_RUN if args.dry_run else []), 'loggers.progress_bar=false']
    epochs = args.epochs or (1 if args.dry_run else None)
    if epochs:
        overrides.append(f'max_duration={epochs}ep')
    if args.compile:
        overrides.append(f'compile.mode={args.compile}')
    overrides += args.extra
    on_gpu = torch.cuda.is_available() and not args.dry_run
    parallel = args.parallel or (len(arms) * len(seeds) if on_gpu or args.dry_run else 1)

    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.logs or args.out / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix='accuracy-'))
    try:
        if args.data is not None:
            root = args.data
        elif args.archive is not None:
            root = unpack(args.archive, scratch, DRY_RUN_IMAGES if args.dry_run else None)
        else:
            root = write_toy_images(scratch / 'cifar10', DRY_RUN_IMAGES)
        common = [f'data.root={root}', *overrides]
        try:
            configs = {arm: load_recipe(ARMS[arm], common) for arm in arms}
        except RecipeError as error:
            raise SystemExit(f'benchmarks/accuracy.py: {error}') from None
        runs = [
            Run(arm, seed, [sys.executable, '-m', 'composer_se.train', str(ARMS[arm]), f'seed={seed}',
                            f'run_name={arm}-seed{seed}', *common], str(logs / f'{arm}-seed{seed}.log'))
            for seed in seeds for arm in arms
        ]
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // parallel)))
        print(f'{len(runs)} runs, {parallel} at a time, on {device_name(on_gpu)}; images in {root}', flush=True)
        run_all(runs, parallel, args.time_limit, env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report = {
        'benchmark': 'accuracy',
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'device': device_name(on_gpu),
        'torch': torch.__version__,
        'composer': _version('mosaicml'),
        'python': platform.python_version(),
        'commit': _commit(),
        'command': ' '.join(['python', 'benchmarks/accuracy.py', *(argv if argv is not None else sys.argv[1:])]),
        'arms': arms,
        'recipes': {arm: str(ARMS[arm].relative_to(ROOT)) for arm in arms},
        'overrides': overrides,
        'compile': args.compile,
        'max_duration': configs[BASELINE].max_duration,
        'seeds': seeds,
        'parallel': parallel,
        'time_limit_s': args.time_limit,
        'runs': [asdict(run) for run in runs],
    }
    report['summary'] = summarise(runs, arms)
    (args.out / 'results.json').write_text(json.dumps(report, indent=2) + '\n')
    (args.out / 'results.md').write_text(markdown(report, runs))
    if not args.no_plot:
        plot(runs, args.out / 'accuracy_vs_time.png', f'ResNet-56, CIFAR-10, {report["max_duration"]}: '
                                                       f'{report["device"]}')
    print((args.out / 'results.md').read_text(), flush=True)
    return 0 if all(run.status == 'finished' for run in runs) else 1


if __name__ == '__main__':
    sys.exit(main())
