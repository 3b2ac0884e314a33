"""Batched branches (``train.batched_branches``) compute what the branches one after another compute.

For every backbone and every method with branches on a shared trunk, against
the per-branch path (the branch modules themselves; the batched path only reads
their weights):

* fp32 on CPU, within 1e-5 of the tensor's largest value (an untrained
  ResNet-110 in eval mode has logits of 1e4): the loss terms, the test logits of
  every model and the BatchNorm running statistics; and after an SGD step the
  parameters and (PCL) the temporal mean are about as close to the fp64 result
  as the per-branch fp32 path's (the largest deviation over all of them at most
  4x the per-branch one, plus 1e-5; oneDNN's grouped 1x1 weight gradients carry
  about 3x the rounding of ungrouped ones);
* fp64, within 1e-9: all of the above after two steps (one on the largest
  backbones) at the paper's learning rate.

Why the step is judged against fp64 in fp32: a ReLU input that rounds to the
other side of zero passes its whole gradient in one path and none in the other.
ResNet-110 has millions of ReLU inputs per batch, so in fp32 such flips happen
on every step in *either* path: its fp32 gradients differ from fp64 by up to 5 %
whichever way the branches run. In fp64 no flip occurs and the two paths agree
to 1e-13, which is what shows that they compute the same function.
"""
import copy

import pytest
import torch
from conftest import large_backbones, random_batch
from torch import nn

from okd.errors import ConfigError
from okd.methods import METHODS, build_method
from okd.models import (
    BACKBONES,
    MultiBranchNet,
    backbone_options,
    backbone_spec,
    enable_batched_branches,
)
from okd.models.grouped import GroupedBatchNorm2d, GroupedConv2d, GroupedLinear

CLASSES = 10
TOL = dict(rtol=1e-5, atol=1e-5)
TOL64 = dict(rtol=1e-9, atol=1e-9)
LARGE = large_backbones()


def multi_branch_methods():
    names = []
    for name in METHODS.names():
        method = build_method(name, backbone_spec("resnet8_tiny", CLASSES), CLASSES, METHODS.get(name).Options())
        if any(isinstance(m, MultiBranchNet) for m in method.modules()):
            names.append(name)
    return names


MULTI_BRANCH = multi_branch_methods()


def test_the_multi_branch_methods_are_the_expected_ones():
    # a guard that the parametrisation below is not empty or missing one of the papers' methods
    assert {"cl", "one", "ffl", "okddip", "pcl"} <= set(MULTI_BRANCH)


def spec_for(backbone):
    # dropout draws other random masks when the branches run together; its semantics are unchanged
    options = {"dropout": 0.0} if "dropout" in backbone_options(backbone) else {}
    return backbone_spec(backbone, CLASSES, **options)


def pair(name, backbone, dtype=torch.float32, **options):
    torch.manual_seed(0)
    reference = build_method(name, spec_for(backbone), CLASSES, METHODS.get(name).Options(**options)).train()
    reference = reference.to(dtype)
    batched = copy.deepcopy(reference)
    assert enable_batched_branches(batched) >= 1
    return reference, batched


def tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assert_same_state(a, b, tol):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], **tol, msg=key)


def sgd_step(method, views, labels, lr, epoch=40):
    opt = torch.optim.SGD(method.parameter_groups(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss, terms = method.training_loss(views, labels, epoch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    method.after_step(torch.tensor(3), torch.tensor(1.0))
    return {k: v.detach() for k, v in terms.items()}


def assert_close_normwise(actual, expected, tol, key):
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol["rtol"] * max(1.0, expected.double().abs().max().item()), (key, error)


def check_logits(reference, batched, tol, dtype):
    reference.eval(), batched.eval()
    test_images = random_batch(1, batch=3, seed=5)[0][0].to(dtype)
    logits_ref, logits_bat = reference.evaluate_logits(test_images), batched.evaluate_logits(test_images)
    for key in logits_ref:
        assert_close_normwise(logits_bat[key], logits_ref[key], tol, key)
    reference.train(), batched.train()


def check_terms(terms_ref, terms_bat, tol):
    assert terms_ref.keys() == terms_bat.keys()
    for key in terms_ref:
        assert_close_normwise(terms_bat[key], terms_ref[key], tol, key)


def assert_equivalent(reference, batched, steps, lr, tol, dtype, batch=4):
    """Two steps (or ``steps``) in ``dtype``: terms, every parameter and buffer, test logits within ``tol``."""
    views, labels = random_batch(reference.num_views, batch=batch, classes=CLASSES)
    views = [v.to(dtype) for v in views]
    assert_same_state(reference, batched, tol)  # the copy starts equal, so everything below is the batching
    for _ in range(steps):  # a second step runs on trained weights and updated running statistics
        check_terms(sgd_step(reference, views, labels, lr), sgd_step(batched, views, labels, lr), tol)
        assert_same_state(reference, batched, tol)  # parameters, BN running stats, temporal mean
    check_logits(reference, batched, tol, dtype)


def every_backbone():
    return [pytest.param(b, marks=pytest.mark.slow) if b in LARGE else b for b in BACKBONES.names()]


@pytest.mark.parametrize("backbone", every_backbone())
@pytest.mark.parametrize("name", MULTI_BRANCH)
def test_batched_branches_equal_branches_one_by_one_fp32(name, backbone):
    reference, batched = pair(name, backbone)
    truth = copy.deepcopy(reference).double()
    check_logits(reference, batched, TOL, torch.float32)
    views, labels = random_batch(reference.num_views, batch=4, classes=CLASSES)
    terms = [sgd_step(m, v, labels, lr=0.01) for m, v in
             ((reference, views), (batched, views), (truth, [x.double() for x in views]))]
    check_terms(terms[0], terms[1], TOL)  # the forward: before any weight moved
    buffers_ref, buffers_bat = dict(reference.named_buffers()), dict(batched.named_buffers())
    for key in buffers_ref:  # BN running statistics of the forward
        assert_close_normwise(buffers_bat[key], buffers_ref[key], TOL, key)
    # ReLU flips land on random parameters in either path: compare the largest deviations
    exact = dict(truth.named_parameters())
    error_ref = max((p.double() - exact[k]).abs().max().item() for k, p in reference.named_parameters())
    error_bat = max((p.double() - exact[k]).abs().max().item() for k, p in batched.named_parameters())
    assert error_bat <= 4 * error_ref + 1e-5, (error_bat, error_ref)


@pytest.mark.parametrize("backbone", every_backbone())
@pytest.mark.parametrize("name", MULTI_BRANCH)
def test_batched_branches_equal_branches_one_by_one_fp64(name, backbone):
    reference, batched = pair(name, backbone, torch.float64)
    # fp64 convolutions have no fast CPU kernels: one step on the largest networks (not fewer images:
    # with 2 images at 1x1 in ResNet-50's last stage, BatchNorm's gradient is ill-conditioned even in fp64)
    steps = 1 if backbone in LARGE else 2
    assert_equivalent(reference, batched, steps=steps, lr=0.1, tol=TOL64, dtype=torch.float64)


@pytest.mark.parametrize("backbone", ["resnet8_tiny", "densenet40_12"])
def test_pcl_fused_views_with_batched_branches(backbone):
    """The fast CUDA configuration: trunk once over all views, then all branches at once."""
    reference, _ = pair("pcl", backbone, torch.float64)
    torch.manual_seed(0)
    fast = build_method("pcl", spec_for(backbone), CLASSES, METHODS.get("pcl").Options(fused_views=True)).train()
    fast = fast.to(torch.float64)
    fast.load_state_dict(reference.state_dict())
    enable_batched_branches(fast)
    assert_equivalent(reference, fast, steps=2, lr=0.1, tol=TOL64, dtype=torch.float64)


def test_the_temporal_mean_batches_its_own_branches():
    _, batched = pair("pcl", "resnet8_tiny")
    student, mean = batched.net.peers, batched.mean.module.peers
    assert [id(m) for m in student.batched.fc.members] == [id(b.fc) for b in student.branches]
    assert [id(m) for m in mean.batched.fc.members] == [id(b.fc) for b in mean.branches]
    assert not {id(b.fc) for b in student.branches} & {id(b.fc) for b in mean.branches}


def test_grouped_layers_against_torch_layers():
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 6, 3, stride=2, padding=1) for _ in range(3)]
    bns = [nn.BatchNorm2d(6) for _ in range(3)]
    linears = [nn.Linear(5, 7) for _ in range(3)]
    xs = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    out = GroupedConv2d(convs)(torch.cat(xs, 1))
    expected = [c(x) for c, x in zip(convs, xs)]
    torch.testing.assert_close(out, torch.cat(expected, 1), **TOL)
    normed = GroupedBatchNorm2d(bns)(out)
    torch.testing.assert_close(normed, torch.cat([b(e) for b, e in zip([copy.deepcopy(b) for b in bns], expected)], 1),
                               **TOL)
    ref_bns = [nn.BatchNorm2d(6) for _ in range(3)]
    for b, e in zip(ref_bns, expected):
        b(e)
    for b, r in zip(bns, ref_bns):  # each branch's running statistics got its own update, once
        torch.testing.assert_close(b.running_mean, r.running_mean, **TOL)
        torch.testing.assert_close(b.running_var, r.running_var, **TOL)
        assert int(b.num_batches_tracked) == 1
    hs = [torch.randn(2, 5) for _ in range(3)]
    torch.testing.assert_close(GroupedLinear(linears)(torch.cat(hs, 1)),
                               torch.cat([lin(h) for lin, h in zip(linears, hs)], 1), **TOL)


def test_an_unsupported_branch_layer_is_a_one_line_config_error():
    torch.manual_seed(0)
    method = build_method("cl", backbone_spec("resnet8_tiny", CLASSES), CLASSES, METHODS.get("cl").Options())
    for branch in method.net.branches:
        branch.body[0][0].bn1 = nn.GroupNorm(2, branch.body[0][0].bn1.num_features)
    with pytest.raises(ConfigError, match=r"GroupNorm is not supported; set train.batched_branches=false") as info:
        enable_batched_branches(method)
    assert "\n" not in str(info.value)


class Grow(nn.Module):
    """A backbone's own block that joins channels (as DenseNet's layer does): [x, conv x]."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], dim=1)


def test_a_backbones_own_block_declares_its_grouped_form_beside_it(monkeypatch):
    from okd.models import grouped

    torch.manual_seed(0)
    members = [nn.Sequential(Grow(4), nn.ReLU()) for _ in range(3)]
    x = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    one_by_one = [member(xi) for member, xi in zip(members, x)]
    # run as a plain container, the join puts every branch's input before every branch's new channels
    generic = grouped.batched_clone(members)(torch.cat(x, dim=1)).chunk(3, dim=1)
    assert not torch.allclose(generic[0], one_by_one[0])  # what the batched-branches contract test catches
    monkeypatch.setattr(grouped, "FORMS", dict(grouped.FORMS))  # the declaration below ends with the test

    @grouped.grouped_form(Grow)
    class GroupedGrow(nn.Module):
        def __init__(self, blocks):
            super().__init__()
            self.m, self.conv = len(blocks), grouped.batched_clone([b.conv for b in blocks])

        def forward(self, x):
            parts = [x.unflatten(1, (self.m, -1)), self.conv(x).unflatten(1, (self.m, -1))]
            return torch.cat(parts, dim=2).flatten(1, 2)

    together = grouped.batched_clone(members)(torch.cat(x, dim=1)).chunk(3, dim=1)
    for yi, expected in zip(together, one_by_one):
        torch.testing.assert_close(yi, expected, **TOL)
    with pytest.raises(ValueError, match="Grow has a grouped form already"):
        grouped.grouped_form(Grow)(GroupedGrow)
    from okd.models.densenet import DenseLayer, GroupedDenseLayer

    assert grouped.FORMS[DenseLayer] is GroupedDenseLayer  # DenseNet declares its own, in models/densenet.py
