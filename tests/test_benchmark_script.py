"""Across benchmarks/: the scripts still run, overhead.py's memory column, fusion.py, static_gates.py,
fold_parity.py, gpu_suite.py and accuracy.py at toy size."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_script_runs_and_measures_memory(tmp_path):
    out = tmp_path / 'rows.json'
    result = subprocess.run([
        sys.executable, str(ROOT / 'benchmarks' / 'overhead.py'), '--model', 'resnet20', '--batch', '4', '--rounds',
        '1', '--warmup', '0', '--min-channels', '64', '--device', 'cpu', '--json', str(out)
    ], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '| resnet20 | 4 | 64 | 7 | ours |' in result.stdout
    (row,) = json.loads(out.read_text())
    variants = row['variants']
    activation = 4 * 64 * 8 * 8 * 4  # one 64-channel 8x8 float32 feature map at batch 4
    composer_added = variants['composer']['saved_activation_bytes'] - variants['none']['saved_activation_bytes']
    ours_added = variants['ours']['saved_activation_bytes'] - variants['none']['saved_activation_bytes']
    assert composer_added >= 7 * activation  # Composer keeps each SE conv's output
    assert 0 < ours_added < activation  # ours, folded: per-(n, c) statistics only
    assert variants['ours']['flops_added'] == variants['composer']['flops_added'] > 0


def test_fusion_script_fuses_every_pair_and_times_the_four_variants(tmp_path):
    out = tmp_path / 'fusion.json'
    result = subprocess.run([
        sys.executable, str(ROOT / 'benchmarks' / 'fusion.py'), '--model', 'resnet20', '--batch', '2', '--rounds', '1',
        '--warmup', '0', '--min-channels', '64', '--json', str(out)
    ], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row['unfused_pairs'] == 0 and row['fused_pairs'] == 21  # every conv of ResNet-20 has its BatchNorm
    assert row['fused_vs_unfused_max_relative_difference'] < 1e-4
    assert set(row['seconds']) == {'none', 'none, fused', 'SE', 'SE, fused'}
    assert all(0 < t < float('inf') for t in row['seconds'].values())


def test_static_gates_script_folds_at_each_tolerance_and_reports_accuracy_and_time(tmp_path):
    from tests.recipes.helpers import write_image_tree
    images = write_image_tree(tmp_path / 'images', per_class=6, size=32)
    out = tmp_path / 'static.json'
    result = subprocess.run([
        sys.executable, str(ROOT / 'benchmarks' / 'static_gates.py'),
        str(ROOT / 'yamls' / 'resnet56_cifar10_fast.yaml'),
        f'data.root={images}', 'model.name=resnet20', 'model.num_classes=2', '--tolerances', '0', '1',
        '--calibration-batches', '2', '--batch-size', '4', '--time-batch', '2', '--rounds', '1', '--json', str(out)
    ], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report['blocks']) == 7 and report['calibration_images'] == 8 and report['eval_images'] == 12
    none, every = report['folding']
    assert none['blocks_folded'] == 0 and none['top1'] == report['top1_unfolded'] and none['params_removed'] == 0
    assert every['blocks_folded'] == 7 and every['params_removed'] == 7 * (2 * 64 * 64 + 64 + 64)  # a gate is in (0, 1)
    assert every['eval_time_ratio'] > 0


def test_fold_parity_script_compares_rounding_and_outcomes():
    small = ['model.name=resnet20', 'data.synthetic_train_samples=64', 'data.synthetic_eval_samples=32',
             'global_batch_size=32', 'eval_batch_size=32', 'max_duration=4ba']
    result = subprocess.run([
        sys.executable, str(ROOT / 'benchmarks' / 'fold_parity.py'), *small, '--steps', '0', '3', '--seeds', '3',
        '--lr', '0.1'
    ], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ': 7 SE blocks; one training batch of 32.' in result.stdout
    rows = [line.strip('|').split('|') for line in result.stdout.splitlines() if line.startswith('| ')]
    rounding = [[float(cell) for cell in row] for row in rows if len(row) == 8 and row[0].strip().isdigit()]
    assert [row[0] for row in rounding] == [0, 3]
    assert rounding[0][1] != rounding[1][1]  # it trained in between
    for _, loss, *errors in rounding:
        assert loss > 0 and all(0 <= error < 5e-2 for error in errors)
        folded_se, unfolded_se, folded_other, unfolded_other = errors[2:]
        assert folded_se <= 4 * unfolded_se + 1e-6 and folded_other <= 4 * unfolded_other + 1e-6
    (outcome,) = [row for row in rows if len(row) == 4 and row[0].strip() == '0.1']
    assert outcome[1].strip() == '3' and all(cell.strip().endswith('%') for cell in outcome[2:])


def test_gpu_suite_dry_run_runs_every_part(tmp_path):
    """benchmarks/gpu_suite.py at toy size on CPU: every part and arm runs and the outputs are written and readable.
    Each compiled arm has 4 s to compile: it compiles its first variants and lists the rest as skipped (what the
    compiled variants compute is tested in tests/batchnorm/test_compiled.py)."""
    result = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_suite.py'), '--dry-run', '--out',
                             str(tmp_path), '--compile-budget', '4'], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / 'gpu_results.json').read_text())
    assert results['failures'] == {}
    for part in ('correctness', 'kernels', 'arms', 'resnet56', 'host'):
        assert results[part], part
    arms = results['arms']
    assert list(arms) == ['eager', 'compiled', 'reduce-overhead']
    assert set(arms['eager']['rows']) >= {'plain', 'composer min128', 'ours conv min512 folded',
                                          'ours conv min128 unfolded', 'ours block (fused)'}
    for arm in ('compiled', 'reduce-overhead'):
        rows = arms[arm]['rows']
        assert 'plain' in rows and set(rows) | set(arms[arm]['skipped']) >= {'ours conv min512 folded',
                                                                             'ours block (fused)'}
        assert all(row['cudagraph_skips'] == 0 and row['train_images_per_s'] > 0 for row in rows.values())
    checks = results['correctness']
    assert checks['conv, float32 ours: output vs float64'] < 1e-4
    assert checks['block, float32 ours: worst gradient vs float64'] < 1e-3
    text = (tmp_path / 'gpu_results.md').read_text()
    assert '## ResNet-50, reduce-overhead' in text and '| ours block (fused) |' in text
    assert (tmp_path / 'gpu_profile.txt').read_text().count('## ') == 3


# --- benchmarks/accuracy.py -------------------------------------------------------------------------------------

CIFAR_JPEG = ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'


def accuracy_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'accuracy.py'), *args], capture_output=True,
                          text=True, timeout=300)


def test_accuracy_dry_run_writes_the_table_json_plot_and_logs(tmp_path):
    result = accuracy_script('--dry-run', '--out', str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / 'results.json').read_text())
    runs = report['runs']
    assert [(run['arm'], run['seed'], run['status']) for run in runs] == [
        ('baseline', 0, 'finished'), ('se', 0, 'finished'), ('baseline', 1, 'finished'), ('se', 1, 'finished')
    ]
    for run in runs:
        assert 0 <= run['top1'] <= 100 and run['epochs'] == 1 and run['seconds_per_epoch'] > 0
        assert [point['epoch'] for point in run['curve']] == [1]  # one evaluation, after epoch 1
        assert run['curve'][0]['top1'] == pytest.approx(run['top1'], abs=0.01)
        assert 'final weights fingerprint' in Path(run['log']).read_text()
        assert f'{run["arm"]}-seed{run["seed"]}: ' in result.stdout  # a progress line per run
    assert report['torch'] == torch.__version__ and report['device'].startswith('CPU') and report['date']
    summary = report['summary']
    assert summary['arms']['se']['finished'] == summary['arms']['baseline']['finished'] == 2
    assert list(summary['versus_baseline']) == ['se'] and report['compile'] is None
    difference = summary['versus_baseline']['se']
    assert difference['low'] <= difference['difference'] <= difference['high']
    table = (tmp_path / 'results.md').read_text()
    assert '| seed | baseline top-1 | SE top-1 |' in table and '| 1 | ' in table and "(Welch's t, " in table
    assert (tmp_path / 'accuracy_vs_time.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_accuracy_reports_failed_and_unfinished_runs_and_never_their_accuracy(tmp_path):
    failed = accuracy_script('--dry-run', '--seeds', '1', '--no-plot', '--extra', 'data.eval_split=missing', '--out',
                             str(tmp_path / 'failed'), '--logs', str(tmp_path / 'logs'), '--arms', 'paper,baseline',
                             '--compile', 'reduce-overhead')
    assert failed.returncode == 1, failed.stderr[-3000:]
    report = json.loads((tmp_path / 'failed' / 'results.json').read_text())
    assert [(run['arm'], run['status']) for run in report['runs']] == [('baseline', 'failed'), ('paper', 'failed')]
    assert report['compile'] == 'reduce-overhead' and report['recipes']['paper'].endswith('fast_paper.yaml')
    for run in report['runs']:
        assert 'missing does not exist' in run['error'] and run['top1'] is None
        assert Path(run['log']).parent == tmp_path / 'logs' and 'missing does not exist' in run['log_tail'][-1]
        assert 'compile.mode=reduce-overhead' in run['command']
    table = (tmp_path / 'failed' / 'results.md').read_text()
    assert '| seed | baseline top-1 | SE, paper placement top-1 |' in table and '| 0 | failed | failed |' in table
    assert 'SE, paper placement − baseline: n/a' in table and 'reduce-overhead' in table
    assert '- paper-seed0: failed: split folder ' in table

    stopped = accuracy_script('--dry-run', '--seeds', '2', '--parallel', '2', '--no-plot', '--time-limit', '1', '--out',
                              str(tmp_path / 'stopped'))
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    report = json.loads((tmp_path / 'stopped' / 'results.json').read_text())
    assert [run['status'] for run in report['runs']] == ['unfinished', 'unfinished', 'not started', 'not started']
    assert all(run['top1'] is None for run in report['runs'])
    table = (tmp_path / 'stopped' / 'results.md').read_text()
    assert 'baseline-seed0: unfinished: killed at the 1 s time limit' in table
    assert 'se-seed1: not started: not launched: the 1 s time limit had passed' in table


@pytest.mark.parametrize('arms, message', [('se', "the arms must be 'baseline' and at least one SE arm"),
                                           ('baseline', "the arms must be 'baseline' and at least one SE arm"),
                                           ('baseline,senet', "unknown arm 'senet'; choose from baseline, se, paper")])
def test_accuracy_refuses_arms_it_cannot_compare(tmp_path, arms, message):
    refused = accuracy_script('--dry-run', '--arms', arms, '--out', str(tmp_path))
    assert refused.returncode == 2 and f'--arms: {message}' in refused.stderr
    assert not (tmp_path / 'results.json').exists()


def test_accuracy_interval_is_welchs(monkeypatch):
    spec = importlib.util.spec_from_file_location('accuracy', ROOT / 'benchmarks' / 'accuracy.py')
    accuracy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, 'accuracy', accuracy)  # its dataclasses look their module up there
    spec.loader.exec_module(accuracy)
    # Student's t quantiles (tables): 4.303 (2 df), 2.776 (4), 2.228 (10), 1.960 (normal).
    for df, quantile in ((2, 4.302653), (4, 2.776445), (10, 2.228139), (1e7, 1.959964)):
        assert accuracy.t_quantile(0.975, df) == pytest.approx(quantile, abs=2e-6)
    se, baseline = [93.1, 93.4, 92.9], [92.8, 92.7, 93.0]
    interval = accuracy.welch_interval(se, baseline)
    va, vb = 0.0633333 / 3, 0.0233333 / 3  # sample variances over n
    df = (va + vb)**2 / (va**2 / 2 + vb**2 / 2)
    assert interval['df'] == pytest.approx(df, rel=1e-4)
    half = accuracy.t_quantile(0.975, df) * (va + vb)**0.5
    assert (interval['low'], interval['high']) == pytest.approx((0.3 - half, 0.3 + half), rel=1e-4)


@pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f'{CIFAR_JPEG} is not on this machine')
def test_accuracy_dry_run_on_real_cifar10_images(tmp_path):
    result = accuracy_script('--dry-run', '--archive', str(CIFAR_JPEG), '--seeds', '1', '--no-plot', '--out',
                             str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / 'results.json').read_text())
    assert [run['status'] for run in report['runs']] == ['finished', 'finished']
    assert 'SE − baseline: n/a (needs at least 2 finished runs per arm)' in (tmp_path / 'results.md').read_text()


def test_data_loading_dry_run_times_both_loaders_and_the_model(tmp_path):
    """benchmarks/data_loading.py at toy size: both loaders' epochs and the model's, in one table."""
    out = tmp_path / 'table.md'
    result = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'data_loading.py'), '--dry-run', '--out',
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert '64 images in batches of 16' in table
    for name in ('data.on_device: true', 'worker-based loader', 'ResNet-56 SE train steps'):
        (row,) = [line for line in table.splitlines() if line.startswith(f'| {name} |')]
        assert float(row.split('|')[2]) > 0
    assert 'as fast as the worker-based loader' in table


def test_host_cost_counts_what_each_fused_step_issues(tmp_path):
    """benchmarks/host_cost.py with the stand-in driver: the launches and torch operations of one training step."""
    out = tmp_path / 'host.json'
    result = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'host_cost.py'), '--stand-in-driver',
                             '--rounds', '1', '--steps', '2', '--json', str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())['rows']
    assert '| SE then BatchNorm (folded) |' in result.stdout
    assert rows['F.batch_norm']['triton_launches'] == 0
    assert rows['F.batch_norm']['ops'] == {'native_batch_norm': 1, 'native_batch_norm_backward': 1}
    for name in ('SE then BatchNorm (folded)', 'BatchNorm then SE (block end)'):
        # Four kernels forward, five backward, the gate's layers inside them; no other torch operation.
        assert rows[name]['triton_launches'] == 9 and rows[name]['launches']['_gate_hidden_kernel'] == 1
        assert rows[name]['torch_ops'] == 0, rows[name]['ops']
        assert rows[name]['host_us'] > 0
    assert rows['SE then BatchNorm, plain operations']['torch_ops'] > 20
