"""PCL's loss (docs/methods.md §9) against an independent few-line formula, and its gradient paths."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import softmax_kl

from okd.methods.pcl import PCL
from okd.models import backbone_spec


def make_pcl(num_peers=3, classes=5, **kw):
    torch.manual_seed(0)
    opts = PCL.Options(num_peers=num_peers, **kw)
    return PCL(backbone_spec("resnet8_tiny", classes), classes, opts)



def independent_loss(method, views, labels, epoch, R=80, T=3.0):
    """Re-derive L from the networks' raw outputs (docs/methods.md §9): the sum of its four terms."""
    return sum(independent_terms(method, views, labels, epoch, R, T).values())


def perturbed_batch(method):
    """Six images in three views and labels, with the temporal mean moved off the peers (so the mean teachers
    differ from them), and the method's state to restore after a pass that moved its BN statistics."""
    torch.manual_seed(1)
    views = [torch.randn(6, 3, 32, 32) for _ in range(3)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        for p in method.mean.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return views, labels, {k: v.clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("epoch", [0, 40, 80])
def test_loss_matches_independent_formula(epoch):
    method = make_pcl().train()
    views, labels, state = perturbed_batch(method)
    loss, terms = method.training_loss(views, labels, epoch)
    method.load_state_dict(state)  # undo BN running-stat updates before the second pass
    expected = independent_loss(method, views, labels, epoch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(terms) == {"ce_ensemble", "ce_peers", "kd_ensemble", "kd_mean"}
    # the logged terms are weighted: they add up to the loss, and the KD weight is the ramp-up's
    recombined = terms["ce_ensemble"] + terms["ce_peers"] + terms["kd_ensemble"] + terms["kd_mean"]
    assert loss.item() == pytest.approx(recombined.item(), rel=1e-6)
    assert method.options.kd_scale(epoch) == pytest.approx(math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2), rel=1e-12)


def test_two_peers_and_temperature_option():
    method = make_pcl(num_peers=2, temperature=2.0, rampup_epochs=10).train()
    assert method.num_views == 2
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3])
    state = {k: v.clone() for k, v in method.state_dict().items()}
    loss, _ = method.training_loss(views, labels, 3)
    method.load_state_dict(state)
    assert loss.item() == pytest.approx(independent_loss(method, views, labels, 3, R=10, T=2.0).item(), rel=1e-5)


def test_ensemble_classifier_gets_gradient_only_from_its_ce():
    method = make_pcl().train()
    views = [torch.randn(5, 3, 32, 32) for _ in range(3)]
    labels = torch.tensor([0, 1, 2, 3, 4])
    state = {k: v.clone() for k, v in method.state_dict().items()}
    loss, _ = method.training_loss(views, labels, 80)  # full KD weight
    loss.backward()
    grad_full = method.net.ensemble_fc.weight.grad.clone()
    method.zero_grad()
    method.load_state_dict(state)
    feats, _ = method.net.peers.forward_views(views)
    F.cross_entropy(method.net.ensemble_fc(torch.cat(feats, 1)), labels).backward()
    assert torch.allclose(grad_full, method.net.ensemble_fc.weight.grad, atol=1e-6)


def test_temporal_mean_receives_no_gradient_and_is_not_trained():
    method = make_pcl().train()
    views = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    loss, _ = method.training_loss(views, torch.tensor([0, 1, 2, 3]), 80)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.mean.parameters())
    trainable = {id(p) for g in method.parameter_groups() for p in g["params"]}
    assert not any(id(p) in trainable for p in method.mean.parameters())
    assert trainable == {id(p) for p in method.net.parameters()}


def test_peer_features_are_not_detached_for_ensemble_ce():
    method = make_pcl().train()
    views = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    labels = torch.tensor([0, 1, 2, 3])
    feats, _ = method.net.peers.forward_views(views)
    F.cross_entropy(method.net.ensemble_fc(torch.cat(feats, 1)), labels).backward()
    assert method.net.peers.trunk[0].weight.grad.abs().sum() > 0
    assert all(b.body[0][0].conv1.weight.grad.abs().sum() > 0 for b in method.net.peers.branches)


def test_after_step_updates_temporal_mean():
    method = make_pcl()
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(1.0)
    method.after_step(0)  # alpha_0 = 0: copy
    for p, q in zip(method.net.parameters(), method.mean.parameters()):
        assert torch.equal(p, q)


def test_temporal_mean_batchnorm_statistics_are_its_own():
    """EMA runs in train mode on view l through trunk + branch l: its BN stats follow its own weights."""
    method = make_pcl().train()
    with torch.no_grad():
        for p in method.mean.parameters():
            p.mul_(1.5)
    views = [torch.randn(4, 3, 32, 32) + v for v in range(3)]
    method.training_loss(views, torch.tensor([0, 1, 2, 3]), 0)
    stem_conv = method.mean.module.peers.trunk[0]
    bn = method.mean.module.peers.trunk[1]
    expected = torch.zeros(bn.num_features)
    with torch.no_grad():
        for v in views:  # three sequential momentum-0.1 updates, one per view
            expected = 0.9 * expected + 0.1 * F.conv2d(v, stem_conv.weight, padding=1).mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    assert bn.num_batches_tracked.item() == 3
    student_bn = method.net.peers.trunk[1]
    assert not torch.allclose(student_bn.running_mean, bn.running_mean)


def test_evaluate_logits_and_summary():
    method = make_pcl().eval()
    out = method.evaluate_logits(torch.randn(3, 3, 32, 32))
    assert set(out) == {"peer1", "peer2", "peer3", "ensemble", "mean_peer1", "mean_peer2", "mean_peer3",
                        "mean_ensemble"}
    summary = method.summary_metrics({"mean_peer1": 70.0, "mean_peer2": 75.0, "mean_peer3": 72.0})
    assert [s.key for s in summary] == ["reported", "best_mean_peer"]
    assert summary[0].value == 70.0 and "paper" in summary[0].label
    assert summary[1].value == 75.0 and "seed" in summary[1].label


# ---------------------------------------------------------------- the component ablation

def independent_terms(method, views, labels, epoch, R=80, T=3.0):
    """The four weighted terms of docs/methods.md §9 from the networks' raw outputs (peer j on views[j])."""
    m = len(views)
    peers, mean_peers = method.net.peers, method.mean.module.peers
    outs = [peers.branches[j](peers.trunk(views[j])) for j in range(m)]
    feats, logits = [o[0] for o in outs], [o[1] for o in outs]
    z_e = method.net.ensemble_fc(torch.cat(feats, 1))
    with torch.no_grad():
        z_mean = [mean_peers.branches[l](mean_peers.trunk(views[l]))[1] for l in range(m)]
    w = math.exp(-5 * (1 - min(epoch, R) / R) ** 2)
    return {"ce_ensemble": F.cross_entropy(z_e, labels),
            "ce_peers": sum(F.cross_entropy(z, labels) for z in logits),
            "kd_ensemble": w * sum(softmax_kl(z, z_e.detach(), T) for z in logits),
            "kd_mean": w / (m - 1) * sum(softmax_kl(logits[j], z_mean[l], T)
                                         for j in range(m) for l in range(m) if l != j)}


@pytest.mark.parametrize("switch,removed", [("ensemble_teacher", {"ce_ensemble", "kd_ensemble"}),
                                            ("mean_teacher", {"kd_mean"}), ("peer_views", set())])
def test_each_ablation_switch_removes_exactly_its_terms(switch, removed):
    """The ablated method's terms are the full formula's minus exactly the switched-off component's; every
    remaining term keeps its value (peer_views: the full formula with the one view given to every peer)."""
    method = make_pcl(**{switch: False}).train()
    views, labels, state = perturbed_batch(method)
    given = views[:1] if switch == "peer_views" else views
    assert method.num_views == len(given)
    _, terms = method.training_loss(given, labels, 40)
    method.load_state_dict(state)
    seen = views[:1] * 3 if switch == "peer_views" else views
    expected = independent_terms(method, seen, labels, 40)
    assert set(terms) == set(expected) - removed
    for name, value in terms.items():
        # abs: a KL between near-equal distributions carries the rounding of its sums (about 1e-6 here)
        assert float(value.detach()) == pytest.approx(float(expected[name].detach()), rel=1e-5, abs=2e-6), name


def test_without_the_ensemble_teacher_its_classifier_is_untouched_and_not_evaluated():
    method = make_pcl(ensemble_teacher=False).train()
    views = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    loss, _ = method.training_loss(views, torch.tensor([0, 1, 2, 3]), 80)
    loss.backward()
    assert method.net.ensemble_fc.weight.grad is None
    assert method.net.peers.trunk[0].weight.grad.abs().sum() > 0
    names = set(method.eval().evaluate_logits(torch.randn(2, 3, 32, 32)))
    assert names == {"peer1", "peer2", "peer3", "mean_peer1", "mean_peer2", "mean_peer3"}


def test_the_ablation_configs_switch_one_component_each():
    from pathlib import Path

    from okd.config import load_config

    folder = Path(__file__).resolve().parents[1] / "configs" / "ablations"
    switches = ("ensemble_teacher", "mean_teacher", "peer_views")
    off = {p.stem: {s for s in switches if not getattr(load_config(str(p)).method, s)}
           for p in folder.glob("pcl_*.yml")}
    assert off == {"pcl_no_ensemble_teacher": {"ensemble_teacher"}, "pcl_no_mean_teacher": {"mean_teacher"},
                   "pcl_shared_view": {"peer_views"}, "pcl_baseline_peers": set(switches)}
