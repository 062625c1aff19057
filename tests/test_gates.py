"""composer_se/gates.py: gate_statistics, each SE block's gate over given inputs, on every SE model, the model left
unchanged."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composer_se import apply_squeeze_excite, gate_statistics
from composer_se.batchnorm import SqueezeExciteBatchNorm2d
from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d
from tests.zoo import SE_MODELS, SeModel, one_thread, trained_looking  # noqa: F401 - one_thread: autouse


def batches(size: int, count: int = 2, batch: int = 3, classes: int = 4, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(count)]


def reference_gates(model: nn.Module, data: list) -> dict[str, torch.Tensor]:
    """Each block's gates (samples, C), computed from its owner's input without going through the block's module:
    the conv's output for a block after a conv, the BatchNorm's eval output for a block after a BatchNorm."""
    gates: dict[str, list] = {}
    handles = []
    for name, owner in model.named_modules():
        if not isinstance(owner, (SqueezeExciteConv2d, SqueezeExciteBatchNorm2d)):
            continue

        def hook(owner, args, name=name):
            (x,) = args
            if isinstance(owner, SqueezeExciteConv2d):
                u = owner._conv_forward(x, owner.weight, owner.bias)
            else:
                u = F.batch_norm(x, owner.running_mean, owner.running_var, owner.weight, owner.bias, False, 0.0,
                                 owner.eps)
            gates.setdefault(f'{name}.se', []).append(owner.se.gate(u.mean((2, 3))))

        handles.append(owner.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.eval()
        for x, _ in data:
            model(x)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(values) for name, values in gates.items()}


@pytest.mark.parametrize('case', SE_MODELS, ids=str)
def test_statistics_of_every_block_match_its_gates_computed_apart(case: SeModel):
    _, model, blocks = case.models()
    model = trained_looking(model).train()
    data = batches(case.size)
    state = copy.deepcopy(model.state_dict())
    stats = gate_statistics(model, data)
    assert [name.removesuffix('.se') for name in stats] == list(blocks)  # every block, in model order
    assert all(m.training for m in model.modules())  # training flags restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    for key, value in model.state_dict().items():  # running statistics, num_batches_tracked, weights: untouched
        assert torch.equal(value, state[key]), key
    labels = torch.cat([y for _, y in data])
    for name, gates in reference_gates(copy.deepcopy(model), data).items():
        got = stats[name]
        mean = gates.mean(0)
        assert got.samples == 6 and got.channels == gates.shape[1]
        torch.testing.assert_close(got.mean, mean, rtol=0, atol=1e-9)
        assert math.isclose(got.input_dependence, float(gates.std(0, correction=0).mean()), abs_tol=1e-7)
        assert math.isclose(got.max_input_dependence, float(gates.std(0, correction=0).max()), abs_tol=1e-7)
        assert math.isclose(got.max_deviation, float((gates - mean).abs().max()), abs_tol=1e-9)
        assert got.near_zero == float((gates <= 0.05).double().mean())
        assert got.near_one == float((gates >= 0.95).double().mean())
        for k in range(got.class_mean.shape[0]):
            chosen = labels == k
            if chosen.any():
                torch.testing.assert_close(got.class_mean[k], gates[chosen].mean(0), rtol=0, atol=1e-9)
                assert got.class_counts[k] == chosen.sum()
            else:
                assert got.class_mean[k].isnan().all() and got.class_counts[k] == 0


def _single_block(init: str = 'default') -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(SqueezeExciteConv2d(3, 8, 1, latent_channels=4, init=init), nn.BatchNorm2d(8))
    return model.double().eval()


def test_saturated_gates_count_as_near_zero_and_near_one_in_the_blocks_units():
    for init, scale in (('default', 1.0), ('identity', 2.0)):
        model = _single_block(init)
        block = model[0].se
        with torch.no_grad():
            block.fc1.weight.zero_()
            block.fc2.weight.zero_()
            block.fc2.bias.copy_(torch.tensor([30.0] * 2 + [-30.0] * 3 + [0.0] * 3))
        (stats,) = gate_statistics(model, batches(8)).values()
        assert stats.scale == scale
        assert stats.near_one == 2 / 8 and stats.near_zero == 3 / 8
        assert stats.input_dependence == stats.max_input_dependence == stats.max_deviation == 0.0  # constant gate
        torch.testing.assert_close(stats.mean, torch.tensor([scale] * 2 + [0.0] * 3 + [scale / 2] * 3,
                                                            dtype=torch.float64), rtol=0, atol=1e-12)


def test_max_batches_labels_and_batches_of_inputs_alone():
    model = _single_block()
    data = batches(8, count=5)
    (stats,) = gate_statistics(model, data, max_batches=2).values()
    assert stats.samples == 6 and stats.spatial == (8, 8)
    (stats,) = gate_statistics(model, [x for x, _ in data]).values()
    assert stats.samples == 15 and stats.class_mean is None
    (stats,) = gate_statistics(model, data, per_class=False).values()
    assert stats.class_mean is None
    (stats,) = gate_statistics(model, [(x, y.float()) for x, y in data]).values()  # not class indices
    assert stats.class_mean is None


def test_a_block_run_twice_per_input_is_refused_with_labels_not_miscounted():
    block = SqueezeExcite2d(3, 2).double()
    twice = nn.Sequential(block, block)
    with pytest.raises(ValueError, match=r"SE block '0' saw 3 samples but the batch has 2 labels"):
        gate_statistics(twice, [(torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1]))])
    assert not block._forward_hooks


def test_bad_input_is_refused_and_leaves_no_hook():
    model = _single_block()
    data = batches(8)
    with pytest.raises(TypeError, match='got str'):
        gate_statistics('resnet', data)
    with pytest.raises(ValueError, match='holds no SE block'):
        gate_statistics(nn.Conv2d(3, 3, 1), data)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f'max_batches must be a positive integer or None, got {bad!r}'):
            gate_statistics(model, data, max_batches=bad)
    with pytest.raises(ValueError, match=r'near must be in \[0, 0.5\), got 0.7'):
        gate_statistics(model, data, near=0.7)
    with pytest.raises(TypeError, match='got dict'):
        gate_statistics(model, [{'image': data[0][0]}])
    with pytest.raises(ValueError, match='labels must be class indices >= 0 .*, got -1; pass per_class=False'):
        gate_statistics(model, [(data[0][0], torch.tensor([0, -1, 2]))])
    with pytest.raises(ValueError, match='gave no batch'):
        gate_statistics(model, [])
    assert all(not m._forward_hooks for m in model.modules())


def test_a_bfloat16_model_is_measured_in_float32_or_wider():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16))
    apply_squeeze_excite(model, 4, 16)
    x = torch.randn(16, 3, 8, 8)
    reference = gate_statistics(model.double().eval(), [x.double()])
    stats = gate_statistics(model.to(torch.bfloat16), [x.to(torch.bfloat16)])
    assert set(stats) == {'0.se', '3.se'} and all(s.mean.dtype == torch.float64 for s in stats.values())
    for name, s in stats.items():  # bfloat16 convs, then the gate from their output in float32
        torch.testing.assert_close(s.mean, reference[name].mean, rtol=0, atol=0.02)


def test_empty_batches_count_nothing_and_no_batch_is_read_beyond_max_batches():
    model = _single_block()
    data = batches(8)
    empty = (data[0][0][:0], data[0][1][:0])
    (stats,) = gate_statistics(model, [empty, *data]).values()
    assert stats.samples == 6
    stream = iter(data + [('not', 'read')])
    gate_statistics(model, stream, max_batches=2)
    assert next(stream) == ('not', 'read')


def test_labels_of_any_integer_type_give_class_means_and_booleans_none():
    model = _single_block()
    data = batches(8)
    (reference,) = gate_statistics(model, data).values()
    (small,) = gate_statistics(model, [(x, y.to(torch.uint8)) for x, y in data]).values()
    torch.testing.assert_close(small.class_mean, reference.class_mean, rtol=0, atol=0, equal_nan=True)
    (flags,) = gate_statistics(model, [(x, y > 1) for x, y in data]).values()
    assert flags.class_mean is None
