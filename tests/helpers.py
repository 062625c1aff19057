"""Small, seeded models, data and Trainers shared by the tests."""

from __future__ import annotations

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def small_cnn(num_classes: int = 4) -> nn.Sequential:
    """Convs of 3->16, 16->32 and 32->8 output channels, in nested containers."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()),
        nn.Conv2d(32, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def learnable_data(n: int = 256, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with a 4-way label: label bit k shifts channel k by +-1."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    shift = torch.stack([y % 2, y // 2], dim=1).float() * 2 - 1  # (n, 2) in {-1, +1}
    x = torch.randn(n, 3, size, size, generator=gen)
    x[:, :2] += shift[:, :, None, None]
    return x, y


def no_decay_groups(model: nn.Module) -> list[dict]:
    """The common recipe: weight decay on weights, none on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{'params': decay, 'weight_decay': 5e-4}, {'params': no_decay, 'weight_decay': 0.0}]


def make_trainer(algorithms=(), groups=False, **kwargs) -> Trainer:
    """A Trainer for ``small_cnn`` on ``learnable_data`` (batches of 32), on CPU, seed 17."""
    model = ComposerClassifier(small_cnn(), num_classes=4)
    optimizer = torch.optim.SGD(no_decay_groups(model) if groups else model.parameters(), lr=0.05, momentum=0.9)
    x, y = learnable_data()
    kwargs.setdefault('max_duration', '2ep')
    return Trainer(
        model=model,
        optimizers=optimizer,
        train_dataloader=DataLoader(TensorDataset(x, y), batch_size=32),
        algorithms=list(algorithms),
        device='cpu',
        seed=17,
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )


def assert_steps_match(model: nn.Module, reference: nn.Module, inputs: list[torch.Tensor], rtol: float, atol: float,
                       grad_rtol: float, grad_atol: float) -> None:
    """Each input through both models from the same random state (the same dropout masks), then backward through a
    loss that depends on every output: the same outputs and, parameter by parameter, the same gradients."""
    for step, x in enumerate(inputs):
        torch.manual_seed(step)
        out = model(x)
        torch.manual_seed(step)
        expected = reference(x)
        torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=grad_rtol, atol=grad_atol, msg=name)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the storages autograd keeps for backward in ``model(x)``, parameters (alive anyway) left out."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in params)


def compiled_operators(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``model(x)`` under ``torch.compile`` (one graph, AOTAutograd without code generation), and the ``composer_se``
    operators in its graph."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def recording(gm, inputs):
        graphs.append(gm)
        return lookup_backend('aot_eager')(gm, inputs)

    torch._dynamo.reset()
    out = torch.compile(model, backend=recording, fullgraph=True)(x)
    names = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == 'call_function']
    return out, [name for name in names if name.startswith('composer_se.')]


def se_basic_blocks(placement: str) -> tuple[nn.Sequential, int]:
    """Two torchvision BasicBlocks of 8 channels with SE (latent 3) at ``placement``: 4 folded convs ('conv') or 2
    block ends ('block'); the model and its number of blocks."""
    import torchvision

    from composer_se import apply_squeeze_excite
    torch.manual_seed(0)
    model = nn.Sequential(torchvision.models.resnet.BasicBlock(8, 8), torchvision.models.resnet.BasicBlock(8, 8))
    report = apply_squeeze_excite(model, latent_channels=3, min_channels=8, placement=placement)
    return model, report.num_blocks
