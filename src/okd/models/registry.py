from pathlib import Path

from ..registry import Registry

HOME = Path(__file__).resolve().parent
# name -> function(num_classes, **options) -> BackboneSpec
BACKBONES = Registry(
    "model", hint=f"a new backbone is a file in {HOME}/ whose spec function has @BACKBONES.register('{{name}}')")
