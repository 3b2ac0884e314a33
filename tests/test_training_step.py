"""PCL takes a step on every paper backbone (every method on every backbone: test_contract.py); the quickstart
reaches its stated accuracy (slow)."""
import json
from pathlib import Path

import pytest
import torch

from okd.cli import main
from okd.methods.pcl import PCL
from okd.models import backbone_spec


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
