"""Bring your own teacher (``wide.init``) and the ResNet export: torchvision/timm names ↔ ours.

torchvision is not imported (nor needed): a torchvision-layout state dict is our own net's
tensors under torchvision's names, which is what ``torchvision_name`` gives.
"""

from __future__ import annotations

import json

import pytest
import torch

from gwtn_dist import checkpoint
from gwtn_dist.checkpoint import CheckpointError
from gwtn_dist.cli import main
from gwtn_dist.config import ConfigError, load_config
from gwtn_dist.models.family import build_thin, build_wide, family_for, shape_meta
from gwtn_dist.models.resnet.names import (
    load_resnet_weights,
    torchvision_name,
    torchvision_state_dict,
)
from gwtn_dist.models.weights import read_state_dict
from gwtn_dist.stages.wide import load_init
from tests.conftest import REPO
from tests.test_pipeline import fast_args

# A small net in the ImageNet geometry (7×7 stride-2 stem + max-pool, four stages).
IMAGENET = ["model.geometry=imagenet", "model.in_channels=3", "model.num_classes=5",
            "model.stem_width=8", "model.blocks=[1,1,2,1]", "model.inner_widths=[4,4,8,8]",
            "model.widen.inner_mult=2", "data.dataset=imagefolder",
            "compare.deeper_blocks=[1,1,3,1]"]


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with every tensor off its init (BN statistics too), in eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.add_(0.1 * torch.rand_like(t) if "running_var" in name else
                       0.1 * torch.randn_like(t))
    return net.eval()


def torchvision_file(net: torch.nn.Module, path, wrap: str | None = None):
    """Save ``net``'s tensors under torchvision's names (optionally under a ``wrap`` key)."""
    tensors = {torchvision_name(k): v for k, v in net.state_dict().items()}
    torch.save({wrap: tensors} if wrap else tensors, path)
    return path


def test_torchvision_names_of_a_resnet50():
    # Our ImageNet ResNet50 under torchvision's names: its key count and parameter count.
    cfg = load_config(REPO / "configs/imagenet_resnet50.yaml").model
    names = torchvision_state_dict(build_thin(cfg))
    assert len(names) == 320
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.num_batches_tracked", "layer4.2.conv3.weight",
            "fc.bias"} <= set(names)
    params = sum(v.numel() for k, v in names.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert params == 25_557_032  # torchvision's resnet50


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_wide_init_loads_a_torchvision_file_in_the_imagenet_geometry(tmp_path, wrap):
    cfg = load_config(None, IMAGENET)
    teacher = perturbed(build_wide(cfg.model))
    path = torchvision_file(teacher, tmp_path / "teacher.pth", wrap)
    loaded = load_init(family_for(cfg.model), build_wide(cfg.model), str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), teacher(x))


def test_our_names_safetensors_and_missing_batch_counters_load(tmp_path):
    cfg = load_config(None, IMAGENET)
    teacher = perturbed(build_wide(cfg.model))
    ours = {k: v for k, v in teacher.state_dict().items()
            if not k.endswith("num_batches_tracked")}  # old torchvision and timm files lack them
    checkpoint.save_safetensors({k: v.contiguous() for k, v in ours.items()},
                                tmp_path / "t.safetensors")
    for tensors in (ours, read_state_dict(tmp_path / "t.safetensors")):
        net = build_wide(cfg.model)
        load_resnet_weights(net, tensors)
        x = torch.randn(2, 3, 48, 48)
        with torch.no_grad():
            assert torch.equal(net.eval()(x), teacher(x))


def test_a_file_that_does_not_fit_is_refused_naming_the_key(tmp_path):
    cfg = load_config(None, IMAGENET)
    good = {torchvision_name(k): v for k, v in build_wide(cfg.model).state_dict().items()}
    narrow = load_config(None, [*IMAGENET, "model.widen.inner_mult=1"])
    cases = {
        "shape": (torchvision_file(build_wide(narrow.model), tmp_path / "narrow.pt"),
                  "layer1.0.conv1.weight has shape (4, 8, 1, 1), but the net's "
                  + "layer1.0.conv1.weight has (8, 8, 1, 1)"),
        "unknown": ({**good, "head.weight": torch.zeros(1)}, "head.weight is not a tensor"),
        "missing": ({k: v for k, v in good.items() if k != "layer2.0.downsample.0.weight"},
                    "layer2.0.downsample.0.weight (our layer2.0.shortcut.0.weight) is missing"),
        "not tensors": ({"conv1.weight": [1, 2]}, "conv1.weight is a list, not a tensor"),
    }
    for name, (content, words) in cases.items():
        path = content if name == "shape" else tmp_path / f"{name.replace(' ', '_')}.pt"
        if name != "shape":
            torch.save(content, path)
        # A file that holds no weights is unreadable (exit 4); weights of another net, the
        # config's mistake (exit 2).
        error = CheckpointError if name == "not tensors" else ConfigError
        with pytest.raises(error, match="^wide.init: ") as info:
            load_init(family_for(cfg.model), build_wide(cfg.model), str(path))
        assert words in str(info.value) and "\n" not in str(info.value), name
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read as weights"):
        load_init(family_for(cfg.model), build_wide(cfg.model), str(tmp_path / "junk.pt"))


def test_wide_steps_0_saves_the_given_teacher_as_a_finished_stage(tmp_path, shard_dir, capsys):
    config, *overrides = fast_args(tmp_path, shard_dir)
    cfg = load_config(config, overrides)
    teacher = perturbed(build_wide(cfg.model))
    path = torchvision_file(teacher, tmp_path / "teacher.pt")
    run_dir = tmp_path / "run"
    args = fast_args(run_dir, shard_dir, "wide.steps=0", f"wide.init={path}")
    assert main(["-q", "wide", *args]) == 0
    for name in ("model.pt", "stage.json", "DONE", "metrics.jsonl"):
        assert (run_dir / "wide" / name).is_file()
    record = json.loads((run_dir / "wide" / "stage.json").read_text())
    assert record["steps"] == 0 and record["init"] == str(path) and "test_accuracy" in record
    saved = checkpoint.load(run_dir / "wide" / "model.pt")
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in teacher.state_dict().items())
    assert main(["-q", "imitate", *args]) == 0  # the next stage takes it as any teacher
    assert (run_dir / "imitate" / "DONE").is_file()

    # wide.steps > 0 starts training from it (a tiny lr: the conv weights barely move).
    run_dir = tmp_path / "trained"
    assert main(["-q", "wide", *fast_args(run_dir, shard_dir, "wide.steps=2", f"wide.init={path}",
                                          "wide.optim.lr=1e-9")]) == 0
    trained = checkpoint.load(run_dir / "wide" / "model.pt")["state_dict"]
    assert torch.allclose(trained["stem.0.weight"], teacher.stem[0].weight, atol=1e-6)

    # A teacher of another shape: one line naming the key and both shapes, exit 2.
    capsys.readouterr()
    assert main(["-q", "wide", *fast_args(tmp_path / "bad", shard_dir, "wide.steps=0",
                                          f"wide.init={path}", "model.widen.inner_mult=2")]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("gwtn: error:")]
    assert "wide.init:" in line and "has shape (16, 8, 1, 1)" in line and "(8, 8, 1, 1)" in line
    assert "Traceback" not in err
    assert main(["-q", "wide", *fast_args(tmp_path / "none", shard_dir, "wide.steps=0",
                                          f"wide.init={tmp_path / 'nope.pt'}")]) == 2
    assert "nope.pt not found" in capsys.readouterr().err


def test_export_writes_torchvision_names_that_map_back_to_the_same_logits(tmp_path, monkeypatch,
                                                                          capsys):
    cfg = load_config(None, IMAGENET)
    thin = perturbed(build_thin(cfg.model))
    checkpoint.save_weights(thin, tmp_path / "model.pt",
                            {"stage": "finetune", **shape_meta(cfg.model, wide=False)})
    out = tmp_path / "export"
    assert main(["-q", "export", str(tmp_path / "model.pt"), str(out)]) == 0
    assert "model.pt" in capsys.readouterr().out
    x = torch.randn(2, 3, 64, 64)
    files = [out / "model.pt"] + ([out / "model.safetensors"]
                                  if checkpoint.safetensors_available() else [])
    for path in files:
        tensors = read_state_dict(path)
        assert "conv1.weight" in tensors and "layer1.0.downsample.0.weight" in tensors
        back = build_thin(cfg.model)
        load_resnet_weights(back, tensors)
        with torch.no_grad():
            assert torch.equal(back.eval()(x), thin(x))
    config = json.loads((out / "config.json").read_text())
    assert config["naming"] == "torchvision" and config["torchvision_arch"] is None
    # Without safetensors, the .pt alone; a tokenizer is refused for a ResNet.
    monkeypatch.setattr(checkpoint, "safetensors_available", lambda: False)
    assert main(["-q", "export", str(tmp_path / "model.pt"), str(tmp_path / "plain")]) == 0
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json", "model.pt"]
    assert main(["-q", "export", str(tmp_path / "model.pt"), str(tmp_path / "t"),
                 "--tokenizer", str(tmp_path / "model.pt")]) == 2


def test_the_teacher_cache_keys_wide_init_by_content(tmp_path):
    from gwtn_dist.stages.teacher_cache import cache_dir

    path = tmp_path / "t.pt"
    torch.save({"a": torch.zeros(2)}, path)
    cfg = load_config(None, [f"wide.init={path}", f"wide.cache={tmp_path / 'cache'}"])
    first = cache_dir(cfg)
    torch.save({"a": torch.ones(2)}, path)  # same path, other weights: another teacher
    assert cache_dir(cfg) != first
