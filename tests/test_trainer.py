"""Across the package: SqueezeExcite inside a real Composer Trainer on CPU, training, checkpoints, resumption."""

from __future__ import annotations

import copy

import composer.algorithms
import pytest
import torch
from composer import Trainer
from composer.algorithms import SqueezeExcite as ComposerSqueezeExcite
from composer.algorithms.squeeze_excite.squeeze_excite import SqueezeExciteConv2d as ComposerSqueezeExciteConv2d
from composer.algorithms.warnings import NoEffectWarning
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from composer_se import SqueezeExcite, SqueezeExciteConv2d
from tests.helpers import learnable_data, make_trainer

HPARAMS = dict(latent_channels=4, min_channels=16)


def blocks(trainer: Trainer) -> tuple[list[str], list[str]]:
    """Names of our SE convs and of Composer's SE wrappers in the trainer's model."""
    ours = [n for n, m in trainer.state.model.named_modules() if isinstance(m, SqueezeExciteConv2d)]
    theirs = [n for n, m in trainer.state.model.named_modules() if isinstance(m, ComposerSqueezeExciteConv2d)]
    return ours, theirs


def loss_on_data(model) -> float:
    x, y = learnable_data()
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model.module(x), y).item()


def test_fit_learns_and_trains_the_se_parameters_with_several_param_groups():
    trainer = make_trainer([SqueezeExcite(**HPARAMS)], groups=True, max_duration='6ep')
    assert blocks(trainer) == (['module.0', 'module.3.0'], [])
    se_params = {n: p for n, p in trainer.state.model.named_parameters() if '.se.' in n}
    start = {n: p.detach().clone() for n, p in se_params.items()}
    grads_seen = {n: 0 for n in se_params}
    for n, p in se_params.items():
        p.register_hook(lambda g, n=n: grads_seen.__setitem__(n, grads_seen[n] + int(g.abs().sum() > 0)))
    loss_before = loss_on_data(trainer.state.model)

    trainer.fit()

    assert loss_on_data(trainer.state.model) < 0.25 * loss_before
    assert all(count == 6 * 8 for count in grads_seen.values()), grads_seen  # 8 batches an epoch
    assert all(not torch.equal(start[n], p) for n, p in se_params.items())


def test_composers_own_algorithm_fails_there():
    with pytest.raises(RuntimeError, match='No parameters were removed'):
        make_trainer([ComposerSqueezeExcite(**HPARAMS)], groups=True)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """A 2-epoch SE run that saved a checkpoint after each epoch, and its final weights."""
    folder = tmp_path_factory.mktemp('run')
    trainer = make_trainer([SqueezeExcite(**HPARAMS)], groups=True, save_folder=str(folder), save_interval='1ep')
    trainer.fit()
    return folder, {k: v.clone() for k, v in trainer.state.model.state_dict().items()}


@pytest.fixture
def composer_se_calls(monkeypatch) -> list:
    """Records every application of Composer's own SqueezeExcite."""
    calls = []
    original = ComposerSqueezeExcite.apply
    monkeypatch.setattr(ComposerSqueezeExcite, 'apply', lambda self, *a: calls.append(repr(self)) or original(self, *a))
    return calls


def test_resume_from_a_checkpoint_gives_identical_weights(checkpoints, composer_se_calls):
    folder, final = checkpoints
    resumed = make_trainer([SqueezeExcite(**HPARAMS)], groups=True, load_path=str(folder / 'ep1-ba8-rank0.pt'))
    assert blocks(resumed) == (['module.0', 'module.3.0'], [])
    assert composer_se_calls == []
    assert int(resumed.state.timestamp.epoch) == 1
    resumed.fit()
    state = resumed.state.model.state_dict()
    assert state.keys() == final.keys()
    assert all(torch.equal(state[k], final[k]) for k in final)
    assert blocks(resumed) == (['module.0', 'module.3.0'], [])


def test_loading_without_the_algorithm_adds_ours_as_composer_does(checkpoints, composer_se_calls):
    """Composer's convention for required_on_load algorithms: it warns, re-creates ours from the checkpoint's
    record, applies it and loads the weights; its own SqueezeExcite is never built."""
    folder, _ = checkpoints
    saved = torch.load(folder / 'ep1-ba8-rank0.pt', weights_only=False)['state']['model']
    for weights_only in (False, True):
        with pytest.warns(UserWarning, match=r"Automatically adding required_on_load algorithm composer_se\.SqueezeExcite"
                                             r"\(latent_channels=4, min_channels=16, include=\(\), exclude=\(\)"):
            trainer = make_trainer(load_path=str(folder / 'ep1-ba8-rank0.pt'), load_weights_only=weights_only)
        assert blocks(trainer) == (['module.0', 'module.3.0'], [])
        added = [a for a in trainer.state.algorithms if isinstance(a, SqueezeExcite)]
        assert len(added) == 1 and added[0].settings.min_channels == 16
        state = trainer.state.model.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[key], value) for key, value in saved.items())
        trainer.fit()  # and it trains on
    assert composer_se_calls == []


def test_load_exclude_algorithms_leaves_squeeze_excite_out(checkpoints, composer_se_calls):
    """No SE is built; Composer's strict weight loading then refuses the SE weights, and a non-strict one skips them."""
    folder, _ = checkpoints
    path = str(folder / 'ep1-ba8-rank0.pt')
    saved = torch.load(path, weights_only=False)['state']['model']
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "module.0.se.gate_scale"'):
        make_trainer(load_path=path, load_weights_only=True, load_exclude_algorithms=['SqueezeExcite'])
    trainer = make_trainer(load_path=path, load_weights_only=True, load_exclude_algorithms=['SqueezeExcite'],
                           load_strict_model_weights=False)
    assert blocks(trainer) == ([], [])
    state = trainer.state.model.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in state.items())  # the plain weights loaded
    assert composer_se_calls == []


def test_composer_never_builds_its_own_squeeze_excite_from_our_checkpoint(checkpoints, monkeypatch,
                                                                         composer_se_calls):
    """As if composer_se were not imported where the checkpoint is loaded: Composer warns, names our
    algorithm, and its strict weight loading refuses the SE weights; its own SqueezeExcite is never built."""
    folder, _ = checkpoints
    monkeypatch.delattr(composer.algorithms, 'composer_se')
    with pytest.warns(UserWarning, match=r'required_on_load algorithm composer_se\.SqueezeExcite\(latent_channels=4'):
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "module.0.se.gate_scale", "module.0.se.fc1.weight"'):
            make_trainer(load_path=str(folder / 'ep1-ba8-rank0.pt'), load_weights_only=True)
    assert composer_se_calls == []


def test_a_conv_replacing_algorithm_after_squeeze_excite_is_refused():
    from composer.algorithms import BlurPool
    with pytest.raises(ValueError, match='BlurPool comes after SqueezeExcite .* list SqueezeExcite after it'):
        make_trainer([SqueezeExcite(**HPARAMS), BlurPool()])
    with pytest.warns(NoEffectWarning, match='BlurPool did not change any layers'):  # small_cnn has no strides
        trainer = make_trainer([BlurPool(), SqueezeExcite(**HPARAMS)])
    assert blocks(trainer)[0] == ['module.0', 'module.3.0']


def fold_trainer(algorithms) -> Trainer:
    """small_cnn's first conv feeds a BatchNorm, so its SE block is folded into it."""
    return make_trainer(algorithms, max_duration='1ba')


def test_a_folded_batchnorm_replaced_before_fit_is_an_error():
    trainer = fold_trainer([SqueezeExcite(**HPARAMS)])
    network = trainer.state.model.module
    assert type(network[1]).__name__ == 'FoldedSqueezeExciteBatchNorm2d'
    network[1] = torch.nn.BatchNorm2d(16)  # as a later surgery might
    with pytest.raises(RuntimeError, match=r'BatchNorms that apply the SE blocks of module\.0 were replaced'):
        trainer.fit()


def test_a_conv_and_batch_norm_fused_by_hand_is_caught_at_eval_and_fuse_for_inference_is_not():
    from torch.nn.utils import fuse_conv_bn_eval

    from composer_se import fuse_for_inference
    x, y = learnable_data(n=64, seed=1)
    trainer = make_trainer([SqueezeExcite(**HPARAMS)], max_duration='1ba',
                           eval_dataloader=DataLoader(TensorDataset(x, y), batch_size=32))
    trainer.fit()
    network = trainer.state.model.module
    fused = copy.deepcopy(network).eval()
    fused[0], fused[1] = fuse_conv_bn_eval(fused[0], fused[1]), torch.nn.Identity()  # drops the folded SE block
    trainer.state.model.module = fused
    with pytest.raises(RuntimeError, match=r'SE blocks of module\.0 were replaced .* composer_se\.fuse_for_inference'):
        trainer.eval()
    kept = copy.deepcopy(network).eval()
    assert fuse_for_inference(kept).num_fused == 1
    trainer.state.model.module = kept
    trainer.eval()


def float64_resnet20_run(fold_batchnorm: bool) -> tuple[dict[str, torch.Tensor], float, int]:
    """Two epochs of an SE-ResNet-20 with DecoupledSGDW and an eval each epoch, in float64.

    Returns the final state dict, the final eval accuracy and the number of folded BatchNorms.
    """
    from composer.optim import DecoupledSGDW

    from composer_se.batchnorm import FoldedSqueezeExciteBatchNorm2d
    from composer_se.recipes.models.cifar_resnet import cifar_resnet
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = ComposerClassifier(cifar_resnet(20, num_classes=4), num_classes=4)
        (x, y), (ex, ey) = learnable_data(n=256), learnable_data(n=64, seed=1)
        trainer = Trainer(
            model=model,
            optimizers=DecoupledSGDW(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            train_dataloader=DataLoader(TensorDataset(x.double(), y), batch_size=32),
            eval_dataloader=DataLoader(TensorDataset(ex.double(), ey), batch_size=32),
            algorithms=[SqueezeExcite(latent_channels=8, min_channels=16, fold_batchnorm=fold_batchnorm)],
            max_duration='2ep',
            device='cpu',
            seed=17,
            progress_bar=False,
            log_to_console=False,
        )
        trainer.fit()
        folded = sum(isinstance(m, FoldedSqueezeExciteBatchNorm2d) for m in trainer.state.model.modules())
        accuracy = float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())
        return {k: v.clone() for k, v in trainer.state.model.state_dict().items()}, accuracy, folded
    finally:
        torch.set_default_dtype(default)


def test_folded_and_unfolded_se_train_to_the_same_weights_in_float64():
    """16 optimizer steps, two evals: every weight and running statistic agrees to rounding.

    In float32 the two runs differ by rounding from the first step, which training at a
    high learning rate can amplify as it amplifies any rounding difference; in float64 the
    difference stays near 1e-14 at this learning rate, so any error in the folded forward,
    backward, running statistics or eval path would show.
    """
    folded, folded_accuracy, num_folded = float64_resnet20_run(True)
    plain, plain_accuracy, none_folded = float64_resnet20_run(False)
    assert (num_folded, none_folded) == (21, 0)
    assert folded.keys() == plain.keys()
    for key, value in plain.items():
        if value.is_floating_point():
            scale = value.abs().max().clamp(min=1e-12)
            assert ((folded[key] - value).abs().max() / scale).item() < 1e-9, key
        else:
            assert torch.equal(folded[key], value), key
    assert folded_accuracy == plain_accuracy > 0.5
