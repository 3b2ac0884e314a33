"""Spec fidelity (docs/methods.md §2, §9): PCL's VGG ensemble input, VGG dropout per method, DenseNet's
final BatchNorm switch, and per-view BatchNorm kept under SyncBatchNorm."""
import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch
from torch import nn

from okd import checkpoint_file, create_model, load_model
from okd.config import load_config
from okd.errors import ConfigError
from okd.methods.pcl import PCL
from okd.models import backbone_spec
from okd.models.view_bn import ViewSyncBatchNorm, convert_sync_batchnorm


def test_pcl_vgg_ensemble_reads_the_flattened_conv_feature_of_each_peer():
    torch.manual_seed(0)
    method = PCL(backbone_spec("vgg16", 10), 10, PCL.Options()).train()
    fc = method.net.ensemble_fc
    assert fc.in_features == 3 * 512
    # initialised as VGG's linear layers: N(0, 0.01), zero bias
    assert torch.count_nonzero(fc.bias) == 0 and 0.009 < fc.weight.std().item() < 0.011
    views, labels = random_batch(3, batch=2)
    peers = method.net.peers
    conv = [peers.branches[j].feature_map(peers.trunk(views[j])).flatten(1) for j in range(3)]
    assert all(c.shape == (2, 512) for c in conv)
    feats, _ = peers.forward_views(views)
    for c, f in zip(conv, feats):
        assert torch.equal(c, f)
    # CE(z_e) trains the convolutions, not the peers' hidden FC layers
    ce_ensemble = F.cross_entropy(method.net.ensemble(feats), labels)
    ce_ensemble.backward()
    hidden = [m for m in peers.branches[0].body if isinstance(m, nn.Linear)]
    assert len(hidden) == 2 and all(m.weight.grad is None for m in hidden)
    last_conv = [m for m in peers.branches[0].body if isinstance(m, nn.Conv2d)][-1]
    assert last_conv.weight.grad is not None and last_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method,expected", [("one", 0.5), ("cl", 0.5), ("okddip", 0.5), ("pcl", 0.0),
                                             ("dml", 0.0), ("kdcl", 0.0), ("ffl", 0.0), ("vanilla", 0.0)])
def test_vgg_dropout_defaults_per_method(method, expected):
    cfg = load_config(None, ["model.name=vgg16", f"method.name={method}"])
    assert cfg.model.dropout is None and cfg.model_options() == {"dropout": expected}


def test_model_dropout_sets_the_vgg_branch_dropout_and_is_refused_elsewhere():
    cfg = load_config(None, ["model.name=vgg16", "method.name=one", "model.dropout=0.3"])
    assert cfg.model_options() == {"dropout": 0.3}
    branch = backbone_spec("vgg16", 10, **cfg.model_options()).make_branch()
    assert [m.p for m in branch.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert load_config(None, ["model.name=resnet32"]).model_options() == {}
    with pytest.raises(ConfigError, match="'model.dropout' does not apply to resnet32 \\(only to vgg16\\)"):
        load_config(None, ["model.name=resnet32", "model.dropout=0.5"])
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\)"):
        load_config(None, ["model.name=vgg16", "model.dropout=1.5"])


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_model_final_norm_selects_the_densenet_variant(tmp_path):
    # docs/methods.md §12: 176,122 with the final BatchNorm (default), 175,858 without (the reproduction's)
    assert count(create_model("densenet40_12", 10)) == 176_122
    cfg = load_config(None, ["model.name=densenet40_12", "model.final_norm=false"])
    assert cfg.model_options() == {"final_norm": False}
    assert count(create_model("densenet40_12", 10, **cfg.model_options())) == 175_858
    with pytest.raises(ConfigError, match="'model.final_norm' does not apply to vgg16"):
        load_config(None, ["model.name=vgg16", "model.final_norm=false"])
    # a best.pt of the variant loads back into the variant
    net = create_model("densenet40_12", 10, final_norm=False)
    checkpoint_file.save_atomic({"model_name": "densenet40_12", "num_classes": 10, "config": cfg.to_dict(),
                            "deploy": net.state_dict()}, tmp_path / "best.pt")
    loaded = load_model(tmp_path / "best.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), net.eval()(x))


def test_sync_batchnorm_keeps_per_view_statistics_with_fused_views():
    """train.sync_bn + method.fused_views: each view normalised on its own, running stats updated per view.

    Without a process group SyncBatchNorm computes what BatchNorm does, so the fused, converted
    model must match the per-view reference order exactly up to float rounding.
    """
    torch.manual_seed(0)
    reference = PCL(backbone_spec("resnet8_tiny", 10), 10, PCL.Options()).train()
    torch.manual_seed(0)
    fused = convert_sync_batchnorm(PCL(backbone_spec("resnet8_tiny", 10), 10, PCL.Options(fused_views=True))).train()
    trunk_norms = [m for m in fused.net.peers.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert trunk_norms and all(type(m) is ViewSyncBatchNorm for m in trunk_norms)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    views, labels = random_batch(3, batch=6)
    ref_loss, _ = reference.training_loss(views, labels, 10)
    fused_loss, _ = fused.training_loss(views, labels, 10)
    assert fused_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_state, fused_state = reference.state_dict(), fused.state_dict()
    assert ref_state.keys() == fused_state.keys()
    for key in ref_state:
        assert torch.allclose(ref_state[key].float(), fused_state[key].float(), atol=1e-5), key
    assert int(fused_state["net.peers.trunk.1.num_batches_tracked"]) == 3  # one update per view
