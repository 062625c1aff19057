"""benchmarks/overhead.py still runs, and its memory column shows what it should (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

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
    """benchmarks/gpu_suite.py at toy size on CPU: every part runs and the outputs are written and readable."""
    result = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_suite.py'), '--dry-run', '--out',
                             str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / 'gpu_results.json').read_text())
    assert results['failures'] == {}
    for part in ('correctness', 'kernels', 'resnet50', 'compiled', 'resnet56'):
        assert results[part], part
    assert set(results['resnet50']) >= {'plain', 'composer min128', 'ours conv min512 folded',
                                        'ours conv min128 unfolded', 'ours block (fused)',
                                        'plain block (timm formulation)'}
    checks = results['correctness']
    assert checks['conv, float32 ours: output vs float64'] < 1e-4
    assert checks['block, float32 ours: worst gradient vs float64'] < 1e-3
    assert '| ours block (fused) |' in (tmp_path / 'gpu_results.md').read_text()
    assert (tmp_path / 'gpu_profile.txt').read_text().count('## ') == 3
