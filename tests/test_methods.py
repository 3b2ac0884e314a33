"""The seven comparison methods (docs/methods.md §3-8): golden loss values, the full
loss re-derived from the networks' raw outputs with formulas written out here,
and the gradient paths each method depends on."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import softmax_kl

from okd.errors import ConfigError
from okd.losses import kd_to_others_mean
from okd.methods import METHODS, build_method
from okd.methods.dml import dml_kd
from okd.methods.ffl import ffl_kd
from okd.methods.kdcl import minlogit_teacher
from okd.methods.okddip import PeerAttention, peer_targets
from okd.methods.one import gated_ensemble
from okd.models import backbone_spec

CLASSES = 5



def rampup(epoch, R):
    return 1.0 if R == 0 else math.exp(-5 * (1 - min(epoch, R) / R) ** 2)


def make(name, backbone="resnet8_tiny", **options):
    torch.manual_seed(0)
    cls = METHODS.get(name)
    return build_method(name, backbone_spec(backbone, CLASSES), CLASSES, cls.Options(**options)).train()


def batch(n_views=1, B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(n_views)]
    return views, torch.randint(0, CLASSES, (B,), generator=g)


FIXED = [torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]]),
         torch.tensor([[1.0, 1.5, 0.0], [-0.5, 0.2, 2.0]]),
         torch.tensor([[0.3, -0.2, 0.8], [1.2, 0.0, -1.0]])]


# ---------------------------------------------------------------- golden values of the loss pieces

def test_dml_pairwise_and_mean_targets():
    z = FIXED
    pairwise = sum(softmax_kl(z[k], z[l], 3.0) for k in range(3) for l in range(3) if l != k) / 2
    assert dml_kd(z, 3.0).item() == pytest.approx(pairwise.item(), abs=1e-6)
    mean_target = sum(softmax_kl(z[k], (z[(k + 1) % 3] + z[(k + 2) % 3]) / 2, 1.0) for k in range(3))
    assert dml_kd(z, 1.0, "others_mean").item() == pytest.approx(mean_target.item(), abs=1e-6)


def test_dml_two_networks_hand_value():
    # T=1, m=2: KL(p2||p1) + KL(p1||p2) with p1 = [3/4, 1/4], p2 = [1/2, 1/2]
    z1, z2 = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    expected = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert dml_kd([z1, z2], 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_cl_targets_are_the_other_heads_mean():
    z = FIXED
    expected = sum(softmax_kl(z[h], (z[(h + 1) % 3] + z[(h + 2) % 3]) / 2, 2.0) for h in range(3))
    assert kd_to_others_mean(z, 2.0, True).item() == pytest.approx(expected.item(), abs=1e-6)


def test_one_gated_ensemble_hand_value():
    gate = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    z = FIXED
    expected = torch.tensor([[0.5 * 2.0 + 0.25 * 1.0 + 0.25 * 0.3, 0.25 + 0.375 - 0.05, -0.5 + 0.0 + 0.2],
                             [-0.5, 0.2, 2.0]])
    assert torch.allclose(gated_ensemble(gate, z), expected, atol=1e-6)


def test_ffl_terms():
    z, fused = FIXED[:2], FIXED[2]
    to_branches, to_fused = ffl_kd(z, fused, 3.0)
    assert to_branches.item() == pytest.approx((softmax_kl(z[0], fused, 3.0) + softmax_kl(z[1], fused, 3.0)).item(), abs=1e-6)
    assert to_fused.item() == pytest.approx(softmax_kl(fused, (z[0] + z[1]) / 2, 3.0).item(), abs=1e-6)


def test_okddip_attention_hand_value():
    att = PeerAttention(dim=8)  # d/8 = 1: scalar query and key
    with torch.no_grad():
        att.query.weight.copy_(torch.tensor([[1.0] + [0.0] * 7]))
        att.key.weight.copy_(torch.tensor([[0.0, 1.0] + [0.0] * 6]))
    h = torch.zeros(1, 2, 8)
    h[0, 0, 0], h[0, 0, 1] = 1.0, math.log(3.0)  # q_1 = 1, k_1 = ln 3
    h[0, 1, 0], h[0, 1, 1] = 2.0, 0.0  # q_2 = 2, k_2 = 0
    alpha = att(h)
    # row a: softmax_b(q_a k_b): [ln 3, 0] -> [3/4, 1/4]; [2 ln 3, 0] -> [9/10, 1/10]
    assert torch.allclose(alpha, torch.tensor([[[0.75, 0.25], [0.9, 0.1]]]), atol=1e-6)
    z1, z2 = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 8.0]])
    t = peer_targets(alpha, [z1, z2])
    assert torch.allclose(t, torch.tensor([[[3.0, 2.0], [3.6, 0.8]]]), atol=1e-5)


def test_kdcl_minlogit_hand_value():
    z1 = torch.tensor([[2.0, 1.0, -1.0]])
    z2 = torch.tensor([[3.0, 4.0, 0.0]])
    # label 0: z1 - 2 = [0, -1, -3]; z2 - 3 = [0, 1, -3]; element-wise min = [0, -1, -3]
    teacher = minlogit_teacher([z1, z2], torch.tensor([0]))
    assert teacher.tolist() == [[0.0, -1.0, -3.0]]


def test_kdcl_minlogit_zero_at_true_class_and_min_elsewhere():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(8, 6, generator=g) for _ in range(3)]
    labels = torch.randint(0, 6, (8,), generator=g)
    t = minlogit_teacher(logits, labels)
    for i in range(8):
        y = int(labels[i])
        assert t[i, y] == 0
        for c in range(6):
            if c != y:
                assert t[i, c] == min(float(z[i, c] - z[i, y]) for z in logits)


# ---------------------------------------------------------------- the whole loss, re-derived

def conv_bn_relu(x, conv, bn, groups=1):
    y = F.conv2d(x, conv.weight, None, padding=conv.padding, groups=groups)
    return F.relu(F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))


@pytest.mark.parametrize("epoch", [0, 40])
def test_vanilla_dml_kdcl_losses(epoch):
    views, y = batch(3)
    m = make("vanilla")
    assert m.training_loss(views[:1], y, epoch)[0].item() == pytest.approx(
        F.cross_entropy(m.net.branch(m.net.trunk(views[0]))[1], y).item(), abs=1e-5)

    m = make("dml", temperature=2.0, rampup_epochs=80)
    z = [net.branch(net.trunk(views[0]))[1] for net in m.nets.nets]
    expected = sum(F.cross_entropy(zk, y) for zk in z) + rampup(epoch, 80) * sum(
        softmax_kl(z[k], z[l], 2.0) for k in range(3) for l in range(3) if l != k) / 2
    assert m.training_loss(views[:1], y, epoch)[0].item() == pytest.approx(expected.item(), abs=1e-5)

    m = make("kdcl", teacher="naive", kd_weight=0.7)
    z = [net.branch(net.trunk(v))[1] for net, v in zip(m.nets.nets, views)]  # one view per network
    teacher = (z[0] + z[1] + z[2]) / 3
    expected = sum(F.cross_entropy(zk, y) + 0.7 * softmax_kl(zk, teacher, 3.0) for zk in z)
    assert m.training_loss(views, y, epoch)[0].item() == pytest.approx(expected.item(), abs=1e-5)

    # OKDPH's KDCL code: (1 - alpha) CE + alpha KD, alpha 0.5, T 4, the mean of all logits; at alpha 0.5 that is
    # half the additive loss at lambda 1, so one learning rate gives half the update
    m = make("kdcl", teacher="naive", kd_weight=0.5, weighting="convex", temperature=4.0)
    z = [net.branch(net.trunk(v))[1] for net, v in zip(m.nets.nets, views)]
    teacher = (z[0] + z[1] + z[2]) / 3
    convex = sum(0.5 * F.cross_entropy(zk, y) + 0.5 * softmax_kl(zk, teacher, 4.0) for zk in z)
    assert m.training_loss(views, y, epoch)[0].item() == pytest.approx(convex.item(), abs=1e-5)
    additive = make("kdcl", teacher="naive", kd_weight=1.0, temperature=4.0).training_loss(views, y, epoch)[0]
    assert additive.item() == pytest.approx(2 * convex.item(), abs=2e-5)
    with pytest.raises(ConfigError, match="'method.kd_weight' must be in \\[0, 1\\] with weighting convex"):
        make("kdcl", weighting="convex", kd_weight=1.5)


@pytest.mark.parametrize("form", ["paper", "okddip"])
def test_cl_loss(form):
    views, y = batch()
    m = make("cl", form=form)
    shared = m.net.trunk(views[0])
    z = [b(shared)[1] for b in m.net.branches]
    kd = lambda T: sum(softmax_kl(z[h], (z[(h + 1) % 3] + z[(h + 2) % 3]) / 2, T) for h in range(3))
    ce = sum(F.cross_entropy(zh, y) for zh in z)
    if form == "paper":  # beta = 0.5, T = 2, no ramp-up
        expected = 0.5 * ce + 0.5 * kd(2.0)
    else:  # weights 1 and 1, T = 3, 80-epoch ramp-up
        expected = ce + rampup(20, 80) * kd(3.0)
    assert m.training_loss(views, y, 20)[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_one_loss():
    views, y = batch()
    m = make("one")
    shared = m.net.trunk(views[0])
    z = [b(shared)[1] for b in m.net.branches]
    g = m.gate
    a = F.linear(shared.mean((2, 3)), g.fc.weight, g.fc.bias)
    a = F.batch_norm(a, None, None, g.bn.weight, g.bn.bias, training=True, eps=g.bn.eps)
    gate = torch.softmax(torch.relu(a), 1)
    z_e = sum(gate[:, j:j + 1] * z[j] for j in range(3))
    expected = sum(F.cross_entropy(zj, y) for zj in z) + F.cross_entropy(z_e, y) + rampup(30, 80) * sum(
        softmax_kl(zj, z_e, 3.0) for zj in z)
    assert m.training_loss(views, y, 30)[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_ffl_loss():
    views, y = batch()
    m = make("ffl")
    shared = m.net.trunk(views[0])
    maps = [b.body[0](shared) for b in m.net.branches]  # resnet: stage 3 is the map
    z = [b.fc(mp.mean((2, 3))) for b, mp in zip(m.net.branches, maps)]
    f = m.fusion
    x = torch.cat(maps, 1)
    x = conv_bn_relu(x, f.depthwise, f.bn1, groups=x.shape[1])
    x = conv_bn_relu(x, f.pointwise, f.bn2)
    z_f = F.linear(x.mean((2, 3)), f.fc.weight, f.fc.bias)
    z_bar = (z[0] + z[1] + z[2]) / 3
    expected = sum(F.cross_entropy(zj, y) for zj in z) + F.cross_entropy(z_f, y) + rampup(50, 80) * (
        sum(softmax_kl(zj, z_f, 3.0) for zj in z) + softmax_kl(z_f, z_bar, 3.0))
    assert m.training_loss(views, y, 50)[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_okddip_loss():
    views, y = batch()
    m = make("okddip", kd_weight=0.5)
    shared = m.net.trunk(views[0])
    maps = [b.body[0](shared) for b in m.net.branches]
    z = [b.fc(mp.mean((2, 3))) for b, mp in zip(m.net.branches, maps)]
    peers, leader = z[:2], z[2]
    h = [mp.mean((2, 3)) for mp in maps[:2]]
    q = [hh @ m.attention.query.weight.t() for hh in h]
    k = [hh @ m.attention.key.weight.t() for hh in h]
    expected = sum(F.cross_entropy(zz, y) for zz in z)
    kd = softmax_kl(leader, (peers[0] + peers[1]) / 2, 3.0)
    for a in range(2):
        energy = torch.stack([(q[a] * k[b]).sum(1) for b in range(2)], 1)  # (B, 2)
        alpha = torch.softmax(energy, 1)
        t_a = alpha[:, :1] * peers[0] + alpha[:, 1:] * peers[1]
        kd = kd + softmax_kl(peers[a], t_a, 3.0)
    expected = expected + 0.5 * rampup(60, 80) * kd
    assert m.training_loss(views, y, 60)[0].item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------------------------------------------------------- gradient paths

def grads(module, loss):
    params = [p for p in module.parameters()]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_cl_trunk_gradient_is_the_mean_of_the_heads_gradients():
    views, y = batch()
    m = make("cl")
    loss, _ = m.training_loss(views, y, 0)
    rescaled = grads(m.net.trunk, loss)
    # per-head losses through an un-rescaled trunk: 0.5 CE_h + 0.5 KD_2(z_h <- sg(mean of the others))
    shared = m.net.trunk(views[0])
    z = [b(shared)[1] for b in m.net.branches]
    per_head = []
    for h in range(3):
        others = ((z[(h + 1) % 3] + z[(h + 2) % 3]) / 2).detach()
        per_head.append(grads(m.net.trunk, 0.5 * F.cross_entropy(z[h], y) + 0.5 * softmax_kl(z[h], others, 2.0)))
    for i, g in enumerate(rescaled):
        mean = sum(ph[i] for ph in per_head) / 3
        assert torch.allclose(g, mean, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in rescaled)


def test_cl_without_rescaling_gets_the_sum():
    views, y = batch()
    m1, m2 = make("cl"), make("cl", grad_rescale=False)
    g1 = grads(m1.net.trunk, m1.training_loss(views, y, 0)[0])
    g2 = grads(m2.net.trunk, m2.training_loss(views, y, 0)[0])
    for a, b in zip(g1, g2):
        assert torch.allclose(3 * a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name,teacher", [("one", "gate"), ("pcl", "net.ensemble_fc")])
def test_teacher_gets_no_gradient_from_kd_terms(name, teacher):
    """The teacher's gradient is the same whether KD weighs e^-5 (epoch 0) or 1 (epoch 80)."""
    views, y = batch(3)
    m = make(name)
    module = m.get_submodule(teacher)
    low, high = m.training_loss(views, y, 0)[0], m.training_loss(views, y, 80)[0]
    for a, b in zip(grads(module, low), grads(module, high)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    # while the students' gradients do change with the KD weight
    branch = m.get_submodule("net.peers.branches.0" if name == "pcl" else "net.branches.0")
    assert not all(torch.allclose(a, b) for a, b in zip(grads(branch, low), grads(branch, high)))


def test_ffl_targets_are_detached_both_ways():
    views, y = batch()
    m = make("ffl")
    logits, fused = m.forward_logits(views[0])
    to_branches, to_fused = ffl_kd(logits, fused, 3.0)
    # fused -> branches trains only the branches; branch mean -> fused trains only the fusion module
    assert all(g is None for g in grads(m.fusion, to_branches))
    assert all(g is not None for g in grads(m.fusion, to_fused)[:1])
    # the branch classifiers only produce the (detached) target; their maps feed z_f and do get gradient
    assert all(g is None for b in m.net.branches for g in grads(b.fc, to_fused))


def test_ffl_fusion_has_its_own_weight_decay():
    m = make("ffl", fusion_weight_decay=2e-5)
    groups = m.parameter_groups()
    assert groups[1]["weight_decay"] == 2e-5 and "weight_decay" not in groups[0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.fusion.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(m.parameters()))


def test_pcl_temporal_mean_gets_no_gradient():
    views, y = batch(3)
    m = make("pcl")
    m.training_loss(views, y, 80)[0].backward()
    assert all(p.grad is None for p in m.mean.parameters())
    assert not any(p.requires_grad for p in m.mean.parameters())


def test_okddip_attention_is_trained_through_the_peer_targets():
    views, y = batch()
    m = make("okddip")
    at_one = grads(m.attention, m.training_loss(views, y, 80)[0])
    assert all(g is not None and g.abs().sum() > 0 for g in at_one)
    # the attention's gradient comes only from KD: it scales with the KD weight
    m0 = make("okddip", kd_weight=0.0)
    assert all(g is None or g.abs().sum() == 0 for g in grads(m0.attention, m0.training_loss(views, y, 80)[0]))
    m2 = make("okddip", kd_weight=2.0)
    for g1, g2 in zip(at_one, grads(m2.attention, m2.training_loss(views, y, 80)[0])):
        assert torch.allclose(2 * g1, g2, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("name", ["dml", "kdcl"])
def test_independent_networks_share_nothing(name):
    m = make(name)
    storages = [{p.data_ptr() for p in net.parameters()} for net in m.nets.nets]
    assert all(not (storages[i] & storages[j]) for i in range(3) for j in range(i + 1, 3))
    # network 1's own terms give no gradient to network 2 (teachers are detached)
    views, y = batch(3)
    z = m.nets.forward_views(views if name == "kdcl" else views[:1] * 3)
    term = F.cross_entropy(z[0], y) + softmax_kl(z[0], z[1].detach(), 3.0)
    assert all(g is None for g in grads(m.nets.nets[1], term))


def test_kdcl_networks_see_their_own_views():
    views, y = batch(3)
    m = make("kdcl")
    assert m.num_views == 3
    z = m.nets.forward_views(views)
    assert torch.allclose(z[1], m.nets.nets[1](views[1]))
    assert not torch.allclose(z[1], m.nets.nets[1](views[0]))


# ---------------------------------------------------------------- reported model

@pytest.mark.parametrize("name,reported_key", [
    ("vanilla", "net"), ("dml", "net1"), ("kdcl", "net1"), ("cl", "branch1"), ("one", "branch1"),
    ("ffl", "branch1"), ("okddip", "leader"), ("pcl", "mean_peer1")])
def test_reported_model_and_deployable_weights(name, reported_key):
    from okd import create_model

    m = make(name).eval()
    x = torch.randn(3, 3, 32, 32)
    out = m.evaluate_logits(x)
    acc = {k: float(i) for i, k in enumerate(out)}
    summaries = m.summary_metrics(acc)
    assert summaries[0].key == "reported" and summaries[0].value == acc[reported_key]
    assert "reported" in summaries[0].label or "paper protocol" in summaries[0].label
    net = create_model("resnet8_tiny", CLASSES).eval()
    net.load_state_dict(m.deployable_state_dict())
    assert torch.allclose(net(x), out[reported_key], atol=1e-5)
