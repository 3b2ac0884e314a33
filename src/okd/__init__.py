"""okd: online knowledge distillation on CIFAR, configured by one YAML file."""
from __future__ import annotations

__version__ = "0.1.0"

from .methods import METHODS  # noqa: E402
from .models import BACKBONES, backbone_options, create_model  # noqa: E402


def load_model(path, map_location="cpu"):
    """The deployable network stored in an okd checkpoint (``best.pt`` or ``last.pt``), in eval mode."""
    from . import checkpoint_file

    blob = checkpoint_file.load(path, map_location)
    saved = (blob.get("config") or {}).get("model") or {}
    # the deployed network's backbone (a cohort's checkpoint names it; older ones have one backbone)
    name = blob.get("deploy_model", blob["model_name"])
    final_norm = saved.get("final_norm") if "final_norm" in backbone_options(name) else None
    model = create_model(name, blob["num_classes"], final_norm=final_norm)
    model.load_state_dict(blob["deploy"])
    return model.eval()


__all__ = ["BACKBONES", "METHODS", "create_model", "load_model", "__version__"]
