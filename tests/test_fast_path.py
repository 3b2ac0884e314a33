"""The fast paths compute what the seed's execution order computes (CPU, fp32, within 1e-5):
the trunk run once over all views with per-view BatchNorm, the foreach temporal-mean update and
channels_last, each against a reference-structured computation."""
import copy

import pytest
import torch

from okd.ema import ModelEMA, ema_decay
from okd.methods.pcl import PCL
from okd.models import backbone_spec

TOL = dict(atol=1e-5, rtol=1e-5)


def make(fused, backbone="resnet8_tiny", classes=7):
    torch.manual_seed(0)
    return PCL(backbone_spec(backbone, classes), classes, PCL.Options(fused_views=fused, rampup_epochs=4)).train()


def one_step(method, views, labels, epoch=2, memory_format=torch.contiguous_format):
    opt = torch.optim.SGD(method.parameter_groups(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    views = [v.contiguous(memory_format=memory_format) for v in views]
    feats, logits = method.net.peers.forward_views(views)
    loss, terms = method.training_loss(views, labels, epoch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    method.after_step(5)
    return logits, loss, terms


def batch(B=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(3)], torch.randint(0, 7, (B,), generator=g)


@pytest.mark.parametrize("backbone", ["resnet8_tiny", "densenet40_12"])
def test_fused_trunk_equals_one_trunk_call_per_view(backbone):
    ref, fast = make(False, backbone), make(True, backbone)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fast.state_dict().values()))
    views, labels = batch()
    ref_logits, ref_loss, ref_terms = one_step(ref, views, labels)
    fast_logits, fast_loss, fast_terms = one_step(fast, views, labels)
    for a, b in zip(ref_logits, fast_logits):
        assert torch.allclose(a, b, **TOL)
    assert torch.allclose(ref_loss, fast_loss, **TOL)
    for k in ref_terms:
        assert torch.allclose(ref_terms[k], fast_terms[k], **TOL), k
    ref_state, fast_state = ref.state_dict(), fast.state_dict()
    assert ref_state.keys() == fast_state.keys()  # checkpoints are interchangeable
    for k in ref_state:  # parameters after the step, BN running statistics, temporal mean
        assert torch.allclose(ref_state[k].float(), fast_state[k].float(), **TOL), k


def test_per_view_running_statistics_are_three_sequential_updates():
    fast = make(True)
    bn = fast.net.peers.trunk[1]  # the stem's BatchNorm
    views, _ = batch()
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    stem = fast.net.peers.trunk[0]
    with torch.no_grad():
        fast.net.peers.forward_views(views)
        expected_mean, expected_var = before_mean, before_var
        for v in views:  # written out: r <- (1 - m) r + m s, unbiased variance
            x = stem(v)
            n = x.numel() / x.shape[1]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1)
            expected_mean = 0.9 * expected_mean + 0.1 * mean
            expected_var = 0.9 * expected_var + 0.1 * var
    assert torch.allclose(bn.running_mean, expected_mean, **TOL)
    assert torch.allclose(bn.running_var, expected_var, **TOL)
    assert int(bn.num_batches_tracked) == 3


def test_foreach_ema_equals_the_per_tensor_loop():
    torch.manual_seed(0)
    model = backbone_spec("resnet8_tiny", 5).make_trunk()
    ema = ModelEMA(model, 0.999)
    loop = copy.deepcopy(ema.module)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update(model, step)
        d = ema_decay(step, 0.999)
        with torch.no_grad():
            for e, p in zip(loop.parameters(), model.parameters()):  # the seed's loop
                e.mul_(d).add_(p, alpha=1 - d)
    for a, b in zip(ema.module.parameters(), loop.parameters()):
        assert torch.allclose(a, b, **TOL)


def test_channels_last_step_equals_contiguous_step():
    ref, fast = make(False), make(True).to(memory_format=torch.channels_last)
    views, labels = batch()
    _, ref_loss, _ = one_step(ref, views, labels)
    _, fast_loss, _ = one_step(fast, views, labels, memory_format=torch.channels_last)
    assert torch.allclose(ref_loss, fast_loss, **TOL)
    for (k, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), **TOL), k
