"""Batched crop/flip on uint8 tensors against a per-image NumPy reference (torchvision semantics)."""
import numpy as np
import torch

from okd.data import EpochDraws, Normalizer, crop_flip


def coded_images(n, h=32, w=32):
    """Images whose pixel values encode their own coordinates (all non-zero)."""
    rng = np.random.RandomState(1)
    return torch.from_numpy(rng.randint(1, 256, size=(n, 3, h, w)).astype(np.uint8))


def reference(img, top, left, flip, pad):
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))  # zeros, on the uint8 image
    out = padded[:, top:top + img.shape[1], left:left + img.shape[2]]
    return out[:, :, ::-1] if flip else out


def test_crop_flip_matches_reference_for_every_offset():
    n = 81 * 2
    images = coded_images(n)
    offs = torch.tensor([(t, l) for t in range(9) for l in range(9)] * 2)
    flips = torch.tensor([False] * 81 + [True] * 81)
    out = crop_flip(images, offs, flips, 4).numpy()
    for i in range(n):
        ref = reference(images[i].numpy(), int(offs[i, 0]), int(offs[i, 1]), bool(flips[i]), 4)
        assert np.array_equal(out[i], ref), i


def test_padding_is_zero_before_normalisation():
    images = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = crop_flip(images, torch.tensor([[0, 0]]), torch.tensor([False]), 4)
    assert out.dtype == torch.uint8
    assert torch.all(out[0, :, :4, :] == 0) and torch.all(out[0, :, :, :4] == 0)
    assert torch.all(out[0, :, 4:, 4:] == 255)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = Normalizer(mean, std, "cpu")(out)
    for c in range(3):  # padded pixels normalise to (0 - mean)/std
        assert torch.allclose(x[0, c, 0, 0], torch.tensor(-mean[c] / std[c]), atol=1e-6)
        assert torch.allclose(x[0, c, 10, 10], torch.tensor((1 - mean[c]) / std[c]), atol=1e-6)


def test_draw_statistics():
    draws = EpochDraws(20000, 3, pad=4, flip=True, seed=7, epoch=0)
    offsets = draws.offsets[0]
    seen = {(int(t), int(l)) for t, l in offsets}
    assert seen == {(t, l) for t in range(9) for l in range(9)}  # all 81 crop offsets
    rate = draws.flips.float().mean().item()
    assert 0.48 < rate < 0.52
    # the three views are drawn independently
    assert (draws.offsets[0] != draws.offsets[1]).any(dim=1).float().mean() > 0.9
    assert (draws.flips[0] != draws.flips[2]).float().mean() > 0.4
    assert sorted(draws.order.tolist()) == list(range(20000))


def test_draws_are_seeded_per_epoch():
    a = EpochDraws(100, 2, 4, True, seed=3, epoch=5)
    b = EpochDraws(100, 2, 4, True, seed=3, epoch=5)
    c = EpochDraws(100, 2, 4, True, seed=3, epoch=6)
    d = EpochDraws(100, 2, 4, True, seed=4, epoch=5)
    assert torch.equal(a.order, b.order) and torch.equal(a.offsets, b.offsets) and torch.equal(a.flips, b.flips)
    assert not torch.equal(a.order, c.order)
    assert not torch.equal(a.order, d.order)


def test_views_differ_after_augmentation():
    images = coded_images(64)
    draws = EpochDraws(64, 3, 4, True, seed=0, epoch=0)
    views = [crop_flip(images, draws.offsets[v], draws.flips[v], 4) for v in range(3)]
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])


def test_no_flip_no_pad_is_identity():
    images = coded_images(4)
    out = crop_flip(images, torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.bool), 0)
    assert torch.equal(out, images)
