from ..registry import Registry

# name -> function(num_classes) -> BackboneSpec
BACKBONES = Registry("model")
