"""Every method takes a training step on every paper backbone; the quickstart reaches its stated accuracy (slow)."""
import json
from pathlib import Path

import pytest
import torch

from okd.cli import main
from okd.methods import METHODS, build_method
from okd.methods.pcl import PCL
from okd.models import backbone_spec

METHOD_NAMES = ["vanilla", "dml", "cl", "one", "ffl", "okddip", "kdcl", "pcl"]
# the three large backbones take a PCL step in the default run (below); every method on them is slow
BACKBONE_PARAMS = ["resnet32", "densenet40_12"] + [
    pytest.param(b, marks=pytest.mark.slow) for b in ("resnet110", "wrn20_8", "vgg16")]


def test_every_method_is_registered():
    assert sorted(METHODS.names()) == sorted(METHOD_NAMES)


@pytest.mark.parametrize("backbone", BACKBONE_PARAMS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_steps_on_every_backbone(name, backbone):
    """One forward/backward/SGD step at batch 2 (0.2-1.3 s each on 2 cores)."""
    torch.manual_seed(0)
    method = build_method(name, backbone_spec(backbone, 100), 100, METHODS.get(name).Options()).train()
    opt = torch.optim.SGD(method.parameter_groups(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    views = [torch.randn(2, 3, 32, 32) for _ in range(method.num_views)]
    before = [p.detach().clone() for g in method.parameter_groups() for p in g["params"]]
    loss, terms = method.training_loss(views, torch.tensor([3, 97]), 10)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    method.after_step(0)
    after = [p for g in method.parameter_groups() for p in g["params"]]
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > 0.9 * len(before)
    out = method.eval().evaluate_logits(torch.randn(2, 3, 32, 32))
    assert all(z.shape == (2, 100) for z in out.values())
    assert method.summary_metrics({k: 1.0 for k in out})[0].key == "reported"


@pytest.mark.parametrize("name", ["resnet32", "resnet110", "wrn20_8", "vgg16", "densenet40_12"])
def test_pcl_step_on_every_backbone(name):
    torch.manual_seed(0)
    method = PCL(backbone_spec(name, 100), 100, PCL.Options()).train()
    opt = torch.optim.SGD(method.parameter_groups(), lr=0.1, momentum=0.9, nesterov=True)
    views = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    before = [p.detach().clone() for p in method.mean.parameters()]
    loss, terms = method.training_loss(views, torch.tensor([3, 97]), 10)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    method.after_step(1)  # decay 1/2: the temporal mean moves halfway to the new weights
    moved = sum(not torch.equal(a, b) for a, b in zip(before, method.mean.parameters()))
    assert moved > 0
    out = method.eval().evaluate_logits(torch.randn(2, 3, 32, 32))
    assert out["mean_peer1"].shape == (2, 100)


@pytest.mark.slow
def test_quickstart_reaches_stated_accuracy(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yml"
    assert main(["--config", str(config), f"output.root={tmp_path}", "device=cpu"]) == 0
    last = json.loads((tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 25
    assert last["summary"]["reported"]["best"] >= 90.0
