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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    'CheckpointConfig',
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


@dataclass
class ModelConfig:
    name: str = MISSING  #: resnet20 | resnet56 | resnet110 | a torchvision classification model (resnet50, ...)
    num_classes: int = 10
    weights: Optional[str] = None  #: a local state dict or Composer checkpoint, loaded before SE (never downloaded)


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
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class OptimizerConfig:
    name: str = 'decoupled_sgdw'  #: decoupled_sgdw | sgd | decoupled_adamw | adamw
    lr: float = MISSING
    momentum: float = 0.9  #: sgd-style optimizers
    weight_decay: float = 0.0
    no_decay_norm_and_bias: bool = False  #: put norms and biases in a group without weight decay


@dataclass
class SchedulerConfig:
    name: str = 'constant'  #: constant | multistep_with_warmup | cosine_decay_with_warmup
    t_warmup: str = '0ba'
    milestones: list[str] = field(default_factory=list)  #: multistep_with_warmup
    gamma: float = 0.1  #: multistep_with_warmup
    alpha_f: float = 0.0  #: cosine_decay_with_warmup: final lr as a fraction of the peak


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
    base: Optional[str] = None  #: another recipe this one starts from (a path relative to this file; files only)


def _schema_at(path: list[str]) -> Optional[type]:
    """The dataclass describing the node at ``path`` (None where the schema stops being typed)."""
    node: Any = RecipeConfig
    for key in path:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if key not in fields:
            return None
        node = fields[key].type
        node = globals().get(node, node) if isinstance(node, str) else node
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
        chain = _read_yaml((path.parent / base).resolve(), seen + (path,))
        raw.pop('base')
    return chain + [(raw, str(path))]


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> RecipeConfig:
    """Reads a recipe, applies its ``base`` chain and the ``key=value`` overrides, and checks it.

    Returns:
        RecipeConfig: the typed, fully resolved config, as plain dataclasses.

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
    return config
