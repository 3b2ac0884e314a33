"""Online-distillation methods, one file each, registered by name in ``METHODS``."""
from ..registry import Registry

METHODS = Registry("method")

from . import cl, dml, ffl, kdcl, okddip, one, pcl, vanilla  # noqa: E402,F401  (registration side effects)
from .base import Method, Summary  # noqa: E402


def build_method(name: str, spec, num_classes: int, options) -> Method:
    return METHODS.get(name)(spec, num_classes, options)


__all__ = ["METHODS", "Method", "Summary", "build_method"]
