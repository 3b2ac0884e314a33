"""data.views: per-view augmentation recipes, against torchvision's own kernels and hand-derived masks; per-image
independence, the default views left as they were, exact resume, both data paths, one-line refusals."""
import pytest
import torch
from conftest import make_imagenet_tree

from okd.config import DataConfig, load_config
from okd.data import BatchStream, EpochDraws, Normalizer, load_dataset
from okd.data.file_stream import StreamBatches
from okd.data.splits import Split
from okd.data.view_augment import (
    RA_OPS,
    SIGNED,
    ViewParams,
    check_views,
    cutout,
    draw,
    parse,
    ra_magnitude,
    randaugment,
    rotate,
)
from okd.errors import ConfigError

OKDPH_VIEWS = ["crop+flip+rotate", "crop+flip+cutout", "crop+randaugment"]


def images(n=12, size=32, seed=0):
    return torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_rotation_is_torchvisions_with_one_angle_per_image():
    import torchvision.transforms.v2.functional as F

    x = images(6)
    angles = torch.tensor([0.0, 7.3, -12.0, 15.0, -3.3, 90.0], dtype=torch.float64)
    ours = rotate(x, angles)
    for i in range(6):
        assert torch.equal(ours[i], F.rotate(x[i], float(angles[i]), interpolation=F.InterpolationMode.NEAREST))
    assert torch.equal(ours[5], torch.rot90(x[5], 1, dims=(1, 2)))  # 90 degrees counter-clockwise by hand


def test_cutout_zeroes_the_clipped_square_around_each_centre():
    x = images(3)
    out = cutout(x, torch.tensor([[0, 0], [16, 16], [31, 20]]))
    zero = out == 0
    # (0, 0): rows and columns [-8, 8) clipped to [0, 8): an 8 x 8 corner; (16, 16): [8, 24)^2, 16 x 16;
    # (31, 20): rows [23, 32) (9 of them), columns [12, 28)
    assert zero[0].all(0).sum() == 64 and zero[0, :, :8, :8].all()
    assert zero[1].all(0).sum() == 256 and zero[1, :, 8:24, 8:24].all()
    assert zero[2].all(0).sum() == 9 * 16 and zero[2, :, 23:, 12:28].all()
    assert torch.equal(out[1, :, :8], x[1, :, :8])  # nothing else changes (the inputs have no zero pixel)


def test_randaugment_gives_each_image_torchvisions_operation_at_its_own_sign():
    """Batched by (operation, sign) groups, each image equals torchvision's RandAugment kernel applied to it alone
    with the magnitude of torchvision's own table (bin 9 of 31)."""
    from torchvision.transforms import v2

    reference = v2.RandAugment()
    n = 2 * len(RA_OPS)
    x = images(n)
    ops = torch.arange(n).remainder(len(RA_OPS)).view(1, n)  # every operation, each with both signs
    negative = (torch.arange(n) >= len(RA_OPS)).view(1, n)
    ours = randaugment(x, ops, negative)
    for i in range(n):
        op = RA_OPS[int(ops[0, i])]
        fn, signed = reference._AUGMENTATION_SPACE[op]
        magnitudes = fn(31, 32, 32)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[9])
        if signed and bool(negative[0, i]):
            magnitude = -magnitude
        assert (op in SIGNED) == signed
        if op == "Solarize":
            assert ra_magnitude(op, 32, 32) == pytest.approx(255 * magnitude)
        expected = reference._apply_image_or_video_transform(x[i], op, magnitude, interpolation=reference.interpolation,
                                                            fill=reference._fill)
        assert torch.equal(ours[i], expected), op


def test_parameters_are_drawn_per_image_and_the_default_views_stay_as_they_were():
    plain = EpochDraws(64, 3, 4, True, seed=1, epoch=2)
    recipes = [parse(r) for r in OKDPH_VIEWS]
    mixed = EpochDraws(64, 3, 4, True, seed=1, epoch=2, recipes=recipes)
    assert torch.equal(plain.order, mixed.order) and torch.equal(plain.offsets, mixed.offsets)
    assert torch.equal(plain.flips[:2], mixed.flips[:2]) and not mixed.flips[2].any()  # randaugment's: no flip
    rot, cut, ra = mixed.params
    assert rot.angles.unique().numel() == 64 and float(rot.angles.abs().max()) <= 15.0
    assert cut.centres.unique(dim=0).shape[0] > 50 and (cut.centres >= 0).all() and (cut.centres < 32).all()
    assert ra.ra_ops.shape == (2, 64) and ra.ra_ops.unique().numel() == len(RA_OPS)
    # each image's draws are its own: a batch of one image gets that image's parameters
    one = rot.select(torch.tensor([5]))
    assert torch.equal(one.angles, rot.angles[5:6])


def resident(recipes, start=0, epoch=1, views=3):
    torch.manual_seed(0)
    split = Split(images(40, seed=3), torch.arange(40) % 4)
    normalize = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")
    stream = BatchStream(split, normalize, views, 16, 4, True, seed=9, device=torch.device("cpu"),
                         recipes=[parse(r) for r in recipes] if recipes else None)
    return list(stream.epoch(epoch, start))


def test_resident_views_follow_their_recipes_and_resume_exactly():
    plain, mixed = resident(None), resident(OKDPH_VIEWS)
    for a, b in zip(plain, mixed):
        assert torch.equal(a.labels, b.labels)
        assert not torch.equal(a.views[0], b.views[0]) and not torch.equal(a.views[2], b.views[2])
    later = resident(OKDPH_VIEWS, start=1)
    assert [b.index for b in later] == [1, 2]
    for a, b in zip(mixed[1:], later):
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views))
    # the cutout view has its hole: a 16 x 16 (or clipped) block of zeros in every image (before normalising
    # with mean 0 and std 1/255 the pixel values are the views themselves)
    cut = mixed[0].views[1]
    assert ((cut == 0).all(1).flatten(1).sum(1) >= 64).all()


def test_streaming_views_follow_their_recipes(tmp_path):
    tree = make_imagenet_tree(tmp_path / "imagenet", sizes=(40, 48))
    data = load_dataset(DataConfig(name="imagenet", root=str(tree), image_size=32, augment="crop_flip",
                                   pipeline="stream"))
    normalize = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")

    def stream(recipes, workers=0):
        return StreamBatches(data.train, normalize, 3, 6, 32, "crop_flip", 4, True, (0.08, 1.0), seed=7,
                             device=torch.device("cpu"), workers=workers,
                             recipes=[parse(r) for r in recipes] if recipes else None)

    plain = [torch.stack(b.views) for b in stream(None).epoch(0)]
    mixed = [torch.stack(b.views) for b in stream(OKDPH_VIEWS).epoch(0)]
    again = [torch.stack(b.views) for b in stream(OKDPH_VIEWS, workers=2).epoch(0)]
    assert all(torch.equal(a, b) for a, b in zip(mixed, again))  # any number of workers
    assert all(not torch.equal(a[1], b[1]) for a, b in zip(plain, mixed))
    assert all(((b[1] == 0).all(1).flatten(1).sum(1) >= 64).all() for b in mixed)  # every image has its hole


def test_recipes_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="recipe 'crop\\+blur'.*'crop' then any of flip, rotate, cutout, randaugment"):
        load_config(None, ["data.views=[crop+flip, crop+blur, crop]"])
    with pytest.raises(ConfigError, match="recipe 'crop\\+cutout\\+flip'"):
        parse("crop+cutout+flip")
    with pytest.raises(ConfigError, match="lists 2 recipes but method okdph trains on 3 view"):
        check_views(["crop+flip", "crop"], 3, "okdph")
    assert check_views(None, 2, "dml") == [("flip",), ("flip",)]


def test_okdph_recipe_gives_its_networks_the_authors_views():
    from okd.methods import METHODS

    assert METHODS.get("okdph").recipe["data.views"] == OKDPH_VIEWS
    cfg = load_config(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs/methods/okdph.yml"))
    assert cfg.data.views == OKDPH_VIEWS


def test_a_recipe_without_flip_leaves_its_view_unflipped():
    x = images(4)
    params = draw(("rotate",), 4, (32, 32), torch.Generator().manual_seed(0))
    assert isinstance(params, ViewParams) and params.centres is None and params.ra_ops is None
    assert torch.equal(rotate(x, torch.zeros(4, dtype=torch.float64)), x)
