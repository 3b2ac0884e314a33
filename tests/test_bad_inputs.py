"""Every user mistake: one line naming the problem and the fix, exit code 2, no traceback, and no
change to any existing run (nor any new file) under the output root."""

import numpy as np
import pytest
import torch
from conftest import REPO, tree_digest
from PIL import Image

from okd.cli import main

QUICK = ["--config", str(REPO / "configs/quickstart.yml"), "data.train_subset=192", "data.test_subset=64",
         "train.batch_size=64", "train.epochs=1", "schedule.milestones=[1]", "method.rampup_epochs=2", "device=cpu"]



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An output root holding one finished run, plus broken inputs of every kind."""
    root = tmp_path_factory.mktemp("bad")
    out = root / "runs"
    assert main([*QUICK, f"output.root={out}", "--save_dir", "existing"]) == 0
    last = out / "existing" / "last.pt"
    (root / "truncated.pt").write_bytes(last.read_bytes()[:5000])
    (root / "notes.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    (root / "bad.yml").write_text("train:\n  epochs: [1, 2\n")
    (root / "a_file").write_text("I am a file, not a folder")
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("not an okd run")
    cifar = root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]:
        (cifar / name).write_bytes(b"\x80\x04 definitely not a pickle")
    img = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    for tree, layout in (("empty_class", {"train": ["a", "b"], "test": ["a", "b"]}),
                         ("mismatch", {"train": ["a", "b"], "test": ["a", "c"]})):
        for split, classes in layout.items():
            for cls in classes:
                folder = root / tree / split / cls
                folder.mkdir(parents=True)
                if not (tree == "empty_class" and split == "train" and cls == "b"):
                    img.save(folder / "x.png")
    return root


# (case, extra args, environment, fragment the message must contain)
CASES = [
    ("yaml syntax error", ["--config", "{root}/bad.yml"], {}, "YAML syntax error in"),
    ("config file missing", ["--config", "{root}/nope.yml"], {}, "config file '{root}/nope.yml' not found"),
    ("unknown key", ["train.epohcs=3"], {}, "unknown config key 'train.epohcs' (did you mean 'epochs'?)"),
    ("unknown section", ["trian.epochs=3"], {}, "unknown config key 'trian'"),
    ("wrong type", ["train.epochs=three"], {}, "'train.epochs' must be an integer"),
    ("override without value", ["train.epochs"], {}, "must look like key.sub=value"),
    ("zero learning rate", ["optim.lr=0"], {}, "'optim.lr' must be > 0"),
    ("negative learning rate", ["optim.lr=-0.1"], {}, "'optim.lr' must be > 0"),
    ("negative weight decay", ["optim.weight_decay=-1"], {}, "'optim.weight_decay' must be >= 0"),
    ("momentum out of range", ["optim.momentum=1.5"], {}, "'optim.momentum' must be in [0, 1)"),
    ("zero epochs", ["train.epochs=0", "schedule.milestones=[]"], {}, "'train.epochs' must be > 0"),
    ("milestones beyond the last epoch", ["schedule.milestones=[5]"], {}, "lie beyond the last epoch"),
    ("unknown backbone", ["--model", "resnt32"], {}, "unknown model 'resnt32' (did you mean 'resnet32'?)"),
    ("unknown method", ["--method", "pcll"], {}, "unknown method 'pcll' (did you mean 'pcl'?)"),
    ("unknown method option", ["--method", "dml", "method.ema_decay=0.9"], {}, "unknown config key 'method.ema_decay'"),
    ("bad method option", ["--method", "kdcl", "method.teacher=linear"], {}, "'method.teacher' must be minlogit or naive"),
    ("unknown dataset", ["data.name=cifar1000"], {}, "unknown dataset 'cifar1000'"),
    ("unknown precision", ["train.precision=fp8"], {}, "'train.precision' must be auto or fp32 or bf16 or fp16"),
    ("zero batch size", ["train.batch_size=0"], {}, "'train.batch_size' must be > 0"),
    ("cuda graphs on a CPU", ["train.cuda_graphs=true", "device=cpu"], {}, "train.cuda_graphs needs a CUDA device"),
    ("negative sync interval", ["train.sync_every=-1"], {}, "'train.sync_every' must be >= 0"),
    ("batch larger than the training set", ["train.batch_size=1000"], {}, "exceeds the 192 training images"),
    ("classes contradict the data", ["model.num_classes=100"], {}, "set model.num_classes=10"),
    ("missing dataset directory", ["data.name=cifar10", "data.root={root}/nodata"], {}, "cifar10 not found"),
    ("corrupt CIFAR pickle", ["data.name=cifar10", "data.root={root}/cifar"], {}, "is corrupt"),
    ("pipeline typo", ["data.pipeline=streem"], {}, "got 'streem' (did you mean 'stream'?)"),
    ("augment typo", ["data.augment=resize_crop"], {}, "(did you mean 'resized_crop'?)"),
    ("crop scale upside down", ["data.crop_scale=[0.5,0.1]"], {}, "0 < low <= high <= 1"),
    ("missing ImageNet folder", ["data.name=imagenet", "data.root={root}/nodata"], {}, "imagenet not found"),
    ("ImageFolder with an empty class", ["data.name=imagefolder", "data.root={root}/empty_class",
                                         "data.cache_dir={root}/cache1"], {}, "holds no images"),
    ("ImageFolder train/test classes differ", ["data.name=imagefolder", "data.root={root}/mismatch",
                                               "data.cache_dir={root}/cache2"], {}, "differ: 1 only in train"),
    ("checkpoint of another backbone", ["--resume", "{out}/existing/last.pt", "--model", "resnet32"], {},
     "is for model name 'resnet8_tiny'"),
    ("checkpoint of another method", ["--resume", "{out}/existing/last.pt", "--method", "dml"], {},
     "is for method name 'pcl'"),
    ("checkpoint file missing", ["--resume", "{root}/nope.pt"], {}, "does not exist"),
    ("file that is not a checkpoint", ["--resume", "{root}/notes.pt"], {}, "corrupt or not a checkpoint"),
    ("torch file that is not an okd checkpoint", ["--resume", "{root}/foreign.pt"], {}, "is not an okd checkpoint"),
    ("truncated checkpoint", ["--resume", "{root}/truncated.pt"], {}, "is truncated"),
    ("unwritable output directory", ["output.root={root}/a_file/runs"], {}, "cannot write the run directory"),
    ("run directory of a different config", ["--save_dir", "existing", "optim.lr=0.2"], {},
     "holds a different experiment (optim.lr: 0.05 -> 0.2)"),
    ("directory that is not an okd run", ["--save_dir", "mine"], {}, "is not an okd run"),
    ("world size does not divide the batch", [], {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
     "not divisible by the torchrun world size 3"),
    ("SyncBatchNorm without CUDA", ["train.sync_bn=true"], {}, "train.sync_bn needs torchrun on CUDA"),
    ("cuda where none exists", ["--device", "cuda"], {}, "CUDA is not available here"),
    ("malformed device", ["--device", "gpu0"], {}, "'device' must be auto, cpu, cuda or cuda:N"),
    ("mean with two channels", ["data.mean=[0.5, 0.5]"], {}, "must list 3 channel values"),
    ("zero-sized subset", ["data.train_subset=0"], {}, "'data.train_subset' must be > 0"),
    ("unknown command-line flag", ["--sed", "1"], {}, "unrecognized arguments: --sed"),
    ("flag with a wrong type", ["--seed", "abc"], {}, "invalid int value: 'abc'"),
    ("dropout on a backbone without it", ["model.dropout=0.5"], {}, "'model.dropout' does not apply to resnet8_tiny"),
    ("final_norm on a backbone without it", ["model.final_norm=false"], {},
     "'model.final_norm' does not apply to resnet8_tiny (only to densenet40_12)"),
    ("negative ramp-up", ["method.rampup_epochs=-1"], {}, "'method.rampup_epochs' must be >= 0 for pcl"),
]


@pytest.mark.parametrize("case,extra,env,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, case, extra, env, fragment, capsys, monkeypatch):
    if case == "cuda where none exists" and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    out = world / "runs"
    fill = lambda s: s.format(root=world, out=out)  # noqa: E731
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = tree_digest(out)
    capsys.readouterr()
    try:
        code = main([*QUICK, f"output.root={out}", "--save_dir", "new", *map(fill, extra)])
    except SystemExit as exc:  # argparse mistakes exit from the parser, also with code 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("okd: error: "), err
    assert fill(fragment) in lines[0], lines[0]
    assert "Traceback" not in err
    assert tree_digest(out) == before  # the finished run untouched, and nothing new written


def test_at_least_25_distinct_mistakes():
    assert len({c[0] for c in CASES}) >= 25
