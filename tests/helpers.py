"""Small, seeded models, data and Trainers shared by the tests."""

from __future__ import annotations

import copy

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


def compiled_graphs(model: nn.Module, *inputs: torch.Tensor, dynamic=None,
                    run: bool = True) -> tuple[torch.Tensor, dict]:
    """``model(*inputs)`` under ``torch.compile`` (one graph, AOTAutograd, no code generation): the output, and the
    graphs AOTAutograd hands a backend, ``{'forward': [...], 'backward': [...]}`` (the backward's once it has run).

    With ``run=False`` the graphs are traced and kept, and not run: each returns empty
    tensors of the sizes and dtypes it would, for what follows to trace on.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {'forward': [], 'backward': []}

    def unrun(gm):
        (output,) = [node for node in gm.graph.nodes if node.op == 'output']
        values = [node.meta.get('val') if isinstance(node, torch.fx.Node) else node for node in output.args[0]]

        def returns_empties(*args):
            return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype) if isinstance(v, torch.Tensor) else v
                    for v in values]
        return returns_empties

    def recording(kind):
        def compile(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward) if run else make_boxed_func(unrun(gm))
        return compile

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=recording('forward'), bw_compiler=recording('backward'))
    return torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(*inputs), graphs


def graph_calls(graphs: list) -> list[str]:
    """What the graphs call, in order: operator names, and each Triton kernel by its function's name."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    calls = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != 'call_function':
                continue
            if 'triton_kernel_wrapper' in str(node.target):
                calls.append(kernel_side_table.get_kernel(node.kwargs['kernel_idx']).fn.__name__)
            else:
                calls.append(str(node.target))
    return calls


def se_basic_blocks(placement: str) -> tuple[nn.Sequential, int]:
    """Two torchvision BasicBlocks of 8 channels with SE (latent 3) at ``placement``: 4 folded convs ('conv') or 2
    block ends ('block'); the model and its number of blocks."""
    import torchvision

    from composer_se import apply_squeeze_excite
    torch.manual_seed(0)
    model = nn.Sequential(torchvision.models.resnet.BasicBlock(8, 8), torchvision.models.resnet.BasicBlock(8, 8))
    report = apply_squeeze_excite(model, latent_channels=3, min_channels=8, placement=placement)
    return model, report.num_blocks


def stack(channels: int = 8, depth: int = 3) -> nn.Sequential:
    """conv -> BN -> ReLU(inplace) blocks: every conv feeds a BatchNorm and nothing else."""
    layers, inputs = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(inputs, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
        inputs = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4))


def folded_and_plain(model: nn.Module, **kwargs) -> tuple[nn.Module, nn.Module]:
    """Two copies with the same SE weights: one folded, one with SE inside the convs."""
    from composer_se import apply_squeeze_excite
    plain = copy.deepcopy(model)
    torch.manual_seed(1)
    folded_report = apply_squeeze_excite(model, fold_batchnorm=True, **kwargs)
    torch.manual_seed(1)
    plain_report = apply_squeeze_excite(plain, fold_batchnorm=False, **kwargs)
    assert folded_report.num_folded == folded_report.num_blocks > 0
    assert plain_report.num_folded == 0
    return model, plain


def randomise_norms(model: nn.Module) -> None:
    """BatchNorm weights, biases and running statistics away from their initial 1s and 0s."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
