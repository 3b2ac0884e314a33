"""Backbones. Importing this package imports every module in it, registering each backbone in ``BACKBONES``."""
import dataclasses
import inspect
from pathlib import Path
from typing import Dict, Optional

from ..errors import ConfigError
from ..registry import Registry, import_submodules

HOME = Path(__file__).resolve().parent
# name -> function(num_classes, **options) -> BackboneSpec
BACKBONES = Registry(
    "model", hint=f"a new backbone is a file in {HOME}/ whose spec function has @BACKBONES.register('{{name}}')")

from .nets import (  # noqa: E402
    BackboneSpec,
    Branch,
    BranchOutput,
    BranchOutputs,
    IndependentNets,
    MultiBranchNet,
    SingleNet,
    cohort_specs,
)

import_submodules(__name__, __path__, BACKBONES)

# keys of the ``model`` config section that a backbone may take as keyword options
MODEL_OPTIONS = ("dropout", "final_norm")


def backbone_options(name: str) -> tuple:
    """The ``MODEL_OPTIONS`` that backbone ``name``'s spec function accepts."""
    params = inspect.signature(BACKBONES.get(name)).parameters
    return tuple(k for k in MODEL_OPTIONS if k in params)


def check_model_options(name: str, **options) -> Dict:
    """The options that are set (not None); a ConfigError for one that backbone ``name`` does not take."""
    options = {k: v for k, v in options.items() if v is not None}
    takes = backbone_options(name)
    for key in options:
        if key not in takes:
            which = [b for b in BACKBONES if key in backbone_options(b)]
            raise ConfigError(f"config key 'model.{key}' does not apply to {BACKBONES.canonical(name)} "
                              f"(only to {', '.join(which) or 'no backbone'}); leave it null")
    return options


def backbone_spec(name: str, num_classes: int, **options) -> BackboneSpec:
    """The spec of backbone ``name``; options left None take the backbone's defaults."""
    spec = BACKBONES.get(name)(num_classes, **check_model_options(name, **options))
    return dataclasses.replace(spec, name=BACKBONES.canonical(name))


def check_input_size(name: str, spec: BackboneSpec, size: int, dataset: str) -> None:
    """A one-line ConfigError when backbone ``name`` cannot take ``size`` x ``size`` images."""
    if spec.input_size is not None and size != spec.input_size:
        raise ConfigError(f"model {BACKBONES.canonical(name)} takes {spec.input_size}x{spec.input_size} images, "
                          f"dataset '{dataset}' has {size}x{size}; pick another model (e.g. resnet18) or resize "
                          f"the data")


def enable_batched_branches(module) -> int:
    """Run the branches of every multi-branch network in ``module`` as one grouped computation
    (``okd.models.grouped``); the number of networks switched. A ConfigError if one cannot be."""
    nets = [m for m in module.modules() if isinstance(m, MultiBranchNet)]
    for net in nets:
        try:
            net.enable_batched_branches()
        except NotImplementedError as exc:
            raise ConfigError(f"train.batched_branches: {str(exc).replace('batched branches: ', '')}; "
                              f"set train.batched_branches=false") from None
    return len(nets)


def create_model(name: str, num_classes: int, dropout: Optional[float] = None,
                 final_norm: Optional[bool] = None) -> SingleNet:
    """The single deployable network of a backbone: trunk + one branch."""
    spec = backbone_spec(name, num_classes, dropout=dropout, final_norm=final_norm)
    return SingleNet(spec.make_trunk(), spec.make_branch())


__all__ = ["BACKBONES", "MODEL_OPTIONS", "BackboneSpec", "Branch", "BranchOutput", "BranchOutputs", "IndependentNets",
           "MultiBranchNet", "SingleNet", "backbone_options", "cohort_specs", "backbone_spec", "check_input_size", "check_model_options",
           "create_model", "enable_batched_branches"]
