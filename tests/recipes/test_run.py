"""composer_se/recipes/run.py: a recipe becomes a Trainer and a run (see also test_launcher.py, test_reliability.py)."""

from __future__ import annotations

from composer_se.recipes.config import load_recipe
from composer_se.recipes.run import build_trainer
from tests.recipes.helpers import DEMO, SHRINK, fit, se_blocks


def test_autoresume_continues_from_the_last_checkpoint_with_se(tmp_path):
    common = ['model.name=resnet20', 'run_name=resume-test', f'checkpoint.save_folder={tmp_path}/ckpt',
              'checkpoint.autoresume=true', 'checkpoint.save_interval=1ep']
    first = fit(DEMO, *common, 'max_duration=1ep')
    assert int(first.state.timestamp.epoch) == 1 and (tmp_path / 'ckpt' / 'latest-rank0.pt').exists()
    second = build_trainer(load_recipe(DEMO, [*SHRINK, *common, 'max_duration=2ep']))
    assert int(second.state.timestamp.epoch) == 1  # resumed, not restarted
    assert se_blocks(second) == se_blocks(first)
    second.fit()
    assert int(second.state.timestamp.epoch) == 2
