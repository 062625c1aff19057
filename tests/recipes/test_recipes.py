"""Across recipes/: the shipped YAML recipes, each built and trained, with their documented hyperparameters."""

from __future__ import annotations

import pytest
import torch

from composer_se.recipes.config import RecipeConfig, load_recipe
from composer_se.recipes.run import build_trainer
from tests.recipes.helpers import DEMO, SHRINK, YAMLS, fit, se_blocks, write_image_tree

SE_BLOCKS = {
    'resnet56_cifar10.yaml': 19,  # the 18 convs of stage 3 and its downsampling conv
    'resnet56_synthetic_demo.yaml': 19,
    'resnet50_imagenet.yaml': 22,
    'se_resnet50_imagenet.yaml': 16,  # one per bottleneck: the paper's placement
    'resnet56_cifar10_fast.yaml': 19,
    'resnet56_cifar10_fast_paper.yaml': 27,  # one per residual block: the paper's placement
    'resnet56_cifar10_baseline.yaml': 0,
    'resnet56_cifar10_fast_baseline.yaml': 0,
    'resnet50_imagenet_baseline.yaml': 0,
}


def test_every_recipe_has_an_expected_count():
    assert sorted(p.name for p in YAMLS) == sorted(SE_BLOCKS)


@pytest.mark.parametrize('recipe', YAMLS, ids=lambda p: p.name)
def test_every_recipe_builds_and_trains_a_few_batches(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_recipe(recipe)
    assert isinstance(config, RecipeConfig) and config.run_name
    image_size = '64' if config.data.augmentation == 'imagenet' else '32'
    data = []
    if config.data.on_device:  # images on the device: from a folder of 32x32 images instead of synthetic data
        root = write_image_tree(tmp_path / 'images', splits=('train', 'test'), size=32)
        data = ['data.source=imagefolder', f'data.root={root}']
    trainer = fit(str(recipe), f'data.image_size={image_size}', *data)
    assert len(se_blocks(trainer)) == SE_BLOCKS[recipe.name]
    assert int(trainer.state.timestamp.batch) == 2


def test_recipes_hold_the_documented_hyperparameters():
    cifar = load_recipe(str(YAMLS[0].parent / 'resnet56_cifar10.yaml'))
    assert (cifar.max_duration, cifar.global_batch_size, cifar.optimizer.lr, cifar.optimizer.momentum) == ('160ep', 1024,
                                                                                                         1.2, 0.9)
    assert (cifar.scheduler.t_warmup, cifar.scheduler.milestones, cifar.scheduler.gamma) == ('5ep', ['80ep', '120ep'],
                                                                                            0.1)
    assert cifar.algorithms == {'squeeze_excite': {'latent_channels': 64, 'min_channels': 64}}
    imagenet = load_recipe(str(YAMLS[0].parent / 'resnet50_imagenet.yaml'))
    assert (imagenet.max_duration, imagenet.global_batch_size, imagenet.scheduler.name,
            imagenet.scheduler.t_warmup) == ('90ep', 2048, 'cosine_decay_with_warmup', '8ep')
    assert imagenet.algorithms == {
        'channels_last': {},
        'label_smoothing': {'smoothing': 0.1},
        'squeeze_excite': {'latent_channels': 64, 'min_channels': 512},
    }
    baseline = load_recipe(str(YAMLS[0].parent / 'resnet50_imagenet_baseline.yaml'))
    assert 'squeeze_excite' not in baseline.algorithms and baseline.optimizer == imagenet.optimizer
    fast = load_recipe(str(YAMLS[0].parent / 'resnet56_cifar10_fast.yaml'))
    assert (fast.max_duration, fast.global_batch_size, fast.data.source, fast.data.on_device) == ('35ep', 512,
                                                                                                 'imagefolder', True)
    optimizer = fast.optimizer
    assert (optimizer.name, optimizer.lr, optimizer.nesterov, optimizer.weight_decay) == ('sgd', 0.4, True, 5e-4)
    assert (fast.scheduler.name, fast.scheduler.t_warmup, fast.scheduler.alpha_f) == ('linear_decay_with_warmup',
                                                                                      '0.15dur', 0.0)
    assert fast.algorithms == {
        'channels_last': {},
        'label_smoothing': {'smoothing': 0.1},
        'squeeze_excite': cifar.algorithms['squeeze_excite'],
    }
    fast_baseline = load_recipe(str(YAMLS[0].parent / 'resnet56_cifar10_fast_baseline.yaml'))
    assert 'squeeze_excite' not in fast_baseline.algorithms and fast_baseline.optimizer == fast.optimizer
    paper = load_recipe(str(YAMLS[0].parent / 'resnet56_cifar10_fast_paper.yaml'))
    assert paper.algorithms['squeeze_excite'] == {'latent_channels': 1 / 16, 'min_channels': 1, 'placement': 'block'}
    assert (paper.optimizer, paper.scheduler, paper.data) == (fast.optimizer, fast.scheduler, fast.data)


# --- configuration errors: one message, exit status 2, before training ------------------------------------------


def test_a_compiled_recipe_trains_with_se():
    """compile: goes to Composer's Trainer(compile_config=...): two batches of a small recipe, compiled (aot_eager on
    CPU: no code generation), with SE folded; the compiled graph holds the block and the BatchNorm in plain operations
    (on CPU; on CUDA the Triton kernels), no graph break."""
    from torch._dynamo.utils import counters
    config = load_recipe(DEMO, [*SHRINK, 'model.name=resnet20', 'compile.backend=aot_eager', 'compile.fullgraph=true'])
    assert config.compile.trainer_config() == {'backend': 'aot_eager', 'fullgraph': True, 'dynamic': None}
    assert load_recipe(DEMO, [*SHRINK]).compile is None  # eager unless asked
    torch._dynamo.reset()
    graphs = counters['stats']['unique_graphs']
    trainer = build_trainer(config)
    trainer.fit()
    assert counters['stats']['unique_graphs'] > graphs
    assert int(trainer.state.timestamp.batch) == 2
    assert any(type(m).__name__ == 'FoldedSqueezeExciteBatchNorm2d' for m in trainer.state.model.modules())
    torch._dynamo.reset()


# --- data sources, algorithms, loggers --------------------------------------------------------------------------


def test_a_smoke_run_of_the_demo_moves_every_weight(tmp_path, monkeypatch):
    """A run of two batches trains every parameter: no warm-up starts at a learning rate of exactly zero. (After
    one batch the residual branches have not moved: the demo starts them at zero, which stops their gradients.)"""
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_recipe(DEMO, [*SHRINK, 'model.name=resnet20', 'max_duration=2ba',
                                               'scheduler.t_warmup=1ep']))
    before = {name: p.detach().clone() for name, p in trainer.state.model.named_parameters()}
    trainer.fit()
    still = [name for name, p in trainer.state.model.named_parameters() if torch.equal(p, before[name])]
    assert still == []


# --- checkpoints ------------------------------------------------------------------------------------------------


def test_synthetic_recipe_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_recipe(DEMO, [
        'model.name=resnet20', 'data.synthetic_train_samples=1024', 'data.synthetic_eval_samples=256',
        'global_batch_size=64', 'max_duration=3ep', 'loggers.progress_bar=false'
    ]))
    trainer.fit()
    accuracy = float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())
    assert accuracy > 0.3  # chance is 0.1
