"""Loss terms against hand-derived values (docs/methods.md §1)."""
import math

import pytest
import torch

from okd.losses import kd_loss, sigmoid_rampup


def test_kd_loss_hand_value_T1():
    # teacher p = [3/4, 1/4] (logits [ln 3, 0]); student q = [1/2, 1/2]
    # KL(p||q) = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.tensor([[0.0, 0.0]])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_kd_loss_direction_is_teacher_to_student():
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.tensor([[0.0, 0.0]])
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q||p) = 0.143841
    assert kd_loss(s, t, 1.0).item() != pytest.approx(reverse, abs=1e-3)


def test_kd_loss_temperature_squared_and_batchmean():
    T = 3.0
    # logits scaled by T give the same softened distributions as above at T=3
    t = torch.tensor([[T * math.log(3.0), 0.0], [1.0, 2.0]])
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # second row: identical, KL 0
    kl_row0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = T * T * (kl_row0 + 0.0) / 2  # batch mean over 2 rows, times T^2
    assert kd_loss(s, t, T).item() == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(0.588653, abs=1e-5)


def test_kd_loss_zero_for_equal_and_gradient_only_to_student():
    z = torch.randn(4, 7)
    assert kd_loss(z, z, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(4, 7, requires_grad=True)
    t = torch.randn(4, 7, requires_grad=True)
    kd_loss(s, t.detach(), 3.0).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("epoch,expected", [
    (0, math.exp(-5.0)),                    # 0.006737947
    (40, math.exp(-5.0 * 0.5 ** 2)),       # exp(-1.25) = 0.286505
    (79, math.exp(-5.0 * (1 / 80) ** 2)),  # 0.999219
    (80, 1.0),
    (100, 1.0),
])
def test_sigmoid_rampup(epoch, expected):
    assert sigmoid_rampup(epoch, 80) == pytest.approx(expected, rel=1e-9)


def test_rampup_literal_values():
    assert sigmoid_rampup(0, 80) == pytest.approx(0.006737947, abs=1e-9)
    assert sigmoid_rampup(40, 80) == pytest.approx(0.2865048, abs=1e-7)
    # the seed's bug (epoch/lambd) made w(3..80) ~ 0; the correct curve rises monotonically
    values = [sigmoid_rampup(e, 80) for e in range(81)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert sigmoid_rampup(0, 0) == 1.0
