"""Temporal-mean arithmetic and its BatchNorm buffer policy."""
import pytest
import torch
from torch import nn

from okd.ema import ModelEMA, ema_decay


def test_decay_warmup_and_cap():
    assert ema_decay(0, 0.999) == 0.0          # first update copies
    assert ema_decay(1, 0.999) == 0.5          # second averages two iterates
    assert ema_decay(9, 0.999) == pytest.approx(0.9)
    assert ema_decay(998, 0.999) == pytest.approx(1 - 1 / 999)  # still warming up
    assert ema_decay(999, 0.999) == pytest.approx(0.999)
    assert ema_decay(5000, 0.999) == 0.999     # capped


def test_update_arithmetic_by_hand():
    model = nn.Linear(1, 1, bias=False)
    ema = ModelEMA(model, max_decay=0.999)
    seq = [2.0, 4.0, 9.0, 1.0]
    expected = None
    for t, value in enumerate(seq):
        model.weight.data.fill_(value)
        ema.update(model, t)
        a = min(1 - 1 / (t + 1), 0.999)
        expected = value if expected is None else a * expected + (1 - a) * value
        assert ema.module.weight.item() == pytest.approx(expected, abs=1e-6)
    # warm-up makes it the plain running mean of the iterates: (2+4+9+1)/4
    assert expected == pytest.approx(4.0)


def test_capped_update():
    model = nn.Linear(1, 1, bias=False)
    ema = ModelEMA(model, max_decay=0.9)
    ema.module.weight.data.fill_(1.0)
    model.weight.data.fill_(11.0)
    ema.update(model, 1000)  # decay 0.9: 0.9*1 + 0.1*11 = 2.0
    assert ema.module.weight.item() == pytest.approx(2.0)


def _bn_net():
    return nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))


def test_own_buffers_come_from_own_train_forward():
    torch.manual_seed(0)
    student = _bn_net()
    ema = ModelEMA(student, buffers="own")
    student(torch.randn(8, 1, 4, 4) * 5 + 3)  # student's stats move
    x = torch.randn(8, 1, 4, 4)
    ema.update(student, 5)
    bn = ema.module[1]
    assert torch.all(bn.running_mean == 0)  # the update copied no buffers
    with torch.no_grad():
        ema.module.train()(x)
        conv_out = torch.nn.functional.conv2d(x, ema.module[0].weight)
    expected = 0.1 * conv_out.mean(dim=(0, 2, 3))  # momentum 0.1 from zero
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert not torch.allclose(bn.running_mean, student[1].running_mean)
    assert ema.module[0].weight.requires_grad is False


def test_copy_buffers_policy():
    student = _bn_net()
    ema = ModelEMA(student, buffers="copy")
    student(torch.randn(8, 1, 4, 4) + 2)
    ema.update(student, 3)
    assert torch.equal(ema.module[1].running_mean, student[1].running_mean)
    assert ema.module[1].num_batches_tracked.item() == 1
