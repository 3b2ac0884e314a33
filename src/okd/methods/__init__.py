"""Online-distillation methods, one file each, registered by name in ``METHODS``.

Importing this package imports every module in its folder, so a new method is
one new file here with ``@METHODS.register("name", title="Its column title")``
on its class (docs/extending.md).
"""
from pathlib import Path
from typing import Optional

from ..registry import Registry, import_submodules

HOME = Path(__file__).resolve().parent


def _bind_options(name: str, cls, meta) -> None:
    """A registered method must bring its own Options dataclass (it learns the method's name) and
    its ``title``, the header of its column in the comparison table."""
    from .base import Method, MethodContractError, MethodOptions, where_defined

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodContractError(f"@METHODS.register('{name}') decorates {cls!r}, which is not an okd Method")
    options = cls.__dict__.get("Options")
    if options is None or not issubclass(options, MethodOptions):
        raise MethodContractError(
            f"method class {cls.__name__} ({where_defined(cls)}) needs its own 'Options' dataclass deriving "
            f"from MethodOptions or KDOptions (okd.methods.base)")
    if not isinstance(meta.get("title"), str):
        raise MethodContractError(f"@METHODS.register('{name}') needs title=\"...\", the method's column header "
                                  f"in the comparison table ({where_defined(cls)})")
    options.method_name = name


METHODS = Registry("method", on_register=_bind_options,
                   hint=f"a new method is a file in {HOME}/ whose class has @METHODS.register('{{name}}')")

import_submodules(__name__, __path__, METHODS)

from .base import KDOptions, Method, MethodOptions, Summary, total_loss  # noqa: E402


def build_method(name: str, spec, num_classes: int, options) -> Method:
    return METHODS.get(name)(spec, num_classes, options)


def build_configured_method(cfg, num_classes: int, image_size: Optional[int] = 32) -> Method:
    """The method of a run's config (``okd.config.Config``) on its backbone(s), on the current default
    device, before any module replacement or move; ``image_size`` None skips the input-size check."""
    from ..models import backbone_spec, check_input_size

    specs = [backbone_spec(name, num_classes, **cfg.model_options(name)) for name in cfg.model.names]
    if image_size is not None:
        for name, spec in zip(cfg.model.names, specs):
            check_input_size(name, spec, image_size, cfg.data.name)
    # a cohort's networks one spec each; one backbone for all members as one spec
    spec = specs[0] if len(set(cfg.model.names)) == 1 else specs
    return build_method(cfg.method.name, spec, num_classes, cfg.method)


__all__ = ["METHODS", "KDOptions", "Method", "MethodOptions", "Summary", "build_configured_method", "build_method",
           "total_loss"]
