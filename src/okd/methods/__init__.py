"""Online-distillation methods, one file each, registered by name in ``METHODS``.

Importing this package imports every module in its folder, so a new method is
one new file here with ``@METHODS.register("name", title="Its column title")``
on its class (docs/extending.md).
"""
from pathlib import Path

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

import_submodules(__name__, __path__)

from .base import KDOptions, Method, MethodOptions, Summary, total_loss  # noqa: E402


def build_method(name: str, spec, num_classes: int, options) -> Method:
    return METHODS.get(name)(spec, num_classes, options)


__all__ = ["METHODS", "KDOptions", "Method", "MethodOptions", "Summary", "build_method", "total_loss"]
