"""Heterogeneous cohorts: ``model.name`` as a list, one backbone per independent network."""
import pytest
import torch
from conftest import REPO, records

import okd
from okd import checkpoint_file
from okd.cli import main
from okd.config import load_config
from okd.errors import ConfigError
from okd.methods import METHODS, build_method
from okd.models import backbone_spec

CLASSES = 10
TINY = ["data.train_subset=128", "data.test_subset=64", "train.batch_size=64", "train.eval_batch_size=64",
        "schedule.milestones=[1]", "device=cpu"]


def count(module):
    return sum(p.numel() for p in module.parameters())


def cohort_methods():
    """Methods whose networks ``model.name`` may list one backbone each for (from the registry)."""
    return [n for n in METHODS.names() if METHODS.get(n).cohort_size(METHODS.get(n).Options()) is not None]


def test_the_methods_of_independent_networks_take_cohorts_and_the_others_refuse_them():
    takes = set(cohort_methods())
    assert {"dml", "kdcl"} <= takes
    assert not takes & {"vanilla", "cl", "one", "ffl", "okddip", "pcl"}
    for name in sorted(set(METHODS.names()) - takes):
        with pytest.raises(ConfigError, match=f"method {name} .*so model.name must be one backbone; got "
                                               "resnet8_tiny\\+resnet32"):
            load_config(None, [f"method.name={name}", "model.name=[resnet8_tiny, resnet32]"])


@pytest.mark.parametrize("name", cohort_methods())
def test_each_network_is_built_from_its_own_backbone_and_labelled_with_it(name):
    """Network i has backbone i's exact size (docs/methods.md §12 counts); summaries name each backbone;
    the deployable network loads into ``create_model`` of the backbone it names."""
    options = METHODS.get(name).Options()
    size = METHODS.get(name).cohort_size(options)
    names = (["resnet8_tiny", "resnet32"] * size)[:size]
    torch.manual_seed(0)
    method = build_method(name, [backbone_spec(n, CLASSES) for n in names], CLASSES, options).train()
    assert method.backbones == names
    sizes = {"resnet8_tiny": count(okd.create_model("resnet8_tiny", CLASSES)), "resnet32": 466_906}
    nets = [p for p in method.modules() if isinstance(p, okd.models.SingleNet)]
    assert sorted(count(n) for n in nets[:size]) == sorted(sizes[n] for n in names)
    views = [torch.randn(4, 3, 32, 32) for _ in range(method.num_views)]
    loss, _ = method.training_loss(views, torch.randint(0, CLASSES, (4,)), epoch=10)
    loss.backward()
    method.eval()
    x = torch.randn(2, 3, 32, 32)
    logits = method.evaluate_logits(x)
    summaries = method.summary_metrics({k: float(i) for i, k in enumerate(logits)})
    labels = " ".join(s.label for s in summaries)
    assert "resnet8_tiny" in labels and "resnet32" in labels
    assert method.deployable_backbone in summaries[0].label
    deployed = okd.create_model(method.deployable_backbone, CLASSES).eval()
    deployed.load_state_dict(method.deployable_state_dict(), strict=True)
    reported = [k for i, k in enumerate(logits) if float(i) == summaries[0].value]
    assert torch.equal(deployed(x), logits[reported[0]])


def test_a_cohort_of_the_wrong_size_is_a_one_line_error():
    with pytest.raises(ConfigError, match="model.name lists 2 backbones .* but method dml trains 3 networks"):
        load_config(None, ["method.name=dml", "model.name=[resnet32, resnet8_tiny]"])
    with pytest.raises(ConfigError, match="must be a string or a list of strings"):
        load_config(None, ["model.name=3"])
    with pytest.raises(ConfigError, match="unknown model 'resnet33'"):
        load_config(None, ["method.name=dml", "method.num_networks=2", "model.name=[resnet32, resnet33]"])


def test_a_cohort_is_named_by_its_backbones_and_a_plus_joined_name_is_the_same_cohort():
    a = load_config(None, ["method.name=dml", "method.num_networks=2", "model.name=[resnet32, resnet8_tiny]"])
    b = load_config(None, ["method.name=dml", "method.num_networks=2", "model.name=resnet32+tiny"])
    assert a.model.name == b.model.name == ["resnet32", "resnet8_tiny"]
    assert a.run_name == "cifar100_resnet32+resnet8_tiny_dml_seed0"


def test_a_cohort_runs_resumes_bitwise_and_deploys_network_one(tmp_path, capsys):
    """From the command line: 2 epochs straight equal 1 + 1 by rerunning; best.pt is network 1's backbone."""
    base = ["--config", str(REPO / "configs/quickstart.yml"), f"output.root={tmp_path}", "--method", "dml",
            "method.num_networks=2", "model.name=[resnet8_tiny,resnet32]", *TINY]
    assert main([*base, "--save_dir", "straight", "train.epochs=2"]) == 0
    assert main([*base, "--save_dir", "resumed", "train.epochs=1"]) == 0
    assert main([*base, "--save_dir", "resumed", "train.epochs=2"]) == 0
    a = checkpoint_file.load(tmp_path / "straight" / "last.pt")
    b = checkpoint_file.load(tmp_path / "resumed" / "last.pt")
    assert a["model_name"] == ["resnet8_tiny", "resnet32"] and a["deploy_model"] == "resnet8_tiny"
    for k in a["method_state"]:
        assert torch.equal(a["method_state"][k], b["method_state"][k]), k
    summary = records(tmp_path / "resumed")[-1]["summary"]
    assert {"reported", "net1", "net2", "ensemble"} <= set(summary)
    model = okd.load_model(tmp_path / "resumed" / "best.pt")
    assert count(model) == count(okd.create_model("resnet8_tiny", CLASSES))
    # another cohort in the same run directory is another experiment: refused, nothing overwritten
    capsys.readouterr()
    assert main([*base, "--save_dir", "resumed", "train.epochs=2", "model.name=[resnet32,resnet8_tiny]"]) == 2
    assert "model.name" in capsys.readouterr().err
