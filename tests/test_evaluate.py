"""Evaluation counts: top-1 and top-5 against hand-counted predictions."""
import torch

from okd.data import Normalizer
from okd.evaluate import evaluate


class FixedLogits(torch.nn.Module):
    """Returns preset logits for the images it is given (identified by their first pixel); evaluation
    needs only ``evaluate_logits`` of the method contract."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def evaluate_logits(self, images):
        index = images[:, 0, 0, 0].round().long()  # the normaliser below is the identity up to 1/255
        return {"a": self.logits[index], "b": -self.logits[index]}


def test_top1_top5_counts_over_batches():
    num_classes = 20
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    logits = torch.zeros(6, num_classes)
    for i in range(num_classes):
        logits[:, i] = -float(i)  # class 0 highest, then 1, 2, ...
    # image 0: label 0 -> top-1 hit; image 1: rank 2 -> top-5 hit; image 4: rank 5 -> top-5 hit;
    # image 5: label 5 is 6th -> miss; make image 3's label the top: top-1 hit
    logits[3, 3] = 10.0
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    identity = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")
    result = evaluate(FixedLogits(logits), images, labels, identity, batch_size=4, num_classes=num_classes)
    # a: top-1 hits = images 0, 3 -> 2/6; top-5 hits = 0,1,2,3,4 -> 5/6
    assert abs(result["top1"]["a"] - 100 * 2 / 6) < 1e-9
    assert abs(result["top5"]["a"] - 100 * 5 / 6) < 1e-9
    # b (negated): class 19 highest; label ranks: 0 last, ..., top-5 = classes 19..15 -> no hits
    assert result["top1"]["b"] == 0.0 and result["top5"]["b"] == 0.0


def test_no_top5_for_ten_classes():
    logits = torch.eye(10)[:4]
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    identity = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")
    result = evaluate(FixedLogits(logits), images, torch.tensor([0, 1, 5, 3]), identity, 3, 10)
    assert "top5" not in result and result["top1"]["a"] == 75.0
