"""Backbones. Importing this package registers every backbone in ``BACKBONES``."""
from . import densenet, resnet, vgg  # noqa: F401  (registration side effects)
from .branched import BackboneSpec, Branch, IndependentNets, MultiBranchNet, SingleNet
from .registry import BACKBONES


def backbone_spec(name: str, num_classes: int) -> BackboneSpec:
    return BACKBONES.get(name)(num_classes)


def create_model(name: str, num_classes: int) -> SingleNet:
    """The single deployable network of a backbone: trunk + one branch."""
    spec = backbone_spec(name, num_classes)
    return SingleNet(spec.make_trunk(), spec.make_branch())


__all__ = ["BACKBONES", "BackboneSpec", "Branch", "IndependentNets", "MultiBranchNet", "SingleNet", "backbone_spec", "create_model"]
