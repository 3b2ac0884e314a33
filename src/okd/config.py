"""Experiment configuration: defaults in code, a short YAML on top, dotted overrides last.

One YAML file is the single source of truth of an experiment. Every key has a
default here; an experiment file only states what differs. ``base: other.yml``
inherits another file (paths relative to the including file). The ``method``
section's schema depends on ``method.name``: each method registers an options
dataclass (see ``okd.methods``), so its defaults also live next to its code,
and ``Config.method`` is that dataclass (``cfg.method.name`` is the method).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .errors import ConfigError
from .methods import METHODS, MethodOptions
from .models import backbone_options, check_model_options
from .registry import closest


@dataclass
class DataConfig:
    name: str = "cifar100"  # cifar10 | cifar100 | imagefolder | tinyimagenet | imagenet | digits
    root: Optional[str] = None  # null: $OKD_DATA, else ./data
    download: bool = False  # try torchvision's downloader when CIFAR is missing
    mean: Optional[List[float]] = None  # null: the dataset's standard constants
    std: Optional[List[float]] = None
    pad: int = 4  # zero padding of RandomCrop(32, padding=pad)
    flip: bool = True  # horizontal flip with p=0.5
    cache_dir: Optional[str] = None  # decoded-ImageFolder cache; null: beside the data or ~/.cache/okd
    train_subset: Optional[int] = None  # use a fixed random subset of this many training images (null: all)
    test_subset: Optional[int] = None  # same for the test split
    pipeline: str = "auto"  # resident | stream | auto (resident when crop_flip data decodes into <= 4 GiB)
    image_size: Optional[int] = None  # side of the views; null: the dataset's (32, tinyimagenet 64, imagenet 224)
    augment: Optional[str] = None  # crop_flip | resized_crop; null: the dataset's recipe (imagenet: resized_crop)
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # resized_crop's area fraction range
    workers: Optional[int] = None  # streaming decode processes per training process; null: its share of the cores
    sampler: str = "shuffle"  # shuffle | m_per_class (MCL's class-balanced batches, okd.data.sampling)
    m_per_class: int = 2  # images of each class in a batch with sampler m_per_class
    # one augmentation recipe per method view ("crop+flip", "crop+flip+rotate", "crop+flip+cutout",
    # "crop+randaugment", ...: okd.data.view_augment); null: crop+flip for every view
    views: Optional[List[str]] = None


@dataclass
class ModelConfig:
    # a backbone, or a cohort: one backbone per independent network (DML, KDCL, MCL, SwitOKD)
    name: Union[str, List[str]] = "resnet32"
    num_classes: Optional[int] = None  # null: taken from the data
    dropout: Optional[float] = None  # VGG branch dropout; null: the method's default (0.5 ONE/CL/OKDDip, else 0)
    final_norm: Optional[bool] = None  # DenseNet's final BatchNorm; null: true (false: the PCL reproduction's)

    @property
    def names(self) -> List[str]:
        """The backbones, one per network of a cohort (a single backbone: a list of one)."""
        return list(self.name) if isinstance(self.name, list) else [self.name]

    @property
    def label(self) -> str:
        """What runs, reports and run names call the model: the backbone, or a cohort's joined by '+'."""
        return model_label(self.name)


def model_label(name: Union[str, List[str]]) -> str:
    """``resnet32``, or ``resnet32+wrn16_2`` for a cohort of two networks."""
    return "+".join(name) if isinstance(name, list) else str(name)


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    name: str = "multistep"  # multistep | cosine | constant (stepped once per epoch)
    milestones: List[int] = field(default_factory=lambda: [150, 225])
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 128
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    eval_batch_size: int = 500
    log_every: int = 50  # steps between plain progress lines when not on a terminal
    threads: int = 0  # CPU threads for torch; 0 = all cores
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; losses in fp32; fp16 uses a GradScaler)
    nonfinite: str = "stop"  # a non-finite loss: stop (keep the last good checkpoint) | skip the step
    max_skipped_steps: int = 10  # with nonfinite: skip, stop after this many skipped steps
    sync_bn: bool = False  # SyncBatchNorm across torchrun processes (CUDA only)
    channels_last: Optional[bool] = None  # NHWC memory format for weights and inputs; null: on, except on a CPU for a model oneDNN#6035 crashes in it
    compile: bool = False  # torch.compile the training step's forward
    cuda_graphs: Optional[bool] = None  # the whole step as one CUDA graph; null: on for CUDA in one process
    batched_branches: Optional[bool] = None  # the m branches as one grouped computation; null: on for CUDA
    sync_every: int = 0  # steps between host reads of the step flags; 0: 1 on CPU, log_every on CUDA


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # also write last.pt every N optimizer steps inside an epoch (0: per epoch only)


@dataclass
class OutputConfig:
    root: str = "runs"
    run_name: Optional[str] = None  # null: <dataset>_<model>_<method>_seed<seed>


def default_run_name(dataset: str, model: str, method: str, seed: int) -> str:
    """A run's directory name without ``output.run_name`` (and a cell's of the comparison table)."""
    return f"{dataset}_{model}_{method}_seed{seed}"


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodOptions = field(default_factory=lambda: METHODS.get("pcl").Options())
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def run_name(self) -> str:
        return self.output.run_name or default_run_name(self.data.name, self.model.label, self.method.name, self.seed)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.root) / self.run_name

    def to_dict(self) -> Dict[str, Any]:
        tree = dataclasses.asdict(self)
        tree["method"] = {"name": self.method.name, **tree["method"]}
        return tree

    def model_options(self, backbone: Optional[str] = None) -> Dict[str, Any]:
        """Keyword options of ``backbone`` (by default the first network's): the ``model`` keys it
        takes, nulls resolved."""
        takes = backbone_options(backbone or self.model.names[0])
        options = {"dropout": self.model.dropout, "final_norm": self.model.final_norm}
        if options["dropout"] is None and "dropout" in takes:
            options["dropout"] = METHODS.get(self.method.name).branch_dropout
        return {k: v for k, v in options.items() if k in takes and v is not None}


# ---------------------------------------------------------------- loading

def _read_yaml(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"config '{path}' includes itself through 'base'")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error in '{path}'{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path}' must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml(path.parent / str(base), seen + (path.resolve(),))
    if _method_name(data) not in (None, _method_name(parent)):
        parent.pop("method", None)  # the base's options belong to another method
    return deep_merge(parent, data)


def _method_name(tree: Dict[str, Any]) -> Optional[str]:
    section = tree.get("method")
    return section.get("name") if isinstance(section, dict) else None


def deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple:
    """'train.epochs=2' -> (['train', 'epochs'], 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. train.epochs=2)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: Dict[str, Any], dotted: List[str], value: Any) -> None:
    node = tree
    for part in dotted[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{'.'.join(dotted)}': '{part}' is not a section")
        node = nxt
    node[dotted[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Read ``path`` (with its ``base`` chain) and apply dotted overrides in order.

    A method section belongs to its method: when a child file or an override
    changes ``method.name``, the options written for the previous method are
    dropped and the new method starts from its defaults in code. Overrides of
    ``method.name`` are applied first, so ``method.temperature=4 --method dml``
    sets DML's temperature.
    """
    tree: Dict[str, Any] = _read_yaml(Path(path)) if path else {}
    parsed = [parse_override(text) for text in overrides or []]
    parsed.sort(key=lambda kv: kv[0] != ["method", "name"])  # stable: method.name first
    for dotted, value in parsed:
        if dotted == ["method", "name"] and value != _method_name(tree):
            tree["method"] = {}
        apply_override(tree, dotted, value)
    return config_from_dict(tree)


# ---------------------------------------------------------------- validation

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = " or null" if len(inner) < len(typing.get_args(tp)) else ""
        return " or ".join(_describe(a) for a in inner) + nullable
    if origin in (list, List):
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in inner[:-1]:
            try:
                return coerce(value, option, key)
            except ConfigError:
                pass
        try:
            return coerce(value, inner[-1], key)
        except ConfigError:
            raise ConfigError(f"config key '{key}' must be {_describe(tp)}, got {value!r}") from None
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be {_describe(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"config key '{key}' must be {_describe(tp)}, got {value!r}")
    return float(value) if tp is float else value


def build_dataclass(cls, values: Dict[str, Any], prefix: str):
    """Instantiate ``cls`` from ``values``, naming unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            section = prefix.rstrip('.') or 'top level'
            valid = f"valid keys in '{section}': {', '.join(names)}" if names else f"'{section}' has no options here"
            raise ConfigError(f"unknown config key '{prefix}{key}'{closest(key, names)}; {valid}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_from_dict(tree: Dict[str, Any]) -> Config:
    tree = dict(tree)
    method_tree = tree.pop("method", None) or {}
    if not isinstance(method_tree, dict):
        raise ConfigError(f"config key 'method' must be a section (mapping), got {method_tree!r}")
    cfg = build_dataclass(Config, tree, "")
    method_tree = dict(method_tree)
    name = method_tree.pop("name", "pcl")
    method_cls = METHODS.get(coerce(name, str, "method.name"))
    cfg.method = build_dataclass(method_cls.Options, method_tree, "method.")
    cfg.method.check()
    validate(cfg)
    return cfg


def default_tree(method_name: str) -> Dict[str, Any]:
    """Every key's default value, the method section being ``method_name``'s."""
    return Config(method=METHODS.get(method_name).Options()).to_dict()


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _positive(value, key):
    if value <= 0:
        raise ConfigError(f"config key '{key}' must be > 0, got {value}")


def validate(cfg: Config) -> None:
    """Range checks that the type system cannot express."""
    from .data import DATASETS
    from .data.datasets import PIPELINES
    from .data.images import AUGMENTS
    from .data.sampling import SAMPLERS

    DATASETS.canonical(cfg.data.name)
    validate_model_names(cfg)
    _positive(cfg.optim.lr, "optim.lr")
    _positive(cfg.train.epochs, "train.epochs")
    _positive(cfg.train.batch_size, "train.batch_size")
    _positive(cfg.train.eval_every, "train.eval_every")
    _positive(cfg.train.eval_batch_size, "train.eval_batch_size")
    if cfg.optim.weight_decay < 0:
        raise ConfigError(f"config key 'optim.weight_decay' must be >= 0, got {cfg.optim.weight_decay}")
    if cfg.schedule.name not in ("multistep", "cosine", "constant"):
        raise ConfigError(
            f"config key 'schedule.name' must be multistep, cosine or constant, got "
            f"'{cfg.schedule.name}'{closest(cfg.schedule.name, ['multistep', 'cosine', 'constant'])}"
        )
    if sorted(cfg.schedule.milestones) != cfg.schedule.milestones:
        raise ConfigError(f"config key 'schedule.milestones' must be increasing, got {cfg.schedule.milestones}")
    if cfg.schedule.name == "multistep" and any(m > cfg.train.epochs for m in cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones {cfg.schedule.milestones} lie beyond the last epoch "
                          f"(train.epochs={cfg.train.epochs}); lower them, e.g. schedule.milestones=[], "
                          f"or raise train.epochs")
    if cfg.optim.momentum < 0 or cfg.optim.momentum >= 1:
        raise ConfigError(f"config key 'optim.momentum' must be in [0, 1), got {cfg.optim.momentum}")
    if cfg.schedule.gamma <= 0:
        raise ConfigError(f"config key 'schedule.gamma' must be > 0, got {cfg.schedule.gamma}")
    for key, value, choices in (("train.precision", cfg.train.precision, PRECISIONS),
                                ("train.nonfinite", cfg.train.nonfinite, ("stop", "skip"))):
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be {' or '.join(choices)}, got '{value}'"
                              f"{closest(value, list(choices))}")
    if cfg.train.max_skipped_steps < 0 or cfg.checkpoint.every_n_steps < 0 or cfg.train.sync_every < 0:
        raise ConfigError("config keys 'train.max_skipped_steps', 'checkpoint.every_n_steps' and "
                          "'train.sync_every' must be >= 0")
    if cfg.train.log_every <= 0 or cfg.train.threads < 0:
        raise ConfigError("config key 'train.log_every' must be > 0 and 'train.threads' >= 0")
    if cfg.data.pad < 0:
        raise ConfigError(f"config key 'data.pad' must be >= 0, got {cfg.data.pad}")
    for key, value, choices in (("data.pipeline", cfg.data.pipeline, PIPELINES),
                                ("data.augment", cfg.data.augment, (None,) + AUGMENTS),
                                ("data.sampler", cfg.data.sampler, SAMPLERS)):
        if value not in choices:
            shown = [c for c in choices if c]
            raise ConfigError(f"config key '{key}' must be {' or '.join(shown)}{' or null' if None in choices else ''}"
                              f", got '{value}'{closest(str(value), shown)}")
    if cfg.data.image_size is not None:
        _positive(cfg.data.image_size, "data.image_size")
    lo_hi = cfg.data.crop_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"config key 'data.crop_scale' must be [low, high] with 0 < low <= high <= 1, got {lo_hi}")
    if cfg.data.views is not None:
        from .data.view_augment import parse

        for recipe in cfg.data.views:
            parse(recipe)
    if cfg.data.m_per_class < 1:
        raise ConfigError(f"config key 'data.m_per_class' must be >= 1, got {cfg.data.m_per_class}")
    if cfg.data.sampler == "m_per_class" and cfg.train.batch_size % cfg.data.m_per_class:
        raise ConfigError(f"config key 'train.batch_size' ({cfg.train.batch_size}) must be a multiple of "
                          f"'data.m_per_class' ({cfg.data.m_per_class}) with data.sampler m_per_class")
    if cfg.data.workers is not None and cfg.data.workers < 0:
        raise ConfigError(f"config key 'data.workers' must be >= 0 or null, got {cfg.data.workers}")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"config key 'data.{key}' must list 3 channel values, got {value}")
    for key in ("train_subset", "test_subset"):
        value = getattr(cfg.data, key)
        if value is not None:
            _positive(value, f"data.{key}")
    if cfg.model.num_classes is not None:
        _positive(cfg.model.num_classes, "model.num_classes")
    check_cohort_options(cfg.model)
    if cfg.model.dropout is not None and not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"config key 'model.dropout' must be in [0, 1), got {cfg.model.dropout}")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got '{dev}'")


def validate_model_names(cfg: Config) -> None:
    """Canonical backbone names; a cohort only for a method of independent networks, one per network."""
    from .models import BACKBONES

    if isinstance(cfg.model.name, str) and "+" in cfg.model.name:  # a cohort's label: resnet32+wrn16_2
        cfg.model.name = cfg.model.name.split("+")
    if isinstance(cfg.model.name, list):
        if not cfg.model.name:
            raise ConfigError("config key 'model.name' is an empty list; name a backbone, or one per network")
        cfg.model.name = [BACKBONES.canonical(n) for n in cfg.model.name]
        if len(cfg.model.name) == 1:
            cfg.model.name = cfg.model.name[0]
    else:
        cfg.model.name = BACKBONES.canonical(cfg.model.name)
    names = cfg.model.names
    method = METHODS.get(cfg.method.name)
    size = method.cohort_size(cfg.method)
    if size is None and len(set(names)) > 1:
        raise ConfigError(f"method {cfg.method.name} {method.identical_networks}, so model.name must be one "
                          f"backbone; got {cfg.model.label}")
    if size is not None and len(names) > 1 and len(names) != size:
        raise ConfigError(f"model.name lists {len(names)} backbones ({cfg.model.label}) but method "
                          f"{cfg.method.name} trains {size} networks{method.cohort_hint}; list one backbone per "
                          f"network or a single backbone for all")


def check_cohort_options(model: ModelConfig) -> None:
    """``model.dropout`` / ``final_norm`` must apply to some backbone of the model (each takes what it can)."""
    names = list(dict.fromkeys(model.names))
    if len(names) == 1:
        check_model_options(names[0], dropout=model.dropout, final_norm=model.final_norm)
        return
    for key in ("dropout", "final_norm"):
        if getattr(model, key) is not None and not any(key in backbone_options(n) for n in names):
            check_model_options(names[0], **{key: getattr(model, key)})  # its one-line error


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
