"""data.sampler m_per_class (MCL's class-balanced batches) on both data paths: the batches' composition as the
authors' MPerClassSampler makes them, determinism from (seed, epoch), exact resume, torchrun slices."""
import pytest
import torch
from conftest import make_imagenet_tree

from okd.config import DataConfig, load_config
from okd.data import BatchStream, Normalizer, load_dataset
from okd.data.file_stream import StreamBatches
from okd.data.sampling import Sampling, distinct_draws
from okd.data.splits import Split
from okd.distributed import DistInfo
from okd.errors import ConfigError


def cifar100_labels():
    """CIFAR-100's training labels as counts go: 500 images of each of 100 classes, in a random order."""
    return torch.arange(100).repeat_interleave(500)[torch.randperm(50_000, generator=torch.Generator().manual_seed(1))]


def test_every_batch_is_64_classes_of_2_distinct_images_as_the_authors_sampler():
    labels = cifar100_labels()
    sampling = Sampling(labels, 128, "m_per_class", 2)
    # MPerClassSampler: list_size = 50,000 - 50,000 % 128 = 49,920 positions, 390 batches
    assert (sampling.length, len(sampling)) == (49_920, 390)
    order, _ = sampling.order(seed=0, epoch=0)
    batches = order.view(390, 128)
    for b in batches:
        pairs = labels[b].view(64, 2)
        assert torch.equal(pairs[:, 0], pairs[:, 1])  # each class's m = 2 images side by side
        assert pairs[:, 0].unique().numel() == 64  # 64 distinct classes
        assert b.unique().numel() == 128  # distinct images within a batch
    # with replacement across batches: some images twice in the epoch, others not at all
    seen = torch.bincount(order, minlength=50_000)
    assert int(seen.max()) >= 2 and int((seen == 0).sum()) > 0
    # every class is drawn about equally often over the epoch (390 * 64 / 100 = 249.6 batches each)
    per_class = torch.bincount(labels[order], minlength=100) / 2
    assert per_class.sum() == 390 * 64 and 200 < float(per_class.min()) and float(per_class.max()) < 300


def test_every_anchor_has_a_positive_under_the_sampler_and_not_under_the_shuffle():
    """MCL's contrastive terms leave out anchors without a positive: the shuffle leaves ~28 % at 128 on CIFAR-100
    (1 - (1 - 1/100)^127 of anchors share their class with nobody: 27.9 %), the sampler none."""
    labels = cifar100_labels()
    for sampler, lo, hi in (("m_per_class", 0.0, 0.0), ("shuffle", 0.25, 0.31)):
        sampling = Sampling(labels, 128, sampler)
        order, _ = sampling.order(seed=3, epoch=2)
        batches = labels[order[:390 * 128]].view(390, 128)
        same = batches[:, :, None] == batches[:, None, :]
        alone = (same.sum(-1) == 1).float().mean()  # the anchor itself is its only match
        assert lo <= float(alone) <= hi, sampler


def test_the_order_is_drawn_from_seed_and_epoch_alone():
    labels = cifar100_labels()
    a, b = Sampling(labels, 128, "m_per_class", 2), Sampling(labels.clone(), 128, "m_per_class", 2)
    assert torch.equal(a.order(5, 7)[0], b.order(5, 7)[0])
    assert not torch.equal(a.order(5, 7)[0], a.order(5, 8)[0]) and not torch.equal(a.order(5, 7)[0], a.order(6, 7)[0])


def test_distinct_draws_are_distinct_and_uniform():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([3, 5, 7, 500] * 30_000)
    draws = distinct_draws(sizes, 3, gen)
    assert (draws >= 0).all() and (draws < sizes[:, None]).all()
    assert (draws[:, 0] != draws[:, 1]).all() and (draws[:, 1] != draws[:, 2]).all() and (draws[:, 0] != draws[:, 2]).all()
    # of n = 5: every value is picked with probability 3/5, in every column with 1/5 (30,000 rows: +-3 %)
    five = draws[sizes == 5]
    for column in range(3):
        freq = torch.bincount(five[:, column], minlength=5).double() / five.shape[0]
        assert torch.allclose(freq, torch.full((5,), 0.2, dtype=torch.float64), atol=0.01)
    # of n = 3 all three are taken, in each of the 6 orders about equally often
    orders = torch.unique(draws[sizes == 3], dim=0, return_counts=True)[1]
    assert orders.numel() == 6 and int(orders.min()) > 4_500


def test_resident_batches_resume_exactly_and_ranks_slice_the_global_batch():
    torch.manual_seed(0)
    labels = torch.arange(10).repeat_interleave(12)  # 120 images, 10 classes of 12
    split = Split(torch.randint(0, 256, (120, 3, 8, 8), dtype=torch.uint8), labels)
    normalize = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")

    def stream(dist=DistInfo()):
        return BatchStream(split, normalize, 2, 16, 2, True, seed=4, device=torch.device("cpu"), dist=dist,
                           sampler="m_per_class", m_per_class=4)

    whole = list(stream().epoch(1))
    assert len(whole) == 7 and all(b.labels.numel() == 16 for b in whole)  # 120 - 120 % 16 = 112 positions
    for b in whole:
        assert (b.labels.view(4, 4) == b.labels.view(4, 4)[:, :1]).all()  # 4 classes x 4 images
    resumed = list(stream().epoch(1, start=3))
    assert [b.index for b in resumed] == [3, 4, 5, 6]
    for x, y in zip(whole[3:], resumed):
        assert torch.equal(x.labels, y.labels) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    ranks = [list(stream(DistInfo(rank=r, world_size=2)).epoch(1)) for r in range(2)]
    for b, (r0, r1) in enumerate(zip(*ranks)):
        assert torch.equal(torch.cat([r0.labels, r1.labels]), whole[b].labels)
        assert torch.equal(torch.cat([r0.views[1], r1.views[1]]), whole[b].views[1])
        for share in (r0, r1):  # every rank's slice keeps each class's images together: positives on the rank
            assert (share.labels.view(2, 4) == share.labels.view(2, 4)[:, :1]).all()
    with pytest.raises(ConfigError, match="multiple of data.m_per_class \\(4\\) x the world size \\(3\\)"):
        stream(DistInfo(rank=0, world_size=3))


def test_streaming_batches_follow_the_same_order_and_resume(tmp_path):
    tree = make_imagenet_tree(tmp_path / "imagenet", classes=("n01", "n02", "n03", "n04"), train_per_class=5,
                              sizes=(40, 48))
    data = load_dataset(DataConfig(name="imagenet", root=str(tree), image_size=32, augment="crop_flip",
                                   pipeline="stream"))
    normalize = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")

    def stream():
        return StreamBatches(data.train, normalize, 2, 6, data.image_size, data.augment, 4, True, (0.08, 1.0),
                             seed=7, device=torch.device("cpu"), workers=0, sampler="m_per_class", m_per_class=2)

    batches = [(b.index, b.labels, torch.stack(b.views)) for b in stream().epoch(0)]
    assert len(batches) == 3  # 20 images, 18 positions
    order = Sampling(data.train.labels, 6, "m_per_class", 2).order(7, 0)[0]
    assert torch.equal(torch.cat([labels for _, labels, _ in batches]), data.train.labels[order])
    for _, labels, _ in batches:
        assert (labels.view(3, 2) == labels.view(3, 2)[:, :1]).all()
    for (i, la, va), (j, lb, vb) in zip(batches[1:], [(b.index, b.labels, torch.stack(b.views))
                                                      for b in stream().epoch(0, start=1)]):
        assert i == j and torch.equal(la, lb) and torch.equal(va, vb)


def test_the_sampler_refuses_what_it_cannot_draw_in_one_line():
    with pytest.raises(ConfigError, match="must be a multiple of 'data.m_per_class' \\(3\\)"):
        load_config(None, ["data.sampler=m_per_class", "data.m_per_class=3"])
    with pytest.raises(ConfigError, match="data.sampler' must be shuffle or m_per_class"):
        load_config(None, ["data.sampler=balanced"])
    ten = torch.arange(10).repeat_interleave(50)
    with pytest.raises(ConfigError, match="draws 64 classes per batch .* training set has 10; raise data.m_per_class"):
        Sampling(ten, 128, "m_per_class", 2)
    assert len(Sampling(ten, 128, "m_per_class", 16)) == 3  # 8 classes x 16 fits CIFAR-10's 10 classes
