"""composer_se/recipes/config.py: a recipe and its overrides become one checked RecipeConfig; a mistake, one message."""

from __future__ import annotations

import pytest

from composer_se.recipes.config import load_recipe
from composer_se.recipes.run import main
from tests.recipes.helpers import DEMO, SHRINK


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
