"""Recipes: every YAML builds and trains; config errors; data sources; algorithms; loggers; checkpoints."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from composer.core import Callback

from composer_se import SqueezeExciteBatchNorm2d, SqueezeExciteConv2d
from composer_se.recipes.builders import ALGORITHMS, build_algorithms
from composer_se.recipes.config import ModelConfig, RecipeConfig, RecipeError, load_recipe
from composer_se.recipes.models import cifar_resnet
from composer_se.recipes.train import build_trainer, main
from tests.recipes.helpers import DEMO, SHRINK, YAMLS, write_image_tree, write_mds

SE_MODULES = (SqueezeExciteConv2d, SqueezeExciteBatchNorm2d)
SE_BLOCKS = {
    'resnet56_cifar10.yaml': 19,  # the 18 convs of stage 3 and its downsampling conv
    'resnet56_synthetic_demo.yaml': 19,
    'resnet50_imagenet.yaml': 22,
    'se_resnet50_imagenet.yaml': 16,  # one per bottleneck: the paper's placement
    'resnet56_cifar10_fast.yaml': 19,
    'resnet56_cifar10_baseline.yaml': 0,
    'resnet56_cifar10_fast_baseline.yaml': 0,
    'resnet50_imagenet_baseline.yaml': 0,
}


def se_blocks(trainer) -> list[str]:
    """The names of the modules that carry an SE block (convs, or BatchNorms for placement='block')."""
    return [name for name, m in trainer.state.model.named_modules() if isinstance(m, SE_MODULES)]


def fit(recipe: str, *overrides: str):
    trainer = build_trainer(load_recipe(recipe, [*SHRINK, *overrides]))
    trainer.fit()
    return trainer


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


def test_cifar_resnet_sizes():
    assert sum(p.numel() for p in cifar_resnet(56).parameters()) == 855_770  # "about 0.85M" in He et al.
    assert sum(p.numel() for p in cifar_resnet(20).parameters()) == 272_474
    assert cifar_resnet(110)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match='depth must be one of'):
        cifar_resnet(50)


# --- configuration errors: one message, exit status 2, before training ------------------------------------------


@pytest.mark.parametrize('overrides, message', [
    (['data.sourc=synthetic'], "unknown key 'data.sourc' in 'data'. Did you mean 'source'? Valid keys there: "
     'augmentation, download, eval_split'),
    (['max_epochs=3'], "unknown key 'max_epochs' at the top level. Valid keys there: algorithms, base,"),
    (['checkpoint.save_folderr=x'], "unknown key 'checkpoint.save_folderr' in 'checkpoint'. Did you mean 'save_folder'"),
    (['global_batch_size=many'], "wrong type for 'global_batch_size'"),
    (['data.download=perhaps'], "wrong type for 'data.download'"),
    (['run_name=${oc.env:HOME}'], "'run_name' uses a resolver"),
    (['algorithms.squeeze_exite={}'], "unknown algorithm 'squeeze_exite'. Did you mean 'squeeze_excite'?"),
    (['algorithms.squeeze_excite.min_channel=3'], 'algorithms.squeeze_excite has no argument(s) min_channel; it takes: '
     'latent_channels, min_channels, include, exclude, init'),
    (['algorithms.squeeze_excite.latent_channels=0'], 'algorithms.squeeze_excite: latent_channels must be an integer'),
    (['model.name=resnet5O'], "unknown model.name 'resnet5O'; did you mean resnet56, resnet50"),
    (['data.source=imagenet'], "unknown data.source 'imagenet'; choose one of cifar10, imagefolder, streaming, "
     'synthetic'),
    (['data.source=imagefolder', 'data.root=/nonexistent/imagenet'], 'data.root /nonexistent/imagenet is not a folder'),
    (['data.source=cifar10', 'data.root=/nonexistent'], 'CIFAR-10 was not found in data.root /nonexistent'),
    (['global_batch_size=0'], 'global_batch_size must be at least 1, got 0'),
    (['optimizer.name=adam'], "unknown optimizer.name 'adam'"),
    (['optimizer.lr=-1'], 'optimizer.lr must be positive, got -1.0'),
    (['scheduler.name=cosine'], "unknown scheduler.name 'cosine'"),
    (['optimizer.name=adamw', 'optimizer.nesterov=true'], "optimizer.nesterov applies to decoupled_sgdw and sgd, not "
     "'adamw'"),
    (['optimizer.nesterov=true', 'optimizer.momentum=0'], 'optimizer.nesterov needs optimizer.momentum > 0, got 0.0'),
    (['max_duration=10 epochs'], "max_duration must be a duration such as 4ep or 500ba, got '10 epochs'"),
    (['checkpoint.autoresume=true'], 'checkpoint.autoresume needs run_name and checkpoint.save_folder'),
    (['precision=fp8'], 'precision must be fp32, amp_fp16 or amp_bf16'),
    (['algorithms.randaugment={}'], 'randaugment and augmix transform images in the dataset; they need data.source'),
    (['loggers'], "override 'loggers' is not of the form key=value"),
    (['compile.mdoe=max-autotune'], "unknown key 'compile.mdoe' in 'compile'. Did you mean 'mode'? Valid keys there: "
     'backend, dynamic, fullgraph, mode'),
    (['compile.mode=fast'], "unknown compile.mode 'fast'; choose one of default, reduce-overhead, max-autotune"),
    (['compile.backend=tensorrtt'], "unknown compile.backend 'tensorrtt'; choose one of aot_eager"),
    (['compile.backend=aot_eager', 'compile.mode=reduce-overhead'], 'compile.mode reduce-overhead is a mode of the '
     "inductor backend, not of 'aot_eager'"),
])
def test_config_errors_are_one_clear_message(overrides, message, capsys):
    extra = ['run_name=null'] if 'autoresume' in overrides[0] else []
    assert main([DEMO, *SHRINK, *extra, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('composer_se.train: error: ') and message in err, err
    assert 'Traceback' not in err and len(err.splitlines()) == 1


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


def test_missing_mandatory_keys_are_named(tmp_path, capsys):
    recipe = tmp_path / 'partial.yaml'
    recipe.write_text('model: {name: resnet20}\ndata: {source: synthetic}\n')
    assert main([str(recipe)]) == 2
    assert 'missing mandatory key(s): global_batch_size, max_duration, optimizer.lr' in capsys.readouterr().err


def test_environment_interpolation_in_a_file_is_refused(tmp_path, capsys):
    recipe = tmp_path / 'env.yaml'
    recipe.write_text(f'base: {DEMO}\ndata:\n  root: ${{oc.env:HOME}}/data\n')
    assert main([str(recipe)]) == 2
    assert "'data.root' uses a resolver ('${oc.env:HOME}/data')" in capsys.readouterr().err


def test_key_interpolation_and_base_chains_work(tmp_path):
    recipe = tmp_path / 'child.yaml'
    recipe.write_text(f'base: {DEMO}\nrun_name: demo-${{model.name}}\nmodel: {{name: resnet20}}\n')
    config = load_recipe(recipe)
    assert config.run_name == 'demo-resnet20' and config.algorithms['squeeze_excite']['min_channels'] == 64


def test_a_base_that_does_not_resolve_names_base_and_the_path_tried(tmp_path, capsys):
    (tmp_path / 'recipes').mkdir()
    recipe = tmp_path / 'recipes' / 'child.yaml'
    recipe.write_text('base: fast.yaml\nmax_duration: 1ep\n')
    assert main([str(recipe)]) == 2
    assert (f"{recipe}: base: 'fast.yaml' does not resolve to a recipe file: tried {tmp_path}/recipes/fast.yaml ('base' "
            f"is relative to the folder of the recipe that names it, {tmp_path}/recipes)") in capsys.readouterr().err


# --- data sources, algorithms, loggers --------------------------------------------------------------------------


def test_imagefolder_run_with_randaugment(tmp_path):
    root = write_image_tree(tmp_path / 'images')
    trainer = fit(DEMO, 'model.name=resnet20', 'model.num_classes=2', 'data.source=imagefolder', f'data.root={root}',
                  'data.image_size=16', 'algorithms.randaugment={}', 'max_duration=1ep')
    assert len(se_blocks(trainer)) == 7
    assert int(trainer.state.timestamp.batch) == 2  # 16 training images, batches of 8


def test_imagefolder_missing_split_is_named(tmp_path, capsys):
    root = write_image_tree(tmp_path / 'images', splits=('train',))
    assert main([DEMO, *SHRINK, 'data.source=imagefolder', f'data.root={root}']) == 2
    assert f'data.root {root} has neither a val/ nor a test/ folder' in capsys.readouterr().err


def test_streaming_run_on_local_mds_shards(tmp_path):
    root = write_mds(tmp_path / 'mds')
    trainer = fit(DEMO, 'model.name=resnet20', 'model.num_classes=2', 'data.source=streaming', f'data.local={root}',
                  'data.image_size=16', 'max_duration=1ep')
    assert len(se_blocks(trainer)) == 7
    assert int(trainer.state.timestamp.batch) == 4  # 32 samples in batches of 8


def test_composes_with_composers_algorithms(tmp_path):
    algorithms = [
        'algorithms.channels_last={}', 'algorithms.label_smoothing.smoothing=0.1', 'algorithms.blurpool={}',
        'algorithms.ema={}', 'algorithms.mixup.alpha=0.2', 'algorithms.progressive_resizing={}',
        'algorithms.selective_backprop={}'
    ]
    trainer = fit(DEMO, 'model.name=resnet20', *algorithms)
    names = [type(a).__name__ for a in trainer.state.algorithms]
    assert names == ['ChannelsLast', 'LabelSmoothing', 'BlurPool', 'EMA', 'MixUp', 'ProgressiveResizing',
                     'SelectiveBackprop', 'SqueezeExcite']  # SE last: after BlurPool has replaced the strided convs
    blocks = se_blocks(trainer)
    assert len(blocks) == 7 and 'module.layer3.0.conv1.conv' in blocks  # inside BlurPool's BlurConv2d


class _LearningRates(Callback):
    def __init__(self):
        self.seen = []

    def batch_start(self, state, logger):
        self.seen.append(state.optimizers[0].param_groups[0]['lr'])


def test_nesterov_momentum_and_the_linear_decay_schedule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_recipe(DEMO, [
        *SHRINK, 'model.name=resnet20', 'optimizer.name=sgd', 'optimizer.nesterov=true', 'optimizer.lr=0.1',
        'scheduler.name=linear_decay_with_warmup', 'scheduler.t_warmup=0.25dur', 'max_duration=8ba',
        'data.synthetic_train_samples=64'
    ]))
    rates = _LearningRates()
    trainer.state.callbacks.append(rates)
    trainer.fit()
    assert trainer.state.optimizers[0].param_groups[0]['nesterov'] is True
    # Up to the peak over 2 of the 8 batches, then down towards 0 at batch 8; Composer steps the schedule after
    # each batch, so batch t + 1 trains with the factor of time t, and batch 0 with that of time 0. Where the
    # warm-up would give 0 (time 0), the recipe's scheduler gives the factor of time 1.
    factor = [t / 2 if t < 2 else 1 - (t - 2) / 6 for t in range(8)]
    factor[0] = factor[1]
    assert rates.seen == pytest.approx([0.1 * factor[0]] + [0.1 * f for f in factor[:7]])


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


def test_every_registered_algorithm_builds():
    required = {
        'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0},
        'stochastic_depth': {'target_layer_name': 'ResNetBottleneck'},
    }
    built = build_algorithms({name: required.get(name, {}) for name in ALGORITHMS})
    assert sorted(type(a).__name__ for a in built) == sorted(cls.__name__ for cls in ALGORITHMS.values())
    assert type(built[-1]).__name__ == 'SqueezeExcite'
    assert build_algorithms({'squeeze_excite': None}) == []


def test_file_and_tensorboard_loggers_write(tmp_path):
    fit(DEMO, 'model.name=resnet20', f'loggers.file={tmp_path}/log-{{rank}}.txt', f'loggers.tensorboard={tmp_path}/tb')
    assert 'squeeze_excite/num_squeeze_excite_layers' in (tmp_path / 'log-0.txt').read_text()
    assert list((tmp_path / 'tb').rglob('events.out.tfevents.*'))


# --- checkpoints ------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize('overrides, message', [
    (['model.num_classes=${data.sourc}'], 'data.sourc'),
    (['algorithms=[1]'], "override 'algorithms=[1]': "),
    (['base=other.yaml'], "override 'base=other.yaml': base can only be set in a recipe file"),
    (['data.max_train_samples=0', 'data.source=synthetic'], 'must be at least 1, got 0'),
])
def test_more_config_errors_are_one_clear_message(overrides, message, capsys):
    assert main([DEMO, *SHRINK, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and 'Traceback' not in err and len(err.splitlines()) == 1, err


def test_a_list_where_a_mapping_belongs_in_a_file(tmp_path, capsys):
    recipe = tmp_path / 'list.yaml'
    recipe.write_text(f'base: {DEMO}\nalgorithms: [blurpool]\n')
    assert main([str(recipe)]) == 2
    assert f'{recipe}: ' in capsys.readouterr().err


def test_imagefolder_without_class_folders_is_named(tmp_path, capsys):
    (tmp_path / 'flat' / 'train').mkdir(parents=True)
    (tmp_path / 'flat' / 'val').mkdir()
    assert main([DEMO, *SHRINK, 'data.source=imagefolder', f'data.root={tmp_path}/flat']) == 2
    assert f'{tmp_path}/flat/train is not a folder of class folders of images' in capsys.readouterr().err


def test_imagenet_transforms():
    from PIL import Image

    from composer_se.recipes.data.loaders import build_transform
    image = Image.new('RGB', (500, 375))
    assert build_transform('imagenet', 224, train=True)(image).shape == (3, 224, 224)
    evaluation = build_transform('imagenet', 224, train=False)
    assert [type(t).__name__ for t in evaluation.transforms] == ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
    assert evaluation.transforms[0].size == [256] and evaluation(image).shape == (3, 224, 224)
    cifar = build_transform('cifar', 32, train=True)
    assert [type(t).__name__ for t in cifar.transforms] == ['RandomCrop', 'RandomHorizontalFlip', 'ToTensor',
                                                            'Normalize']
    assert cifar.transforms[0].padding == [4, 4, 4, 4]


def test_streaming_shuffles_each_epoch(tmp_path):
    from composer_se.recipes.config import DataConfig
    from composer_se.recipes.data.loaders import build_dataloader
    root = write_mds(tmp_path / 'mds', per_split=64)
    loader = build_dataloader(DataConfig(source='streaming', local=str(root), image_size=16), 2, True, 64, 0).dataloader
    first, second = (torch.cat([x.flatten(1)[:, 0] for x, _ in loader]) for _ in range(2))
    assert first.shape == second.shape == (64,) and not torch.equal(first, second)


def test_local_weights_load_and_a_mismatch_is_named(tmp_path, capsys):
    from composer_se.recipes.models import build_module
    source = cifar_resnet(20)
    torch.save(source.state_dict(), tmp_path / 'weights.pt')
    loaded = build_module(ModelConfig(name='resnet20', weights=str(tmp_path / 'weights.pt')))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))
    torch.save({f'module.{k}': v for k, v in source.state_dict().items()}, tmp_path / 'prefixed.pt')
    assert main([DEMO, *SHRINK, 'model.name=resnet20', f'model.weights={tmp_path}/prefixed.pt']) == 2
    assert 'does not fit model CIFARResNet: 128 missing key(s): conv1.weight, bn1.weight, bn1.bias and 125 more' in (
        capsys.readouterr().err)


def test_synthetic_recipe_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_recipe(DEMO, [
        'model.name=resnet20', 'data.synthetic_train_samples=1024', 'data.synthetic_eval_samples=256',
        'global_batch_size=64', 'max_duration=3ep', 'loggers.progress_bar=false'
    ]))
    trainer.fit()
    accuracy = float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())
    assert accuracy > 0.3  # chance is 0.1


def test_a_timm_model_by_name_gets_se_and_a_bad_name_is_one_error(capsys):
    timm = pytest.importorskip('timm')
    trainer = build_trainer(load_recipe(DEMO, [*SHRINK, 'model.name=timm/resnet18', 'model.num_classes=10',
                                               'algorithms.squeeze_excite.min_channels=512']))
    network = trainer.state.model.module
    assert isinstance(network, timm.models.ResNet) and network.num_classes == 10
    assert se_blocks(trainer) == ['module.layer4.0.conv1', 'module.layer4.0.conv2', 'module.layer4.0.downsample.0',
                                  'module.layer4.1.conv1', 'module.layer4.1.conv2']
    assert main([DEMO, *SHRINK, 'model.name=timm/resnet5O']) == 2
    assert ("unknown model.name 'timm/resnet5O': timm has no model 'resnet5O'; did you mean timm/resnet50"
            in capsys.readouterr().err)


def test_a_timm_model_without_timm_says_how_to_install_it(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm now raises ImportError
    assert main([DEMO, *SHRINK, 'model.name=timm/resnet18']) == 2
    assert ('model.name timm/resnet18 needs timm, which is not installed; install it with pip install '
            '"composer-se[timm]"' in capsys.readouterr().err)


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_the_demo_model_starts_with_small_outputs(seed):
    """The demo's other guard: its residual blocks start as the identity (model.zero_init_residual), so the 56-layer
    net starts with small outputs; with the default start they are large enough that the loss spikes as the
    learning rate warms up, and the BatchNorm running statistics of those few steps then spoil evaluation."""
    from composer_se.recipes.data import SyntheticImages
    from composer_se.recipes.models import build_module
    config = load_recipe(DEMO, [f'seed={seed}'])
    assert config.model.zero_init_residual
    images = torch.stack([SyntheticImages(64, seed=seed)[i][0] for i in range(64)])
    outputs = {}
    for zero_init in (True, False):
        torch.manual_seed(seed)
        model = build_module(dataclasses.replace(config.model, zero_init_residual=zero_init))
        with torch.no_grad():
            outputs[zero_init] = model(images).std().item()
    assert outputs[True] < 0.3 < 0.6 < outputs[False]


def test_zero_init_residual_reaches_each_model_source_or_is_one_error():
    """CIFAR, torchvision and timm ResNets start their residual branches at zero; a model without that option says so."""
    from composer_se.recipes.models import build_module
    has_timm = importlib.util.find_spec('timm') is not None
    for name in ['resnet20', 'resnet18'] + (['timm/resnet18'] if has_timm else []):
        model = build_module(ModelConfig(name=name, zero_init_residual=True))
        assert not model.layer1[0].bn2.weight.any(), name
    for name in ['mobilenet_v2'] + (['timm/efficientnet_b0'] if has_timm else []):
        with pytest.raises(RecipeError, match=f'model.zero_init_residual applies to .*not to {name}'):
            build_module(ModelConfig(name=name, zero_init_residual=True))
