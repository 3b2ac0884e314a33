"""The methods after PCL (MCL, SwitOKD, OKDPH, AHBF): golden values, gradient paths, schedules and shapes.

Hand values come from the formulas of docs/methods.md §13-16 worked by hand (or, for AHBF's parameter
counts, from running the authors' model definitions), not from okd's own output.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from okd.config import load_config
from okd.errors import ConfigError
from okd.losses import kd_loss, logit_mean
from okd.methods import METHODS, build_method
from okd.methods.ahbf import AHBF, FusionModule, ahbf_kd
from okd.methods.mcl import mcl_terms, sup_contrastive
from okd.methods.okdph import combine, dirichlet_ones, fuse_
from okd.methods.switokd import distribution_gaps, expert_mode, switch_threshold
from okd.models import backbone_spec
from okd.optim import Optimization

CLASSES = 10


def count(module):
    return sum(p.numel() for p in module.parameters())


def make(name, backbone="resnet8_tiny", classes=CLASSES, **options):
    torch.manual_seed(0)
    return build_method(name, backbone_spec(backbone, classes), classes, METHODS.get(name).Options(**options)).train()


def grads(module, loss):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


# ---------------------------------------------------------------- SwitOKD

# (s_gap, t_gap, G) -> expected mode; 1: expert (teacher paused). Worked by hand from
# delta = s - exp(-t/(t+s)) t and "expert iff G > delta and t < s".
SEQUENCE = [
    ((1.8, 1.0, 0.50), 0.0),  # delta 1.100327: G <= delta
    ((1.6, 0.6, 1.20), 1.0),  # delta 1.143220
    ((1.0, 1.2, 1.50), 0.0),  # G > delta 0.304506, but the teacher is not ahead (t >= s)
    ((1.2, 0.4, 0.95), 1.0),  # delta 0.888480
    ((1.2, 0.4, 0.88), 0.0),  # straight back: no hysteresis
    ((0.9, 0.9, 1.90), 0.0),  # t == s: the guard is strict
]


def test_switokd_threshold_and_switching_on_a_constructed_sequence():
    for (s, t, g), mode in SEQUENCE:
        s_, t_, g_ = (torch.tensor(v, dtype=torch.float64) for v in (s, t, g))
        assert float(switch_threshold(s_, t_)) == pytest.approx(s - math.exp(-t / (t + s)) * t, abs=1e-12)
        assert float(expert_mode(s_, t_, g_)) == mode, (s, t, g)
    # G equal to delta stays in learning mode (strict >); the paper's form without the guard pauses on G > delta alone
    s_, t_ = torch.tensor(1.2, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    assert float(expert_mode(s_, t_, switch_threshold(s_, t_))) == 0.0
    assert float(expert_mode(torch.tensor(1.0), torch.tensor(1.2), torch.tensor(1.5), teacher_ahead=False)) == 1.0


def test_switokd_gaps_and_losses_hand_values():
    """C = 3, T = 1: values worked by hand (batch means)."""
    z_t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    z_s = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1])
    s, t, g = distribution_gaps(z_t, z_s, y)
    assert (float(s), float(t), float(g)) == pytest.approx((1.471174, 0.191542, 1.279632), abs=2e-6)
    assert float(switch_threshold(s, t)) == pytest.approx(1.300474, abs=2e-6)
    assert float(expert_mode(s, t, g)) == 0.0
    assert float(kd_loss(z_s, z_t, 1.0)) == pytest.approx(1.094614, abs=2e-6)  # KL(p_t || p_s)
    assert float(kd_loss(z_t, z_s, 1.0)) == pytest.approx(1.363555, abs=2e-6)
    assert float(F.cross_entropy(z_s, y)) == pytest.approx(1.550770, abs=2e-6)
    s, t, g = distribution_gaps(torch.tensor([[3.0, 3.0, -3.0]]), torch.tensor([[-3.0, -3.0, 3.0]]), torch.tensor([0]))
    assert float(expert_mode(s, t, g)) == 1.0  # G 1.987658 > delta 1.278240


def softmax_rows(rows, t):
    out = []
    for row in rows:
        e = [math.exp(v / t) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def l1_mean(p, q):
    return sum(sum(abs(a - b) for a, b in zip(r, s)) for r, s in zip(p, q)) / len(p)


def kl_mean(p, q):  # KL(p || q), batch mean
    return sum(sum(a * math.log(a / b) for a, b in zip(r, s)) for r, s in zip(p, q)) / len(p)


@pytest.mark.parametrize("form", ["code", "scaled"])
def test_switokd_temperature_forms_at_t3_by_hand(form):
    """T = 3 with plain-Python softmaxes: ``code`` is the authors' dist_s_label (no T), dist_s_t(., ., T) and
    kl_div(., ., T) (no T^2); ``scaled`` puts T in every gap and T^2 on the KL terms."""
    from okd.methods.switokd import switokd_kd

    T = 3.0
    t_rows, s_rows, y = [[4.0, 0.0, 0.0], [0.0, 3.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], [0, 1]
    onehot = [[1.0 if j == c else 0.0 for j in range(3)] for c in y]
    label_t = 1.0 if form == "code" else T
    s_hand = l1_mean(softmax_rows(s_rows, label_t), onehot)
    t_hand = l1_mean(softmax_rows(t_rows, label_t), onehot)
    g_hand = l1_mean(softmax_rows(t_rows, T), softmax_rows(s_rows, T))
    kd_hand = kl_mean(softmax_rows(t_rows, T), softmax_rows(s_rows, T)) * (T * T if form == "scaled" else 1.0)
    z_t, z_s, labels = torch.tensor(t_rows), torch.tensor(s_rows), torch.tensor(y)
    gaps = distribution_gaps(z_t, z_s, labels, T, form)
    assert [float(v) for v in gaps] == pytest.approx([s_hand, t_hand, g_hand], abs=2e-6)
    assert float(switokd_kd(z_s, z_t, T, form)) == pytest.approx(kd_hand, rel=2e-6)
    if form == "code":  # at T = 1 the gaps are the T = 1 values above whatever T, G only softens
        assert (float(gaps[0]), float(gaps[1])) == pytest.approx((1.471174, 0.191542), abs=2e-6)
    method = make("switokd", temperature=T, temperature_form=form)
    x, yy = torch.randn(4, 3, 32, 32), torch.randint(0, CLASSES, (4,))
    _, terms = method.training_loss([x], yy, epoch=0)
    z_t, z_s = method.teacher(x), method.student(x)  # train mode: the same batch statistics, same logits
    p_t, p_s = softmax_rows(z_t.tolist(), T), softmax_rows(z_s.tolist(), T)
    assert float(terms["kd_student"].detach()) == pytest.approx(kl_mean(p_t, p_s) * (T * T if form == "scaled" else 1.0),
                                                       rel=1e-4)
    with pytest.raises(ConfigError, match="method.temperature_form' must be code or scaled"):
        make("switokd", temperature_form="paper")


def switokd_step(method, cfg, x, y):
    opt = Optimization.build(cfg, method, torch.device("cpu"))
    loss, terms = method.training_loss([x], y, epoch=0)
    opt.optimizer.zero_grad()
    loss.backward()
    opt.step(torch.zeros(()))
    return opt, terms


def test_switokd_expert_mode_leaves_the_teacher_exactly_and_learning_mode_trains_both(monkeypatch):
    cfg = load_config(None, ["method.name=switokd", "model.name=resnet8_tiny", "device=cpu"])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, CLASSES, (8,))
    method = make("switokd")
    opt = Optimization.build(cfg, method, torch.device("cpu"))
    assert [float(g["lr"]) for g in opt.optimizer.param_groups] == pytest.approx([0.1, 0.01])  # student 0.1 x optim.lr
    # learning mode first (a step gives the momentum buffers values), then a forced expert step
    for mode in (0.0, 1.0):
        monkeypatch.setattr("okd.methods.switokd.expert_mode", lambda *a, mode=mode: torch.tensor(mode))
        teacher = [p.detach().clone() for p in method.teacher.parameters()]
        momentum = [opt.optimizer.state[p]["momentum_buffer"].clone() for p in method.teacher.parameters()]
        student = [p.detach().clone() for p in method.student.parameters()]
        bn = next(m for m in method.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
        running = bn.running_mean.clone()
        loss, terms = method.training_loss([x], y, epoch=0)
        opt.optimizer.zero_grad()
        loss.backward()
        opt.step(torch.zeros(()))
        method.after_step(torch.tensor(0))
        same = all(torch.equal(a, b) for a, b in zip(teacher, method.teacher.parameters()))
        kept = all(torch.equal(a, opt.optimizer.state[p]["momentum_buffer"])
                   for a, p in zip(momentum, method.teacher.parameters()))
        assert same == kept == (mode == 1.0)
        assert float(terms["ce_teacher"].detach()) == 0.0 if mode else float(terms["ce_teacher"].detach()) > 0
        assert not all(torch.equal(a, b) for a, b in zip(student, method.student.parameters()))  # always trains
        assert not torch.equal(running, bn.running_mean)  # the paused teacher still runs in train mode
    assert method.mode_counts.tolist() == [1.0, 2.0]


def test_switokd_gradient_paths():
    method = make("switokd")
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, CLASSES, (6,))
    _, terms = method.training_loss([x], y, epoch=0)
    assert all(g is None for g in grads(method.teacher, terms["kd_student"]))  # the teacher target is detached
    assert all(g is None for g in grads(method.student, terms["kd_teacher"]))
    assert all(g is None for g in grads(method.student, terms["ce_teacher"]))


def test_switokd_cohort_is_teacher_then_student_and_the_student_is_deployed():
    cfg = load_config(None, ["method.name=switokd", "model.name=[resnet32, resnet8_tiny]"])
    assert cfg.model.names == ["resnet32", "resnet8_tiny"]
    method = build_method("switokd", [backbone_spec(n, CLASSES) for n in cfg.model.names], CLASSES, cfg.method)
    assert count(method.teacher) == 466_906 and method.deployable_backbone == "resnet8_tiny"
    with pytest.raises(ConfigError, match="lists 3 backbones .* trains 2 networks"):
        load_config(None, ["method.name=switokd", "model.name=[resnet32, resnet8_tiny, resnet32]"])


def test_switokd_teacher_block_on_hand_set_weights():
    """The authors' wide_basic: stride on the second conv, biased convs, the 1x1 shortcut on the *raw* input.
    Weights set so the output is worked by hand: the residual path is its conv2 bias, the shortcut w x + b."""
    from okd.models.switokd_wrn import WideBasic

    block = WideBasic(1, 2, stride=2).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.conv2.bias.copy_(torch.tensor([0.25, -1.0]))
        block.shortcut.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        block.shortcut.bias.copy_(torch.tensor([0.5, -0.5]))
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.shortcut.stride == (2, 2)
    x = -torch.arange(1.0, 17.0).view(1, 1, 4, 4)  # all negative: a pre-activated shortcut would read zeros
    out = block(x)
    sub = x[0, 0, ::2, ::2]
    assert torch.equal(out[0, 0], 0.25 + (1.0 * sub + 0.5)) and torch.equal(out[0, 1], -1.0 + (2.0 * sub - 0.5))
    assert torch.equal(x, -torch.arange(1.0, 17.0).view(1, 1, 4, 4))  # the input is not modified in place


def test_switokd_teacher_init_and_final_batchnorm_momentum():
    """conv_init: Xavier-uniform with gain sqrt(2), bound sqrt(2) sqrt(6 / (fan_in + fan_out)), zero bias;
    the final BN's momentum 0.9 puts 0.9 of the batch's mean into its running mean in one step."""
    torch.manual_seed(0)
    net = backbone_spec("switokd_wrn16_2", 100)
    trunk, branch = net.make_trunk(), net.make_branch()
    conv = branch.body[0][1].conv2  # 128 -> 128, 3x3
    bound = math.sqrt(2) * math.sqrt(6 / (9 * 128 + 9 * 128))
    w = conv.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert all(float(m.bias.abs().max()) == 0.0 for m in [*trunk.modules(), *branch.modules()]
               if isinstance(m, torch.nn.Conv2d))
    final_bn = branch.body[1]
    assert final_bn.momentum == 0.9 and branch.body[0][0].bn1.momentum == 0.1
    feature_map = torch.randn(4, 64, 16, 16)
    branch.train()
    with torch.no_grad():
        pre_bn = branch.body[0](feature_map)
        branch(feature_map)
    assert torch.allclose(final_bn.running_mean, 0.9 * pre_bn.mean(dim=(0, 2, 3)), atol=1e-5)


def test_switokd_recipe_trains_the_authors_pair():
    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "methods" / "switokd.yml"), ["device=cpu"])
    method = build_method("switokd", [backbone_spec(n, 100) for n in cfg.model.names], 100, cfg.method)
    assert count(method.teacher) == 704_420 and count(method.student) == 812_836
    assert method.backbones == ["switokd_wrn16_2", "mobilenetv2"] and method.deployable_backbone == "mobilenetv2"


# ---------------------------------------------------------------- OKDPH

def test_okdph_hybrid_weights_and_fusion_hand_example():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(combine([a, b], torch.tensor([0.25, 0.75])), torch.tensor([2.5, -1.0]))
    assert torch.equal(combine([a, b], torch.tensor([0.5, 0.5])), torch.tensor([2.0, 0.0]))
    s1, s2 = a.clone(), b.clone()
    fuse_([s1, s2], 0.5)
    assert torch.equal(s1, torch.tensor([1.5, 1.0])) and torch.equal(s2, torch.tensor([2.5, -1.0]))
    s1, s2 = a.clone(), b.clone()
    fuse_([s1, s2], 1.0)
    assert torch.equal(s1, torch.tensor([2.0, 0.0])) and torch.equal(s2, torch.tensor([2.0, 0.0]))
    s1, s2 = a.clone(), b.clone()
    fuse_([s1, s2], 0.5, torch.tensor(0.0))  # a batch that is not a fusion step: exactly unchanged
    assert torch.equal(s1, a) and torch.equal(s2, b)


def test_okdph_dirichlet_draws_are_convex_and_uniform_on_average():
    torch.manual_seed(0)
    draws = torch.stack([dirichlet_ones(3, "cpu") for _ in range(4000)])
    assert (draws >= 0).all() and torch.allclose(draws.sum(1), torch.ones(4000))
    assert torch.allclose(draws.mean(0), torch.full((3,), 1 / 3), atol=0.02)
    assert float(draws[:, 0].var()) == pytest.approx(2 / 36, abs=0.006)  # Dir(1,1,1): var = (a0-a)a/(a0^2(a0+1))


def test_okdph_kd_to_the_mean_of_students_and_hybrid_hand_value():
    z1, z2, zh = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    teacher = logit_mean([z1, z2, zh])
    assert torch.equal(teacher, torch.tensor([[1.0, 1.0]]))
    p1 = torch.tensor([math.exp(0.25), 1.0]) / (math.exp(0.25) + 1)  # softmax(z1 / 4)
    by_hand = 16 * float((0.5 * torch.log(0.5 / p1)).sum())
    assert float(kd_loss(z1, teacher, 4.0)) == pytest.approx(by_hand, rel=1e-6)
    assert by_hand == pytest.approx(0.1247, abs=1e-4)


@pytest.mark.parametrize("hybrid_grad", [True, False])
def test_okdph_hybrid_ce_trains_student_i_through_r_i(monkeypatch, hybrid_grad):
    method = make("okdph", hybrid_grad=hybrid_grad)
    with torch.no_grad():  # students that differ (they start equal)
        for p in method.nets.nets[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = torch.tensor([0.25, 0.75])
    monkeypatch.setattr(method, "coefficients", lambda: r)
    views, y = [torch.randn(6, 3, 32, 32) for _ in range(3)], torch.randint(0, CLASSES, (6,))
    _, terms = method.training_loss(views, y, epoch=0)
    if not hybrid_grad:  # the code's copy: the HWM's CE is a constant for the students
        assert not terms["ce_hybrid"].requires_grad
        return
    got = [grads(net, terms["ce_hybrid"]) for net in method.nets.nets]
    # an independent network holding theta_h = 0.25 theta_1 + 0.75 theta_2
    import okd

    ref = okd.create_model("resnet8_tiny", CLASSES).train()
    ref.load_state_dict(method.hybrid_state(r, detach=True))
    direct = torch.autograd.grad((1 - 0.8) * F.cross_entropy(ref(views[2]), y), list(ref.parameters()))
    for i, ri in enumerate(r.tolist()):
        for g, d in zip(got[i], direct):
            assert torch.allclose(g, ri * d, atol=1e-6, rtol=1e-4)


def test_okdph_students_start_equal_and_fusion_shrinks_their_spread():
    method = make("okdph", gamma=0.25)
    a, b = method.nets.nets
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
    spread = [(q - p).clone() for p, q in zip(a.parameters(), b.parameters())]
    method.after_epoch(1)  # fusion_every 1: every epoch
    for before, p, q in zip(spread, a.parameters(), b.parameters()):
        assert torch.allclose(q - p, 0.75 * before, atol=1e-5)
    batch = make("okdph", fusion_unit="batch", fusion_every=5)
    with torch.no_grad():
        for p in batch.nets.nets[1].parameters():
            p.add_(1.0)
    state = [p.clone() for p in batch.nets.nets[1].parameters()]
    batch.after_step(torch.tensor(3))  # not a multiple of 5: nothing
    assert all(torch.equal(s, p) for s, p in zip(state, batch.nets.nets[1].parameters()))
    batch.after_step(torch.tensor(5), torch.tensor(0.0))  # a skipped step: nothing
    assert all(torch.equal(s, p) for s, p in zip(state, batch.nets.nets[1].parameters()))
    batch.after_step(torch.tensor(10))
    assert not all(torch.equal(s, p) for s, p in zip(state, batch.nets.nets[1].parameters()))


def test_okdph_refuses_a_cohort_and_reports_the_code_rule_with_student_one_beside_it():
    with pytest.raises(ConfigError, match="okdph averages its students' weights, which needs identical networks"):
        load_config(None, ["method.name=okdph", "model.name=[resnet32, resnet8_tiny]"])
    method = make("okdph").eval()
    x = torch.randn(3, 3, 32, 32)
    out = method.evaluate_logits(x)
    summaries = method.summary_metrics({"net1": 50.0, "net2": 40.0, "hybrid": 60.0, "ensemble": 55.0})
    assert summaries[0].value == 60.0 and "code's rule" in summaries[0].label
    assert summaries[1].value == 50.0 and "single-network protocol" in summaries[1].label
    import okd

    deployed = okd.create_model("resnet8_tiny", CLASSES).eval()
    deployed.load_state_dict(method.deployable_state_dict())  # the mean model, as reported
    assert torch.allclose(deployed(x), out["hybrid"], atol=1e-6)


# ---------------------------------------------------------------- MCL

def direct_sup_contrastive(S, y, same_instance=False):
    """The loss written out anchor by anchor."""
    rows = []
    for i in range(len(y)):
        others = [k for k in range(len(y)) if k != i or same_instance]
        positives = [k for k in others if y[k] == y[i] and (k != i or same_instance)]
        if not positives:
            continue
        log_den = math.log(sum(math.exp(S[i][k]) for k in others))
        rows.append(-sum(S[i][p] - log_den for p in positives) / len(positives))
    return sum(rows) / len(rows)


def test_mcl_contrastive_distributions_against_a_direct_computation():
    torch.manual_seed(1)
    y = torch.tensor([0, 0, 1, 1, 1, 2])  # anchor 5 has no positive: it is left out
    v = [F.normalize(torch.randn(6, 8), dim=1) for _ in range(3)]
    for a in range(3):
        for b in range(3):
            S = (v[a] @ v[b].t() / 0.1).double()
            for same in (False, True):
                assert float(sup_contrastive(S, y, same)) == pytest.approx(direct_sup_contrastive(S.tolist(), y.tolist(), same),
                                                                          rel=1e-9)
    terms = mcl_terms(v, y, tau=0.1, temperature=3.0)
    S = [[v[a] @ v[b].t() / 0.1 for b in range(3)] for a in range(3)]
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]  # 6 ordered pairs for m = 3
    assert float(terms["vcl"]) == pytest.approx(sum(direct_sup_contrastive(S[a][a].tolist(), y.tolist()) for a in range(3)),
                                                rel=1e-5)
    assert float(terms["icl"]) == pytest.approx(sum(direct_sup_contrastive(S[a][b].tolist(), y.tolist()) for a, b in pairs),
                                                rel=1e-5)

    def kl_rows(student, teacher, T=3.0):
        p_t, p_s = F.softmax(teacher / T, 1), F.softmax(student / T, 1)
        return T * T * float((p_t * (p_t.log() - p_s.log())).sum(1).mean())

    assert float(terms["soft_vcl"]) == pytest.approx(sum(kl_rows(S[a][a], S[b][b]) for a, b in pairs), rel=1e-5)
    assert float(terms["soft_icl"]) == pytest.approx(sum(kl_rows(S[a][b], S[b][a]) for a, b in pairs), rel=1e-5)


def test_mcl_at_random_embeddings_each_contrastive_term_is_near_log_of_the_contrast_set():
    torch.manual_seed(0)
    y = torch.arange(64).repeat(2)  # two images per class: one positive, 126 negatives per anchor
    v = [F.normalize(torch.randn(128, 128), dim=1) for _ in range(2)]
    terms = mcl_terms(v, y, tau=100.0, temperature=3.0)  # tau large: similarities ~ 0
    assert float(terms["vcl"]) / 2 == pytest.approx(math.log(127), rel=1e-3)
    assert float(terms["icl"]) / 2 == pytest.approx(math.log(127), rel=1e-3)


def test_mcl_gradient_paths_heads_train_and_soft_teachers_are_detached():
    method = make("mcl")
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    _, terms = method.training_loss([x], y, epoch=0)
    assert all(g is not None for g in grads(method.heads[0], terms["vcl"]))
    assert all(g is not None for g in grads(method.heads[1], terms["icl"]))  # ICL trains both networks
    outputs = [net.branch(net.trunk(x)) for net in method.nets.nets]
    v = [h(o.feature) for h, o in zip(method.heads, outputs)]
    assert torch.allclose(v[0].norm(dim=1), torch.ones(8), atol=1e-6)
    S11, S22 = v[0] @ v[0].t() / 0.1, v[1] @ v[1].t() / 0.1
    one_way = kd_loss(S11, S22.detach(), 3.0)  # network 1 learns network 2's distribution only
    assert all(g is None for g in grads(method.heads[1], one_way))
    # the heads are training-only: the deployable network is the plain backbone
    import okd

    okd.create_model("resnet8_tiny", CLASSES).load_state_dict(method.deployable_state_dict(), strict=True)


# ---------------------------------------------------------------- AHBF

def test_ahbf_branch_depths_and_exact_parameter_counts_on_resnet32():
    """ResNet-32, CIFAR-100, M = 4, aux 4: stage-3 blocks 5/9/13/17; counts from the authors' definitions."""
    method = make("ahbf", backbone="resnet32", classes=100)
    net = method.net
    assert [len(b.body[0]) for b in net.branches] == [5, 9, 13, 17]
    assert [count(b.body[0]) for b in net.branches] == [353_664, 649_600, 945_536, 1_241_472]
    assert count(net.trunk) == 112_592 and [count(f) for f in net.fusions] == [8_518] * 3
    assert count(method) == 3_354_418
    x = torch.randn(2, 3, 32, 32)
    shared = net.trunk(x)
    assert shared.shape == (2, 32, 16, 16)
    maps = [b.feature_map(shared) for b in net.branches]
    assert all(fm.shape == (2, 64, 8, 8) for fm in maps)
    fused, ta = net.fusions[0](maps[0], maps[1], torch.randn(2, 100), torch.randn(2, 100))
    assert fused.shape == (2, 64, 8, 8) and ta.shape == (2, 100)


def test_ahbf_fusion_modules_take_the_authors_init():
    """The authors' model-wide loop reaches the fusion modules: ResNet's 1x1 conv N(0, 2 / fan_out), fan_out = C
    (std sqrt(2/64) = 0.1768 at 64 channels, PyTorch's default would give ~0.051); VGG also zeroes conv biases
    and draws Linear weights N(0, 0.01); DenseNet's Kaiming is fan-in (2C)."""
    torch.manual_seed(0)
    net = make("ahbf", backbone="resnet32", classes=100).net
    conv = net.fusions[0].conv.weight.detach()
    assert conv.shape == (64, 128, 1, 1)
    assert float(conv.std()) == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert abs(float(conv.mean())) < 0.01
    vgg = make("ahbf", backbone="vgg16", classes=100, num_branches=2, aux_blocks=1).net.fusions[0].requires_grad_(False)
    assert float(vgg.conv.weight.std()) == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    assert torch.equal(vgg.conv.bias, torch.zeros(512)) and torch.equal(vgg.gate.bias, torch.zeros(2))
    assert float(vgg.gate.weight.std()) == pytest.approx(0.01, rel=0.2)
    dense = make("ahbf", backbone="densenet40_12", classes=100, num_branches=2, aux_blocks=1).net.fusions[0]
    dense.requires_grad_(False)
    fan_in = dense.conv.weight.shape[1]
    assert float(dense.conv.weight.std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)


# extra parameters of one more unit of each backbone's last stage(s), by hand at 100 classes:
# WRN-16-2 pre-activation block 128->128: 2 x 2*128 (BN) + 2 x 9*128^2 = 295,424;
# ShuffleNetV2 1x basic unit over 464/2 = 232 channels: 2 x 232^2 + 9*232 + 3 x 2*232 = 111,128;
# MobileNetV2 x0.5 inverted residuals (expand 6): stage 5 (48 ch) 31,488, stage 6 (80) 83,200, stage 7 (160) 320,000
UNIT = {"wrn16_2": 295_424, "shufflenetv2": 111_128}
MOBILE_STAGE_BLOCK = (31_488, 83_200, 320_000)


@pytest.mark.parametrize("name", sorted(UNIT))
def test_ahbf_deeper_branches_on_the_later_backbones(name):
    spec = backbone_spec(name, 100)
    base = count(spec.make_branch())
    assert count(spec.deeper_branch(0, 4)) == base
    assert [count(spec.deeper_branch(i, 2)) - base for i in range(4)] == [0, 2 * UNIT[name], 4 * UNIT[name],
                                                                          6 * UNIT[name]]


def test_ahbf_mobilenetv2_deepens_stage_by_stage_lower_first():
    """mobile_ahbf.py: level i adds aux blocks to stages 5, 6, 7 in turn: (1,0,0), (1,1,0), (1,1,1), (2,1,1), ..."""
    from okd.models.mobilenetv2 import extra_blocks

    per_stage = [(0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)]
    assert [tuple(extra_blocks(i, 1)) for i in range(7)] == per_stage
    assert extra_blocks(2, 3) == [3, 3, 0]
    spec = backbone_spec("mobilenetv2", 100)
    base = count(spec.make_branch())
    for i, blocks in enumerate(per_stage[:5]):
        expected = sum(2 * b * p for b, p in zip(blocks, MOBILE_STAGE_BLOCK))
        assert count(spec.deeper_branch(i, 2)) - base == expected
        assert [len(stage) for stage in spec.deeper_branch(i, 2).body[:3]] == [3 + 2 * blocks[0], 3 + 2 * blocks[1],
                                                                               1 + 2 * blocks[2]]


@pytest.mark.parametrize("name,channels", [("wrn16_2", 128), ("mobilenetv2", 1280), ("shufflenetv2", 1024)])
def test_ahbf_trains_on_the_later_backbones(name, channels):
    method = make("ahbf", backbone=name, num_branches=3, aux_blocks=1)
    assert [f.conv.out_channels for f in method.net.fusions] == [channels] * 2
    loss, terms = method.training_loss([torch.randn(4, 3, 32, 32)], torch.randint(0, CLASSES, (4,)), epoch=0)
    assert set(terms) == {"ce_branches", "ce_assistants", "kd_hierarchy"} and torch.isfinite(loss)


def test_ahbf_fusion_is_a_convex_mix_of_the_two_levels_logits():
    torch.manual_seed(0)
    fusion = FusionModule(6, 6).train()
    a, b = torch.randn(5, 6, 4, 4), torch.randn(5, 6, 4, 4)
    za, zb = torch.randn(5, 7), torch.randn(5, 7)
    fused, ta = fusion(a, b, za, zb)
    s = fusion.weights(fused)
    assert torch.allclose(s.sum(1), torch.ones(5)) and (s >= 0).all()
    assert torch.allclose(ta, s[:, :1] * za + s[:, 1:] * zb)


def test_ahbf_hierarchical_kd_terms_and_ramp_up():
    torch.manual_seed(0)
    z = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    e = [torch.randn(4, 5, requires_grad=True) for _ in range(2)]
    T, l1, l2 = 3.0, 2.0, 4.0
    by_hand = (l2 * kd_loss(z[0], z[1], T) + l1 * kd_loss(z[0], e[0], T) + l1 * kd_loss(z[1], e[0], T)
               + l2 * kd_loss(e[0], z[2], T) + l1 * kd_loss(e[0], e[1], T) + l1 * kd_loss(z[2], e[1], T))
    total = ahbf_kd(z, e, T, l1, l2)
    assert float(total) == pytest.approx(float(by_hand), rel=1e-6)
    # nothing detached: the teachers' side gets a gradient too
    assert all(g is not None for g in torch.autograd.grad(total, [*z, *e]))
    options = AHBF.Options()
    assert options.kd_scale(0) == pytest.approx(1.5 * 0.5 * math.exp(-5), rel=1e-12)
    assert options.kd_scale(240) == options.kd_scale(300) == pytest.approx(0.75)


def test_ahbf_deploys_the_target_branch_and_refuses_a_backbone_without_deeper_branches():
    import okd

    method = make("ahbf", num_branches=3, aux_blocks=1).eval()
    x = torch.randn(3, 3, 32, 32)
    out = method.evaluate_logits(x)
    assert list(out) == ["branch1", "branch2", "branch3", "assistant1", "assistant2"]
    deployed = okd.create_model("resnet8_tiny", CLASSES).eval()
    deployed.load_state_dict(method.deployable_state_dict(), strict=True)
    assert torch.equal(deployed(x), out["branch1"])
    unsupported = [n for n in okd.BACKBONES.names() if backbone_spec(n, CLASSES).deeper_branch is None]
    for name in unsupported[:1]:
        with pytest.raises(ConfigError, match=f"method ahbf needs branches of increasing depth, which backbone {name}"):
            build_method("ahbf", backbone_spec(name, CLASSES), CLASSES, AHBF.Options())
