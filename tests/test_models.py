"""Backbones: exact parameter counts from docs/methods.md §12, trunk/branch split, independent branches."""
import pytest
import torch

import okd
from okd.models import MultiBranchNet, backbone_spec
from okd.models.densenet import densenet40_12_spec


def count(module):
    return sum(p.numel() for p in module.parameters())


# docs/methods.md §12: (params @10 classes, params @100 classes, shared trunk, one branch @100 classes)
SPEC = {
    "resnet32": (466_906, 472_756, 112_592, 360_164),
    "resnet110": (1_147_738, 1_170_868, 275_280, 895_588),
    "wrn20_8": (6_848_090, 6_871_220, 1_629_776, 5_241_444),
    "vgg16": (15_253_578, 15_299_748, 7_640_640, 7_659_108),
    # standard DenseNet-BC head with the final BatchNorm over 132 channels: spec's count + 264
    "densenet40_12": (175_858 + 264, 187_828 + 264, 115_848, 71_980 + 264),
}


# torchvision's published counts at 1000 classes (its model builders' documentation)
TORCHVISION = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_imagenet_resnets_are_torchvisions(name):
    """Exact parameter count; the deployable network loads strict into torchvision's and gives its logits."""
    import torchvision

    from okd.models.imagenet_resnet import torchvision_state_dict

    torch.manual_seed(0)
    ours = okd.create_model(name, 1000).eval()
    assert count(ours) == TORCHVISION[name]
    theirs = getattr(torchvision.models, name)().eval()
    theirs.load_state_dict(torchvision_state_dict(ours.state_dict()), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(images), theirs(images))
    # the trunk/branch split: layer4 and the classifier are the branch
    spec = backbone_spec(name, 1000)
    assert count(spec.make_branch()) == sum(p.numel() for k, p in theirs.named_parameters()
                                            if k.startswith(("layer4.", "fc.")))


@pytest.mark.parametrize("name", sorted(SPEC))
def test_parameter_counts(name):
    c10, c100, trunk, branch100 = SPEC[name]
    assert count(okd.create_model(name, 10)) == c10
    assert count(okd.create_model(name, 100)) == c100
    spec = backbone_spec(name, 100)
    assert count(spec.make_trunk()) == trunk
    assert count(spec.make_branch()) == branch100


def test_densenet_without_final_norm_matches_reproduction():
    for classes, expected in ((10, 175_858), (100, 187_828)):
        spec = densenet40_12_spec(classes, final_norm=False)
        assert count(spec.make_trunk()) + count(spec.make_branch()) == expected


@pytest.mark.parametrize("alias,name", [("wide_resnet20_8", "wrn20_8"), ("densenetd40k12", "densenet40_12")])
def test_seed_aliases(alias, name):
    assert okd.BACKBONES.canonical(alias) == name
    assert count(okd.create_model(alias, 10)) == SPEC[name][0]


def test_feature_dims_and_outputs():
    expected = {"resnet32": 64, "resnet110": 256, "wrn20_8": 256, "vgg16": 512, "densenet40_12": 132}
    for name, dim in expected.items():
        assert backbone_spec(name, 10).feature_dim == dim
    torch.manual_seed(0)
    net = okd.create_model("resnet8_tiny", 7).eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_branches_initialised_independently():
    torch.manual_seed(0)
    net = MultiBranchNet(backbone_spec("resnet32", 100), 3)
    fc = [b.fc.weight for b in net.branches]
    conv = [b.body[0][0].conv1.weight for b in net.branches]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(fc[i], fc[j])  # the seed copied branch 1's FC: we don't
            assert not torch.equal(conv[i], conv[j])
            assert fc[i].data_ptr() != fc[j].data_ptr()


def test_densenet_branches_do_not_share_block3():
    net = MultiBranchNet(backbone_spec("densenet40_12", 10), 3)
    ptrs = {b.body[0][0].layers[2].weight.data_ptr() for b in net.branches}
    assert len(ptrs) == 3


def test_multibranch_views_and_single_state_dict():
    torch.manual_seed(0)
    net = MultiBranchNet(backbone_spec("resnet8_tiny", 5), 3).eval()
    x = torch.randn(4, 3, 32, 32)
    feats, logits = net([x][0])
    feats_v, logits_v = net.forward_views([x, x, x])
    for a, b in zip(logits, logits_v):
        assert torch.allclose(a, b, atol=1e-6)
    single = okd.create_model("resnet8_tiny", 5)
    single.load_state_dict(net.single_state_dict(1))
    assert torch.allclose(single.eval()(x), logits[1], atol=1e-6)


def test_a_backbone_refuses_an_image_size_it_cannot_take_in_one_line():
    from okd.errors import ConfigError
    from okd.models import check_input_size

    spec = backbone_spec("vgg16", 10)
    check_input_size("vgg16", spec, 32, "cifar10")  # its own size
    with pytest.raises(ConfigError) as err:
        check_input_size("vgg16", spec, 64, "imagefolder")
    assert str(err.value) == ("model vgg16 takes 32x32 images, dataset 'imagefolder' has 64x64; pick another "
                              "model (e.g. resnet18) or resize the data")
    # without the check, the mismatch would surface deep in the classifier
    net = okd.create_model("vgg16", 10).eval()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        net(torch.randn(1, 3, 64, 64))
    # networks that pool adaptively take other sizes
    for name in ("resnet32", "densenet40_12", "resnet18"):
        check_input_size(name, backbone_spec(name, 10), 64, "imagefolder")
        assert okd.create_model(name, 10).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
