"""The recipe schema and its loader: YAML file + ``base`` recipes + dotted overrides -> typed config.

A recipe is a YAML file whose keys follow :class:`RecipeConfig`. ``base: other.yaml``
(relative to the file) starts from another recipe and overrides it, so a recipe and its
baseline share everything but what differs. Command-line overrides use OmegaConf's
dotted syntax (``data.root=/data/imagenet``, ``algorithms.squeeze_excite=null``).

Every problem is a :class:`RecipeError` with one message: an unknown key (at any depth)
names the key and its valid siblings, a missing mandatory key and a wrong type name
the key. Interpolation between keys (``${model.num_classes}``) is allowed; resolvers,
such as ``${oc.env:HOME}``, are not, so a recipe cannot read the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from composer.core import Time
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    'CheckpointConfig',
    'CompileConfig',
    'DataConfig',
    'LoggersConfig',
    'ModelConfig',
    'OptimizerConfig',
    'RecipeConfig',
    'RecipeError',
    'SchedulerConfig',
    'load_recipe',
]


class RecipeError(ValueError):
    """A recipe, an override or what they point at is wrong; the message says what and how to fix it."""


#: Units of a training length, and of an interval (which may also be a fraction of the run, ``dur``).
LENGTH_UNITS = ('ep', 'ba', 'sp', 'tok')
INTERVAL_UNITS = LENGTH_UNITS + ('dur',)
#: run_name is put into file and folder names ({run_name} in checkpoint.save_folder and loggers.file).
PLAIN_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


def check_duration(key: str, value: str, units: tuple[str, ...] = INTERVAL_UNITS, allow_zero: bool = False,
                   example: str = '4ep or 500ba') -> None:
    """Checks that recipe key ``key`` holds a Composer duration (``'4ep'``) in ``units``, positive or zero."""
    try:
        duration = Time.from_timestring(value)
    except (ValueError, TypeError) as error:
        raise RecipeError(f'{key} must be a duration such as {example}, got {value!r}: {error}') from None
    if duration.unit.value not in units:
        raise RecipeError(f'{key} must be counted in {", ".join(units)} (such as {example}), got {value!r}')
    if duration.value < 0 or (duration.value == 0 and not allow_zero):
        raise RecipeError(f'{key} must be {"0 or more" if allow_zero else "positive"} (such as {example}), got '
                          f'{value!r}')


SOURCES = ('cifar10', 'imagefolder', 'streaming', 'synthetic')
AUGMENTATIONS = ('cifar', 'imagenet')
#: data.on_device holds the decoded images on the training device and implements only these
ON_DEVICE_SOURCES = ('cifar10', 'imagefolder')
ON_DEVICE_AUGMENTATIONS = ('cifar',)
SPLIT_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')  # a folder inside data.root (or data.local), not a path


@dataclass
class ModelConfig:
    #: resnet20 | resnet56 | resnet110 | a torchvision classification model (resnet50, ...) | timm/<a timm model>
    name: str = MISSING
    num_classes: int = 10
    weights: Optional[str] = None  #: a local state dict or Composer checkpoint, loaded before SE (never downloaded)
    #: start every residual branch's last BatchNorm at zero scale: CIFAR and torchvision ResNets, and timm models
    #: taking zero_init_last (timm's ResNets and RegNets do so by default; false keeps each model's own default)
    zero_init_residual: bool = False

    def validate(self) -> None:
        if self.num_classes < 2:
            raise RecipeError(f'model.num_classes must be at least 2, got {self.num_classes}')


@dataclass
class DataConfig:
    source: str = MISSING  #: cifar10 | imagefolder | streaming | synthetic
    augmentation: str = 'cifar'  #: cifar (pad-4 crop, flip) | imagenet (random-resized crop, flip; resize + center crop)
    image_size: int = 32  #: training crop size (and synthetic image size)
    root: Optional[str] = None  #: cifar10 / imagefolder: the dataset folder
    download: bool = False  #: cifar10: download into root if absent
    remote: Optional[str] = None  #: streaming: where the MDS shards are (path or URL)
    local: Optional[str] = None  #: streaming: local cache folder
    train_split: str = 'train'
    eval_split: Optional[str] = None  #: default: 'val' or 'test', whichever exists
    max_train_samples: Optional[int] = None  #: use only this many training samples (a fixed random subset)
    max_eval_samples: Optional[int] = None
    synthetic_train_samples: int = 2048  #: synthetic: sizes of the two splits
    synthetic_eval_samples: int = 512
    num_workers: int = 0  #: dataloader worker processes (with on_device: processes that decode the images once)
    pin_memory: bool = False  #: dataloaders copy batches through pinned memory (on_device copies no batches)
    #: cifar10 / imagefolder: decode every image once into a uint8 tensor on the training device, and crop, flip and
    #: normalise each batch there (composer_se.recipes.data.on_device)
    on_device: bool = False

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise RecipeError(f'unknown data.source {self.source!r}; choose one of {", ".join(SOURCES)}')
        if self.image_size < 1:
            raise RecipeError(f'data.image_size must be at least 1, got {self.image_size}')
        if self.augmentation not in AUGMENTATIONS:
            raise RecipeError(f'unknown data.augmentation {self.augmentation!r}; choose one of '
                              f'{", ".join(AUGMENTATIONS)}')
        if self.on_device and self.source not in ON_DEVICE_SOURCES:
            raise RecipeError(f'data.on_device=true needs data.source {" or ".join(ON_DEVICE_SOURCES)}, got '
                              f'{self.source!r}; set data.on_device=false for this source')
        if self.on_device and self.augmentation not in ON_DEVICE_AUGMENTATIONS:
            raise RecipeError(f'data.on_device=true implements data.augmentation {", ".join(ON_DEVICE_AUGMENTATIONS)} '
                              f'only (pad-4 crop and flip), got {self.augmentation!r}; set data.on_device=false for '
                              f'the {self.augmentation} pipeline')
        for key in ('train_split', 'eval_split'):
            split = getattr(self, key)
            if split is not None and not SPLIT_NAME.match(split):
                raise RecipeError(f'data.{key} must be the name of a folder inside the data root (letters, digits, '
                                  f'".", "_", "-"), got {split!r}')
        for split in ('train', 'eval'):
            if getattr(self, f'synthetic_{split}_samples') < 1:
                raise RecipeError(f'data.synthetic_{split}_samples must be at least 1, got '
                                  f'{getattr(self, f"synthetic_{split}_samples")}')
        for count in (self.max_train_samples, self.max_eval_samples):
            if count is not None and count < 1:
                raise RecipeError(f'data.max_train_samples / max_eval_samples must be at least 1, got {count}')
        if self.num_workers < 0:
            raise RecipeError(f'data.num_workers must be >= 0, got {self.num_workers}')


@dataclass
class OptimizerConfig:
    name: str = 'decoupled_sgdw'  #: decoupled_sgdw | sgd | decoupled_adamw | adamw
    lr: float = MISSING
    momentum: float = 0.9  #: sgd-style optimizers
    nesterov: bool = False  #: sgd-style optimizers: Nesterov momentum (needs momentum > 0)
    weight_decay: float = 0.0
    no_decay_norm_and_bias: bool = False  #: put norms and biases in a group without weight decay

    def validate(self) -> None:
        if not self.lr > 0:
            raise RecipeError(f'optimizer.lr must be positive, got {self.lr}')
        if self.weight_decay < 0:
            raise RecipeError(f'optimizer.weight_decay must be >= 0, got {self.weight_decay}')
        if self.name in ('decoupled_sgdw', 'sgd') and not 0 <= self.momentum < 1:
            raise RecipeError(f'optimizer.momentum must be in [0, 1), got {self.momentum}')
        if self.nesterov and self.name not in ('decoupled_sgdw', 'sgd'):
            raise RecipeError(f'optimizer.nesterov applies to decoupled_sgdw and sgd, not {self.name!r}')
        if self.nesterov and self.momentum <= 0:
            raise RecipeError(f'optimizer.nesterov needs optimizer.momentum > 0, got {self.momentum}')


@dataclass
class SchedulerConfig:
    #: constant | multistep_with_warmup | cosine_decay_with_warmup | linear_decay_with_warmup
    name: str = 'constant'
    t_warmup: str = '0ba'  #: linear warm-up from 0 to the peak lr (0.2dur: a fifth of the run)
    milestones: list[str] = field(default_factory=list)  #: multistep_with_warmup
    gamma: float = 0.1  #: multistep_with_warmup
    alpha_f: float = 0.0  #: cosine_ and linear_decay_with_warmup: final lr as a fraction of the peak

    def validate(self) -> None:
        check_duration('scheduler.t_warmup', self.t_warmup, allow_zero=True, example='5ep or 500ba')
        for milestone in self.milestones:
            check_duration('scheduler.milestones', milestone, example='5ep or 500ba')
        if not self.gamma > 0:
            raise RecipeError(f'scheduler.gamma must be positive (the factor applied to the lr at each milestone), '
                              f'got {self.gamma}')
        if not 0 <= self.alpha_f <= 1:
            raise RecipeError(f'scheduler.alpha_f must be in [0, 1] (the final lr as a fraction of the peak), got '
                              f'{self.alpha_f}')
        if self.name == 'multistep_with_warmup' and not self.milestones:
            raise RecipeError('scheduler.milestones must list at least one time (e.g. [80ep, 120ep]) for '
                              'multistep_with_warmup')


@dataclass
class LoggersConfig:
    progress_bar: bool = True
    file: Optional[str] = None  #: a log file (Composer's FileLogger); {run_name} and {rank} are filled in
    tensorboard: Optional[str] = None  #: a TensorBoard log folder (needs the tensorboard package)


@dataclass
class CheckpointConfig:
    save_folder: Optional[str] = None
    save_interval: str = '1ep'
    save_num_checkpoints_to_keep: int = -1
    autoresume: bool = False  #: continue from the latest checkpoint in save_folder (needs run_name)
    load_path: Optional[str] = None
    load_weights_only: bool = False

    def validate(self) -> None:
        check_duration('checkpoint.save_interval', self.save_interval)
        if self.save_num_checkpoints_to_keep < -1:
            raise RecipeError(f'checkpoint.save_num_checkpoints_to_keep must be -1 (keep all), 0 or more, got '
                              f'{self.save_num_checkpoints_to_keep}')
        if self.load_path and '://' not in self.load_path and not os.path.isfile(self.load_path):
            raise RecipeError(f'checkpoint.load_path {self.load_path} does not exist; it takes a checkpoint file that '
                              f'a run saved (such as ckpt/ep3-ba1200-rank0.pt)')


#: torch.compile's modes; all but 'default' are Inductor's.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


@dataclass
class CompileConfig:
    """``torch.compile`` for the model, through Composer's ``Trainer(compile_config=...)``: ``compile: {}`` turns it on
    with torch's defaults, ``compile: null`` (the default) leaves the model eager."""

    mode: str = 'default'  #: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    fullgraph: bool = False  #: fail on a graph break instead of running that part eagerly
    dynamic: Optional[bool] = None  #: null: torch's choice (static, then dynamic where sizes change)
    backend: str = 'inductor'  #: inductor, or another torch.compile backend (aot_eager: no code generation)

    def validate(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise RecipeError(f'unknown compile.mode {self.mode!r}; choose one of {", ".join(COMPILE_MODES)}')
        import torch
        backends = torch.compiler.list_backends(exclude_tags=())
        if self.backend not in backends:
            raise RecipeError(f'unknown compile.backend {self.backend!r}; choose one of {", ".join(sorted(backends))}')
        if self.mode != 'default' and self.backend != 'inductor':
            raise RecipeError(f'compile.mode {self.mode} is a mode of the inductor backend, not of '
                              f'{self.backend!r}; set compile.backend=inductor or compile.mode=default')

    def trainer_config(self) -> dict[str, Any]:
        """What ``Trainer(compile_config=...)`` hands to ``torch.compile``."""
        config = {'backend': self.backend, 'fullgraph': self.fullgraph, 'dynamic': self.dynamic}
        if self.backend == 'inductor':
            config['mode'] = self.mode
        return config


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_duration: str = MISSING
    global_batch_size: int = MISSING  #: summed over all processes
    eval_batch_size: int = 256  #: summed over all processes
    eval_interval: str = '1ep'
    #: algorithm name -> keyword arguments (or null to leave it out), e.g. squeeze_excite: {min_channels: 64}
    algorithms: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_name: Optional[str] = None
    seed: int = 17
    precision: Optional[str] = None  #: fp32 | amp_fp16 | amp_bf16; default: amp_bf16 on GPU, fp32 on CPU
    device: Optional[str] = None  #: cpu | gpu; default: gpu when one is available
    device_train_microbatch_size: Optional[int] = None
    compile: Optional[CompileConfig] = None  #: torch.compile the model (null: eager)
    base: Optional[str] = None  #: another recipe this one starts from (a path relative to this file; files only)

    def validate(self) -> None:
        """Checks the top-level values, then each section's; the first bad value is a :class:`RecipeError`."""
        if self.global_batch_size < 1:
            raise RecipeError(f'global_batch_size must be at least 1, got {self.global_batch_size}')
        if self.eval_batch_size < 1:
            raise RecipeError(f'eval_batch_size must be at least 1, got {self.eval_batch_size}')
        if self.device_train_microbatch_size is not None and self.device_train_microbatch_size < 1:
            raise RecipeError(f'device_train_microbatch_size must be at least 1 (or null for the whole batch), got '
                              f'{self.device_train_microbatch_size}')
        if not 0 <= self.seed < 2**32:
            raise RecipeError(f'seed must be between 0 and 2**32 - 1, got {self.seed}')
        check_duration('max_duration', self.max_duration, LENGTH_UNITS)
        check_duration('eval_interval', self.eval_interval)
        if self.precision not in (None, 'fp32', 'amp_fp16', 'amp_bf16'):
            raise RecipeError(f'precision must be fp32, amp_fp16 or amp_bf16 (or null for the default), got '
                              f'{self.precision!r}')
        if self.device not in (None, 'cpu', 'gpu'):
            raise RecipeError(f'device must be cpu or gpu (or null for the default), got {self.device!r}')
        if self.run_name is not None and not PLAIN_NAME.match(self.run_name):
            raise RecipeError(f'run_name must be a plain name of letters, digits, ".", "_" and "-" (it becomes part '
                              f'of file names), got {self.run_name!r}')
        if self.checkpoint.autoresume and not (self.run_name and self.checkpoint.save_folder):
            raise RecipeError('checkpoint.autoresume needs run_name and checkpoint.save_folder, so that a relaunch '
                              'finds the run\'s checkpoints')
        for section in (self.model, self.data, self.optimizer, self.scheduler, self.checkpoint, self.compile):
            if section is not None:
                section.validate()


def _schema_at(path: list[str]) -> Optional[type]:
    """The dataclass describing the node at ``path`` (None where the schema stops being typed)."""
    node: Any = RecipeConfig
    for key in path:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if key not in fields:
            return None
        node = fields[key].type
        if isinstance(node, str):  # an annotation, as ``from __future__ import annotations`` keeps them
            node = globals().get(re.sub(r'^Optional\[(.*)\]$', r'\1', node), node)
    return node if dataclasses.is_dataclass(node) else None


def _unknown_key_message(full_key: str) -> str:
    *parent, key = full_key.split('.')
    schema = _schema_at(parent)
    valid = sorted(f.name for f in dataclasses.fields(schema)) if schema else []
    where = f"in '{'.'.join(parent)}'" if parent else 'at the top level'
    hint = difflib.get_close_matches(key, valid, n=1)
    suggestion = f" Did you mean '{hint[0]}'?" if hint else ''
    return f"unknown key '{full_key}' {where}.{suggestion} Valid keys there: {', '.join(valid)}."


def _translate(error: OmegaConfBaseException, origin: str, key: str = '') -> RecipeError:
    full_key = getattr(error, 'full_key', None) or key
    if isinstance(error, ConfigKeyError) and full_key:
        return RecipeError(f'{origin}: {_unknown_key_message(full_key)}')
    if isinstance(error, ValidationError):
        first_line = str(error).splitlines()[0]
        return RecipeError(f"{origin}: wrong type for '{full_key}': {first_line}")
    return RecipeError(f'{origin}: {str(error).splitlines()[0]}' + (f" (key '{full_key}')" if full_key else ''))


_RESOLVER = re.compile(r'\$\{\s*[\w.]+\s*:')


def _reject_resolvers(node: Any, origin: str, path: str = '') -> None:
    if isinstance(node, DictConfig):
        items = [(k, node._get_node(k)) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(i, node._get_node(i)) for i in range(len(node))]
    else:
        return
    for key, child in items:
        child_path = f'{path}.{key}' if path else str(key)
        value = child._value() if not isinstance(child, (DictConfig, ListConfig)) else None
        if isinstance(value, str) and _RESOLVER.search(value):
            raise RecipeError(
                f"{origin}: '{child_path}' uses a resolver ({value!r}); recipes may refer to other keys "
                f'(${{model.num_classes}}) but not call resolvers such as oc.env, so that they cannot read the '
                f'environment.',
            )
        _reject_resolvers(child, origin, child_path)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> list[tuple[DictConfig, str]]:
    """The file's config preceded by those of its ``base`` chain, each with its origin for messages."""
    if path in seen:
        raise RecipeError(f'recipe {path} is its own base (through {" -> ".join(str(p) for p in seen)})')
    if not path.is_file():
        raise RecipeError(f'recipe file {path} does not exist')
    try:
        raw = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: one line is enough
        raise RecipeError(f'recipe {path} is not valid YAML: {str(error).splitlines()[0]}') from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f'recipe {path} must be a mapping of keys to values, got {type(raw).__name__}')
    _reject_resolvers(raw, str(path))
    chain: list[tuple[DictConfig, str]] = []
    base = raw.get('base')
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: 'base' must be a path to another recipe, got {base!r}")
        tried = (path.parent / base).resolve()
        if not tried.is_file():
            raise RecipeError(
                f"{path}: base: {base!r} does not resolve to a recipe file: tried {tried} ('base' is relative to the "
                f"folder of the recipe that names it, {path.parent})",
            )
        chain = _read_yaml(tried, seen + (path,))
        raw.pop('base')
    return chain + [(raw, str(path))]


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> RecipeConfig:
    """Reads a recipe, applies its ``base`` chain and the ``key=value`` overrides, and checks it.

    Returns:
        RecipeConfig: the typed, fully resolved config, as plain dataclasses, with its
        values checked (:meth:`RecipeConfig.validate`).

    Raises:
        RecipeError: with one message naming the key, the file or the override at fault.
    """
    merged = OmegaConf.structured(RecipeConfig)
    for layer, origin in _read_yaml(Path(path).resolve(), ()):
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise _translate(error, origin) from None
        except (TypeError, ValueError) as error:  # e.g. a list where the schema has a mapping
            raise RecipeError(f'{origin}: {error} (a list where a mapping belongs, or the reverse?)') from None
    for override in overrides:
        if '=' not in override:
            raise RecipeError(f'override {override!r} is not of the form key=value (e.g. data.root=/data/imagenet)')
        if override.split('=', 1)[0].strip() == 'base':
            raise RecipeError(f'override {override!r}: base can only be set in a recipe file')
        try:
            dotted = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as error:
            raise RecipeError(f'override {override!r}: {str(error).splitlines()[0]}') from None
        _reject_resolvers(dotted, f'override {override!r}')
        try:
            merged = OmegaConf.merge(merged, dotted)
        except OmegaConfBaseException as error:
            raise _translate(error, f'override {override!r}', override.split('=', 1)[0]) from None
        except (TypeError, ValueError) as error:
            raise RecipeError(f'override {override!r}: {error} (a list where a mapping belongs, or the reverse?)'
                              ) from None
    try:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise RecipeError(f'missing mandatory key(s): {", ".join(missing)}; set them in the recipe or as key=value')
        OmegaConf.resolve(merged)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _translate(error, str(path)) from None
    assert isinstance(config, RecipeConfig)
    config.validate()
    return config
