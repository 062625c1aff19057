"""benchmarks/overhead.py still runs, and its memory column shows what it should (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.recipes import ROOT


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
