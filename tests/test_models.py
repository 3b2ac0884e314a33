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
    # The rows below: full-network counts of the authors' own model files, instantiated outside okd
    # (winycg/MCL models/resnet.py, models/wrn.py, models/shufflenetv2.py; hfutqian/SwitOKD
    # SwitOKD_code/CIFAR-100/WRN16-2_0.5mobilenetv2/models/mobilenetv2.py); trunk and branch are okd's split.
    # MCL's resnet56: BasicBlock [9, 9, 9], option-B shortcuts (resnet32's family)
    "resnet56": (855_770, 861_620, 205_520, 656_100),
    # MCL's WideResNet(depth, widen_factor), dropRate 0 (WRN-16-2 "0.70M" in SwitOKD's Table 4)
    "wrn16_2": (691_674, 703_284, 164_944, 538_340),
    "wrn40_2": (2_243_546, 2_255_156, 535_120, 1_720_036),
    "wrn16_4": (2_748_890, 2_772_020, 646_864, 2_125_156),
    "wrn40_1": (563_930, 569_780, 135_696, 434_084),
    # SwitOKD's (CRD's) mobile_half, MobileNetV2 T=6 width 0.5 ("0.5MobileNetV2 (0.81M)", SwitOKD Table 4);
    # split as AHBF's multi-branch mobile_half: stages 5-7 per branch
    "mobilenetv2": (697_546, 812_836, 67_520, 745_316),
    # SwitOKD's own teacher, hfutqian/SwitOKD models/wrnet.py wrnet16(): biased convs, by hand:
    # stem 448; group 1 14,528 + 18,624; group 2 57,728 + 74,112; group 3 230,144 + 295,680; BN 256; FC 12,900
    "switokd_wrn16_2": (692_810, 704_420, 165_440, 538_980),
    # MCL's ShuffleNetV2_1x / ShuffleNetV2_05x (net_size 1 / 0.5)
    "shufflenetv2": (1_263_854, 1_356_104, 275_068, 1_081_036),
    "shufflenetv2_x0_5": (352_042, 444_292, 53_184, 391_108),
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
    expected = {"resnet32": 64, "resnet110": 256, "wrn20_8": 256, "vgg16": 512, "densenet40_12": 132,
                "resnet56": 64, "wrn16_2": 128, "wrn40_2": 128, "wrn16_4": 256, "wrn40_1": 64, "mobilenetv2": 1280,
                "shufflenetv2": 1024, "shufflenetv2_x0_5": 1024}
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
